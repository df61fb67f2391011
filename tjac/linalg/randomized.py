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

Memory: the three bases Q, Z and A Z live in storage allocated once, for the most basis vectors the
solve may reach (``maxiter`` passes, or fewer when ``max_bytes`` holds fewer); a pass writes into
it (no concatenated copies). Rayleigh-Ritz takes Z's QR and the SVD of its small R factor, and
forms only the k wanted columns of V. At the peak (the QR's P x n factor beside the three bases)
:func:`peak_values` P-sized values are live. A solve that would need a basis
larger than ``max_bytes`` holds stops before the pass that would exceed it, with the partial
result and a note (``budget_note``) naming the bytes it needed and those available.
"""

from __future__ import annotations

import logging

import torch

from ._base import KrylovResult, orthonormalize, values_unchanged

log = logging.getLogger(__name__)

# With a block narrower than k, certified values are confirmed: random directions orthogonal to
# the basis join the next pass, and the solve ends when the values survive this many more passes.
CONFIRM_PASSES = 2
# P x n arrays live at the peak: the Q, Z, A Z storage and the Q factor of Z's QR (4), and one
# more: a fresh process's resident peak at P = 40,000, 13 passes of 16 measured 4.6 P n beside
# the blocks (the QR's working copy and the allocator), a warm one 3.6-4.0
BASIS_ARRAYS = 5
# P x l arrays beside them: the start block, the pass's fresh products, the Ritz vectors and
# residual temporaries, orthonormalization's work (a block up to 2 l wide) and the allocator's
# fragmentation of these (measured resident peak at P = 4e4, n = 96: 10-19 per l, l = 8-32)
BLOCK_ARRAYS = 16


def peak_values(P: int, n: int, l: int) -> int:
    """Values (not bytes) live at the solve's peak with a basis of ``n`` vectors per side of a block
    of ``l``: ``BASIS_ARRAYS`` P x n arrays, ``BLOCK_ARRAYS`` P x l ones and the n x n SVD."""
    n = min(P, n)
    return BASIS_ARRAYS * P * n + BLOCK_ARRAYS * P * min(P, l) + 3 * n * n


def max_basis_for(P: int, l: int, max_bytes: int | None, itemsize: int) -> int:
    """The widest basis (vectors, at most P) whose peak fits in ``max_bytes`` (None: P)."""
    if max_bytes is None:
        return P
    lo, hi = 0, P  # peak_values grows with n: bisect the largest n that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if peak_values(P, mid, l) * itemsize <= max_bytes:
            lo = mid
        else:
            hi = mid - 1
    return lo


def randomized(op, k: int, *, tol: float, maxiter: int, block: int, v0=None, gen=None,
               callback=None, max_bytes: int | None = None) -> KrylovResult:
    """Top-k triplets of ``op`` (see the module doc). ``max_bytes``: the solver's memory budget;
    the basis storage is sized to it (and to ``maxiter`` passes), and a solve that needs more
    stops early with ``budget_note`` set on the result."""
    P = op.shape[0]
    dt, dev = op.dtype, op.device
    itemsize = torch.empty((), dtype=dt).element_size()
    l = min(P, block)
    Omega = v0 if v0 is not None else torch.randn(P, l, generator=gen, dtype=torch.float64)
    Omega = Omega.to(dev, dt).reshape(P, -1)
    # the storage: maxiter passes (those that inject random directions, l < k, are 2 l wide), or
    # fewer when the budget holds fewer
    fits = max_basis_for(P, l, max_bytes, itemsize)
    cap = min(P, Omega.shape[1] + (maxiter - 1) * l * (2 if l < k else 1), fits)
    if cap < Omega.shape[1]:
        need = peak_values(P, Omega.shape[1], l) * itemsize
        raise MemoryError(f"randomized top-{k}: one pass of {Omega.shape[1]} vectors needs "
                          f"{need:,} bytes but {max_bytes:,} are available")
    # column-major storage (P x cap views of cap x P rows): a basis is a contiguous prefix
    Qb, Zb, AZb = (torch.empty(cap, P, dtype=dt, device=dev).T for _ in range(3))
    Qn, _, _ = orthonormalize(op.matmat(Omega), gen=gen)
    n = 0
    history = []
    confirm = None
    budget_note = None
    for it in range(maxiter):
        w = Qn.shape[1]
        Qb[:, n:n + w] = Qn
        Zb[:, n:n + w] = op.rmatmat(Qn)
        del Qn
        Zn = Zb[:, n:n + w]
        AZb[:, n:n + w] = op.matmat(Zn)
        AZn = AZb[:, n:n + w]
        n += w
        Q, Z, AZ = Qb[:, :n], Zb[:, :n], AZb[:, :n]
        # Z = Qz R, R = Ur S W^T (what LAPACK's SVD of a tall matrix does, without its P x n
        # workspace and the P x n factor: only the k wanted columns of V = Qz Ur are formed)
        Qz, R = torch.linalg.qr(Z)
        Ur, sig, Wt = torch.linalg.svd(R)
        kk = min(k, sig.shape[0])
        Vk = Qz @ Ur[:, :kk]
        del Qz, R
        W = Wt.T[:, :kk]
        U = Q @ W
        sk = sig[:kk]
        r1 = ((AZ @ W) / sk - U * sk).norm(dim=0)
        r2 = (Z @ W - Vk * sk).norm(dim=0)
        smax = float(sig[0])
        conv = torch.maximum(r1, r2) <= tol * smax
        n_conv = int(conv.sum()) if kk == k else 0
        history.append({"iteration": it, "basis": n, "sigma_max": smax,
                        "max_residual": float(torch.maximum(r1, r2).max() / smax),
                        "n_converged": n_conv})
        if callback is not None:
            callback(history[-1])
        log.debug("randomized pass %d: basis %d, %d/%d converged", it, n, n_conv, k)
        room = P - n
        inject = False
        if kk == k and bool(conv.all()):
            values = [float(x) for x in sig[:kk]]
            same = confirm is not None and values_unchanged(values, confirm["values"], tol, smax)
            if l >= k or room <= l or (same and it >= confirm["iteration"] + CONFIRM_PASSES):
                break
            if not same:  # a block narrower than k: look for copies of a multiple value it missed
                confirm, inject = {"iteration": it, "values": values}, True
        if room == 0 or it == maxiter - 1:
            break
        width = min(room, 2 * l if inject else l)
        if n + width > cap:  # the next pass would outgrow the storage
            if n + width <= fits:  # (maxiter's storage: the passes allowed are done)
                break
            need = peak_values(P, n + width, l) * itemsize
            budget_note = (f"randomized top-{k} stopped after {it + 1} passes (basis {n}): the "
                           f"next pass needs {need:,} bytes but {max_bytes:,} are available")
            history[-1]["stopped"] = budget_note
            log.warning("%s", budget_note)
            break
        Y = AZn
        if inject:
            Y = torch.cat([AZn, torch.randn(P, l, generator=gen, dtype=torch.float64).to(dev, dt)], 1)
        Qn, _, _ = orthonormalize(Y[:, :width], Q, gen=gen)
    res = torch.stack([r1, r2], 1)
    return KrylovResult(S=sig[:kk].clone(), U=U, V=Vk, residuals=res, fresh=True,
                        history=tuple(history), smax=smax, budget_note=budget_note)
