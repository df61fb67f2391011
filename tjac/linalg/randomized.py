r"""Randomized SVD (Halko, Martinsson & Tropp 2011) with block products and a residual stopping rule.

Each pass: Z = A^T Q (l VJPs), Z = V S W^T so that U = Q W, and Y = A V (l JVPs). Then
||A^T u - s v|| = ||Z w - s v|| and ||A v - s u|| come from those fresh products at no extra cost;
the next range basis is orth(Y) (one power iteration), grown by ``grow`` new random columns while
the wanted triplets are not yet certified.
"""

from __future__ import annotations

import logging

import torch

from ._base import orthonormalize

log = logging.getLogger(__name__)


def randomized(op, k: int, *, tol: float, maxiter: int, oversample: int, grow: int,
               v0=None, gen=None, callback=None):
    P = op.shape[0]
    dt, dev = op.dtype, op.device
    l = min(P, k + oversample)
    Omega = v0 if v0 is not None else torch.randn(P, l, generator=gen, dtype=torch.float64)
    Omega = Omega.to(dev, dt).reshape(P, -1)
    Q, _, _ = orthonormalize(op.matmat(Omega), gen=gen)
    history = []
    for it in range(maxiter):
        Z = op.rmatmat(Q)
        V, sig, Wt = torch.linalg.svd(Z, full_matrices=False)  # tall-skinny: cheap
        U = Q @ Wt.T
        Y = op.matmat(V)
        r1 = (Y - U * sig).norm(dim=0)
        r2 = (Z @ Wt.T - V * sig).norm(dim=0)
        smax = float(sig[0])
        conv = torch.maximum(r1[:k], r2[:k]) <= tol * smax
        history.append({"iteration": it, "block": Q.shape[1], "sigma_max": smax,
                        "max_residual": float(torch.maximum(r1[:k], r2[:k]).max() / smax),
                        "n_converged": int(conv.sum())})
        if callback is not None:
            callback(history[-1])
        log.debug("randomized pass %d: block %d, %d/%d converged", it, Q.shape[1], int(conv.sum()), k)
        if bool(conv.all()) or it == maxiter - 1:
            break
        if grow and Q.shape[1] + grow <= P:
            extra = torch.randn(P, grow, generator=gen, dtype=torch.float64).to(dev, dt)
            Y = torch.cat([Y, op.matmat(extra)], 1)
        Q, _, _ = orthonormalize(Y, gen=gen)
    res = torch.stack([r1[:k], r2[:k]], 1)
    return sig[:k], U[:, :k], V[:, :k], res, conv, tuple(history), smax
