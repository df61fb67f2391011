"""The dense path: J from identity blocks through ``matmat``, then ``torch.linalg.svd``.

The oracle for tests and the cheapest certified path for the bottom of small nets (P products, all
in wide blocks, against ~2P single-width products for a Krylov method on a near-null cluster).
"""

from __future__ import annotations

import torch

from ._base import small_svd


def materialize(op, *, block: int = 128) -> torch.Tensor:
    """The P x P matrix J, built column block by column block (P forward products)."""
    P = op.shape[0]
    cols = []
    for i in range(0, P, block):
        E = torch.zeros(P, min(block, P - i), dtype=op.dtype, device=op.device)
        E[torch.arange(i, i + E.shape[1]), torch.arange(E.shape[1])] = 1.0
        cols.append(op.matmat(E))
    return torch.cat(cols, 1)


def dense_svd(op, *, block: int = 128):
    """(J, U, S, V) with J = U diag(S) V^T, S descending."""
    J = materialize(op, block=block)
    U, S, Vh = small_svd(J)
    return J, U, S, Vh.T
