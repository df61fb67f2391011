"""J as a ``linear_operator`` (gpytorch's operator library) ``LinearOperator``.

``op.to_linear_operator()`` lets gpytorch users compose J with their own operators: ``J @ X``,
``J.mT`` (Jᵀ, through the operator's VJP), ``J.mT @ J`` (a lazy product), ``to_dense()`` (P
products). Right-hand sides are (P,), (P, k) or batched (..., P, k); a batch is pushed through as
one block of columns, so a batch shares training replays. No gradients flow through J (its
products are not differentiable with respect to the operator's parameters).
"""

from __future__ import annotations

import torch
from linear_operator.operators import LinearOperator


class JacobianLinearOperator(LinearOperator):
    """J (or Jᵀ with ``transposed=True``) behind the ``linear_operator`` interface."""

    def __init__(self, op, transposed: bool = False):
        super().__init__(op=op, transposed=transposed)
        self.op, self.transposed = op, transposed

    def _size(self):
        return torch.Size(self.op.shape)

    @property
    def dtype(self):
        return self.op.dtype

    @property
    def device(self):
        return self.op.device

    def _apply(self, rhs, transposed):
        if rhs.dtype != self.op.dtype:
            raise TypeError(f"right-hand side is {rhs.dtype}, the operator {self.op.dtype} (no "
                            f"silent casts)")
        vec = rhs.ndim == 1
        X = rhs.unsqueeze(-1) if vec else rhs
        P = self.op.shape[0]
        if X.shape[-2] != P:
            raise ValueError(f"right-hand side has {X.shape[-2]} rows, the operator {P} columns")
        batch = X.shape[:-2]
        flat = X.reshape(-1, P, X.shape[-1]).permute(1, 0, 2).reshape(P, -1)  # (P, batch * k)
        f = self.op.rmatmat if transposed else self.op.matmat
        out = f(flat.detach().contiguous())
        out = out.reshape(P, -1, X.shape[-1]).permute(1, 0, 2).reshape(*batch, P, X.shape[-1])
        return out.squeeze(-1) if vec else out

    def _matmul(self, rhs):
        return self._apply(rhs, self.transposed)

    def _t_matmul(self, rhs):
        return self._apply(rhs, not self.transposed)

    def _transpose_nonbatch(self):
        return JacobianLinearOperator(self.op, transposed=not self.transposed)

    def _expand_batch(self, batch_shape):
        raise NotImplementedError("J has no batch dimensions")
