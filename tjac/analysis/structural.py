r"""Directions with singular value exactly 1 for structural reasons, found from the recipe and data.

* **Always-zero inputs.** If feature j is 0 in every training example, the first-layer weights
  W[:, j] never receive gradient and never influence anything: J e = e and e^T J = e^T for each of
  those (width x #zero features) coordinates, for every optimizer without weight decay.
* **Softmax shift.** Adding c to every output bias, or a vector a to every row of the output
  weights, shifts all logits equally and leaves the loss (hence every gradient) unchanged, so
  J d = d. The gradient is orthogonal to d (its class-sum vanishes), so with SGD (updates in the span
  of past gradients) also d^T J = d^T: last-hidden-width + 1 singular values exactly 1. Adam's
  elementwise rescaling breaks the second identity: there d is an eigenvector (J d = d), not a
  singular vector, and it is reported as such.

Both are derived for the built-in families with cross-entropy and the built-in optimizers (gradient
clipping keeps them: it rescales gradients that vanish, or are orthogonal to d), and for a user's
module that :mod:`tjac.models.chain` recognised and verified as an MLP chain. For any other user
module, and for a user's optimizer, nothing is predicted (zero counts). Under ``param_filter`` the directions
supported inside the selected parameters are kept, restricted to them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models import CNN, MLP, Transformer
from ..problem import Problem


@dataclass(frozen=True)
class StructuralOnes:
    zero_features: tuple[int, ...]
    n_zero_input: int            # singular value exactly 1 (left = right vector)
    n_softmax_shift: int         # exactly 1 as singular values only when ``shift_is_singular``
    shift_is_singular: bool
    zero_input_basis: torch.Tensor      # (P, n_zero_input), orthonormal
    softmax_shift_basis: torch.Tensor   # (P, n_softmax_shift), orthonormal

    @property
    def n_exact_singular(self) -> int:
        return self.n_zero_input + (self.n_softmax_shift if self.shift_is_singular else 0)

    @property
    def basis(self) -> torch.Tensor:
        """Orthonormal basis of the directions with sigma exactly 1 (left = right)."""
        parts = [self.zero_input_basis]
        if self.shift_is_singular:
            parts.append(self.softmax_shift_basis)
        return torch.cat(parts, 1)

    def as_dict(self) -> dict:
        return {"zero_features": list(self.zero_features), "n_zero_input": self.n_zero_input,
                "n_softmax_shift": self.n_softmax_shift, "shift_is_singular": self.shift_is_singular,
                "n_exact_singular": self.n_exact_singular}


def structural_ones(problem: Problem) -> StructuralOnes:
    r = problem.recipe
    P, dt, dev = problem.num_params, problem.dtype, problem.device
    layout = {p.name: p for p in problem.layout}
    n_layers = len(problem.layout) // 2
    no_wd = r.optim.weight_decay == 0 and r.optim.name != "custom"
    module = problem.model.module
    cols = []
    zero = ()
    mlp = isinstance(module, MLP) or problem.model.chain is not None  # a user's verified MLP
    if no_wd and mlp:
        x = problem.data.x_train[: problem.order.per_epoch * r.batch_size] \
            if r.data.shuffle == "none" else problem.data.x_train
        zero = tuple(int(j) for j in torch.nonzero((x.reshape(len(x), -1) == 0).all(0)).flatten())
        W0 = problem.layout[0]  # an MLP's theta starts with the first weight (out, in)
        out_dim, in_dim = W0.shape
        for j in zero:
            for i in range(out_dim):
                e = torch.zeros(P, dtype=dt, device=dev)
                e[W0.offset + i * in_dim + j] = 1.0
                cols.append(e)
    zb = torch.stack(cols, 1) if cols else torch.zeros(P, 0, dtype=dt, device=dev)
    shift = []
    head = None  # (last weight, last bias) of a net whose logits they produce
    if mlp:  # an MLP's theta ends with them, whatever the user named them
        head = problem.layout[-2], problem.layout[-1]
    elif isinstance(module, (CNN, Transformer)):
        name = "head" if "head.weight" in layout else f"layers.{n_layers - 1}"
        if f"{name}.weight" in layout:
            head = layout[f"{name}.weight"], layout[f"{name}.bias"]
    if no_wd and head is not None and r.loss == "cross_entropy":
        Wl, bl = head
        n_cls, n_hid = Wl.shape
        d = torch.zeros(P, dtype=dt, device=dev)
        d[bl.offset:bl.offset + n_cls] = n_cls ** -0.5
        shift.append(d)
        for h in range(n_hid):
            d = torch.zeros(P, dtype=dt, device=dev)
            d[Wl.offset + h + n_hid * torch.arange(n_cls, device=dev)] = n_cls ** -0.5
            shift.append(d)
    sb = torch.stack(shift, 1) if shift else torch.zeros(P, 0, dtype=dt, device=dev)
    sel = problem.selection
    if sel is not None:  # directions inside the selected parameters, restricted to them
        inside = torch.zeros(P, dtype=torch.bool, device=dev)
        inside[sel] = True
        zb, sb = ((B[:, (B[~inside] == 0).all(0)])[sel] for B in (zb, sb))
        if zb.shape[1] == 0:
            zero = ()
    return StructuralOnes(zero_features=zero, n_zero_input=zb.shape[1], n_softmax_shift=sb.shape[1],
                          shift_is_singular=r.optim.name == "sgd", zero_input_basis=zb,
                          softmax_shift_basis=sb)


def verify_structural(op, s: StructuralOnes) -> dict:
    """max-column ||J Q - Q|| and ||J^T Q - Q|| for both families (fresh products)."""
    out = {}
    for name, Q in (("zero_input", s.zero_input_basis), ("softmax_shift", s.softmax_shift_basis)):
        if Q.shape[1] == 0:
            out[name] = (0.0, 0.0)
            continue
        out[name] = (float((op.matmat(Q) - Q).norm(dim=0).max()),
                     float((op.rmatmat(Q) - Q).norm(dim=0).max()))
    return out
