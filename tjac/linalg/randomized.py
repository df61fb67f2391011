r"""Randomized block Krylov SVD (Halko, Martinsson & Tropp 2011; Musco & Musco 2015).

Start: Q_0 = orth(A Omega) with Omega (P x l) Gaussian from an explicit seed. Pass i:
Z_i = A^T Q_i (l VJPs), Y_i = A Z_i (l JVPs), Q_{i+1} = orth(Y_i against all earlier Q). Keeping every
block (rather than only the last, as plain power iteration does) makes the convergence rate
gap-independent. Rayleigh-Ritz on the accumulated basis: Z = [Z_0 ...] = A^T Q = V S W^T gives
u = Q w, v = V; and A v = (A Z) W S^{-1} with A Z = [Y_0 ...] already computed, so both residuals
||A v - s u|| and ||A^T u - s v|| come from fresh products at no extra cost. Stops when the top k
certify or after ``maxiter`` passes. Certification needs at least k Ritz values: a Krylov space that
closes early (an invariant subspace) continues with random directions orthogonal to the basis. A block
of width l finds at most l copies of a multiple singular value, so with l < k the certified values
are confirmed against fresh random directions before the solve ends.
"""

from __future__ import annotations

import logging

import torch

from ._base import KrylovResult, orthonormalize, values_unchanged

log = logging.getLogger(__name__)

# With a block narrower than k, certified values are confirmed: random directions orthogonal to
# the basis join the next pass, and the solve ends when the values survive this many more passes.
CONFIRM_PASSES = 2


def randomized(op, k: int, *, tol: float, maxiter: int, block: int, v0=None, gen=None,
               callback=None) -> KrylovResult:
    P = op.shape[0]
    dt, dev = op.dtype, op.device
    l = min(P, block)
    Omega = v0 if v0 is not None else torch.randn(P, l, generator=gen, dtype=torch.float64)
    Omega = Omega.to(dev, dt).reshape(P, -1)
    Qn, _, _ = orthonormalize(op.matmat(Omega), gen=gen)
    Qs, Zs, AZs = [], [], []
    history = []
    confirm = None
    for it in range(maxiter):
        Zn = op.rmatmat(Qn)
        AZn = op.matmat(Zn)
        Qs.append(Qn), Zs.append(Zn), AZs.append(AZn)
        Q, Z, AZ = torch.cat(Qs, 1), torch.cat(Zs, 1), torch.cat(AZs, 1)
        V, sig, Wt = torch.linalg.svd(Z, full_matrices=False)  # tall-skinny: cheap
        kk = min(k, sig.shape[0])
        W = Wt.T[:, :kk]
        U = Q @ W
        AV = (AZ @ W) / sig[:kk]
        r1 = (AV - U * sig[:kk]).norm(dim=0)
        r2 = (Z @ W - V[:, :kk] * sig[:kk]).norm(dim=0)
        smax = float(sig[0])
        conv = torch.maximum(r1, r2) <= tol * smax
        n_conv = int(conv.sum()) if kk == k else 0
        history.append({"iteration": it, "basis": Q.shape[1], "sigma_max": smax,
                        "max_residual": float(torch.maximum(r1, r2).max() / smax),
                        "n_converged": n_conv})
        if callback is not None:
            callback(history[-1])
        log.debug("randomized pass %d: basis %d, %d/%d converged", it, Q.shape[1], n_conv, k)
        room = P - Q.shape[1]
        inject = False
        if kk == k and bool(conv.all()):
            values = [float(x) for x in sig[:kk]]
            same = confirm is not None and values_unchanged(values, confirm["values"], tol, smax)
            if l >= k or room <= l or (same and it >= confirm["iteration"] + CONFIRM_PASSES):
                break
            if not same:  # a block narrower than k: look for copies of a multiple value it missed
                confirm, inject = {"iteration": it, "values": values}, True
        if room == 0:
            break
        Y = AZn
        if inject:
            Y = torch.cat([AZn, torch.randn(P, l, generator=gen, dtype=torch.float64).to(dev, dt)], 1)
        Qn, _, _ = orthonormalize(Y[:, :room], Q, gen=gen)
    res = torch.stack([r1, r2], 1)
    return KrylovResult(S=sig[:kk], U=U, V=V[:, :kk], residuals=res, fresh=True,
                        history=tuple(history), smax=smax)
