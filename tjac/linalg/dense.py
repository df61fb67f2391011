"""The dense path: J from identity blocks through ``matmat``, then LAPACK.

The oracle for tests and the cheapest certified path for the bottom of small nets (P products, all
in wide blocks, against ~1.5 P narrow-block products for a Krylov method on a near-null cluster).

* :func:`dense_svd`: the full SVD (every sigma, both bases). Peak ~8 P^2 values (J, LAPACK's copy,
  U, V^T and gesdd's workspace).
* :func:`dense_bottom`: the bottom k only, in ~P^2 values: J is overwritten by its Householder QR
  (J = Q R, LAPACK geqrf); the bottom of R (sigma(J) = sigma(R), the same right vectors) comes
  from inverse subspace iteration on both sides (two triangular solves per step, O(P^2 b) flops)
  with a two-sided Rayleigh-Ritz step on R itself, and the left vectors are Q u_R (LAPACK ormqr,
  from the reflectors stored in place). Householder QR is backward stable, so the bottom is as
  accurate (to ~eps ||J||, the absolute scale of every certificate here) as the full SVD's.
* :func:`dense_values`: every sigma without vectors (gesdd on a copy; ~P^2 values more).
"""

from __future__ import annotations

import time

import numpy as np
import scipy.linalg
import torch

from ._base import small_svd


def column_blocks(op, *, block: int = 128, start: int = 0):
    """``(i, J[:, i:i + n])`` for each block of J's columns from ``start``: J times identity
    columns (one forward product per column)."""
    P = op.shape[0]
    for i in range(start, P, block):
        n = min(block, P - i)
        E = torch.zeros(P, n, dtype=op.dtype, device=op.device)
        E[torch.arange(i, i + n), torch.arange(n)] = 1.0
        yield i, op.matmat(E)


def numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """The numpy dtype of a torch dtype (J on the host keeps the operator's)."""
    return torch.empty((), dtype=dtype).numpy().dtype


def materialize(op, *, block: int = 128) -> torch.Tensor:
    """The P x P matrix J, built column block by column block (P forward products)."""
    return torch.cat([cols for _, cols in column_blocks(op, block=block)], 1)


def materialize_host(op, *, block: int = 128) -> np.ndarray:
    """J as a column-major (Fortran-ordered) numpy array on the host, filled in place block by
    block: P^2 values plus one block, no concatenated copy (what :func:`dense_bottom` takes)."""
    P = op.shape[0]
    J = np.empty((P, P), dtype=numpy_dtype(op.dtype), order="F")
    for i, cols in column_blocks(op, block=block):
        J[:, i:i + cols.shape[1]] = cols.detach().cpu().numpy()
    return J


def dense_svd(op, *, block: int = 128):
    """(J, U, S, V) with J = U diag(S) V^T, S descending."""
    J = materialize(op, block=block)
    U, S, Vh = small_svd(J)
    return J, U, S, Vh.T


GROW_EVERY = 20  # steps of unsettled subspace iteration before the block doubles (to 4x at most)


def dense_values(J: np.ndarray) -> np.ndarray:
    """All singular values of ``J``, descending, without vectors (LAPACK gesdd on a copy: ``J`` is
    left intact; ~P^2 values for the copy plus O(P) workspace). Backward stable: each is within
    ~p(P) eps ||J|| of the exact one, the bound readers use for a spectrum stored without
    residuals."""
    return scipy.linalg.svd(J, compute_uv=False, lapack_driver="gesdd", check_finite=False,
                            overwrite_a=False)


def dense_bottom_block(k: int, P: int, *, widest: bool = False) -> int:
    """Columns of :func:`dense_bottom`'s subspace iteration: k plus a margin (its convergence
    goes like (sigma_k / sigma_{b+1})^2 per step); ``widest``: the most it widens to."""
    b = min(P, max(2 * k, k + 8))
    return min(P, max(8 * k, 4 * b)) if widest else b


def dense_bottom(J: np.ndarray, k: int, *, tol: float = 1e-8, maxiter: int = 200,
                 gen: torch.Generator | None = None, smax: float | None = None):
    r"""The k smallest singular triplets of the square matrix ``J``, which is **overwritten**.

    ``J`` should be column-major (Fortran-ordered, as :func:`materialize_host` makes it); a
    row-major array is copied to column-major first (2 P^2 at the peak). Returns
    ``(S, U, V, smax, info)``: ``S`` ascending (the smallest first), ``U``/``V`` (P, k) numpy
    arrays, ``smax`` the norm used for the stopping rule (``smax`` if given, else a
    power-iteration estimate from R, a lower bound of ||J||), and ``info``: ``steps``, the final
    ``block``, ``max_residual`` (relative to smax), ``patched`` (diagonal entries of R below
    eps ||J||, lifted to it for the solves only: a perturbation within round-off),
    ``factor_seconds`` (QR and norm estimate) and ``iterate_seconds``.

    Subspace iteration with ``b`` = max(2k, k + 8) columns stops once the Ritz values moved by at
    most max(1e-10 s, eps smax) since the previous step and every wanted pair's residuals
    ||R v - s u_R||, ||R^T u_R - s v|| are below tol * smax / 10, or after ``maxiter`` steps. Every
    ``GROW_EVERY`` steps in which the values have not settled or the residuals have not halved
    (a cluster wider than the block converges slowly), the block doubles, up to max(8k, 4b);
    residuals that stop halving at the widest block are the round-off floor (a tol below it is
    the caller's to refuse) and end the iteration. The caller certifies the triplets with fresh
    products of the operator (the formed J is gone by then).
    """
    P = J.shape[0]
    if J.ndim != 2 or J.shape[1] != P:
        raise ValueError(f"J must be square, got shape {J.shape}")
    if not 0 < k <= P:
        raise ValueError(f"k must be in 1..{P}, got {k}")
    A = J if J.flags.f_contiguous else np.asfortranarray(J)
    geqrf, geqrf_lwork, ormqr, trtrs = scipy.linalg.get_lapack_funcs(
        ("geqrf", "geqrf_lwork", "ormqr", "trtrs"), (A,))
    trmm = scipy.linalg.get_blas_funcs("trmm", (A,))
    eps = float(np.finfo(A.dtype).eps)
    t0 = time.perf_counter()
    # (the workspace query by size: geqrf(A, lwork=-1) would copy A, measured 2 P^2 at the peak)
    work, info = geqrf_lwork(P, P)
    lwork = int(work) if info == 0 else 64 * P
    qr, tau, _, info = geqrf(A, lwork=max(lwork, 1), overwrite_a=1)
    if info != 0:  # pragma: no cover (geqrf fails only on bad arguments)
        raise RuntimeError(f"LAPACK geqrf failed (info={info})")
    del A

    g = gen if gen is not None else torch.Generator().manual_seed(0)

    def randn(n):
        return np.asfortranarray(torch.randn(P, n, generator=g, dtype=torch.float64).numpy()
                                 .astype(qr.dtype))

    if smax is None:  # a few block power steps on R^T R: a lower bound of ||R|| = ||J||
        X = np.linalg.qr(randn(min(4, P)))[0]
        for _ in range(30):
            X = np.linalg.qr(trmm(1.0, qr, trmm(1.0, qr, X), trans_a=1))[0]
        smax = float(np.linalg.svd(trmm(1.0, qr, X), compute_uv=False)[0])
    smax = max(float(smax), float(np.finfo(qr.dtype).tiny))

    # R may be exactly singular (a zero diagonal entry): lift tiny pivots to eps ||J|| for the
    # solves only (a backward perturbation of the size of round-off; Rayleigh-Ritz uses true R)
    d = qr.diagonal().copy()
    lift = np.flatnonzero(np.abs(d) < eps * smax)
    qr[lift, lift] = np.where(d[lift] < 0, -eps * smax, eps * smax)

    t1 = time.perf_counter()
    b = dense_bottom_block(k, P)
    Y = np.linalg.qr(randn(b))[0]
    b_max = dense_bottom_block(k, P, widest=True)
    before, history, since_growth = None, [], 0
    steps = 0
    for steps in range(1, maxiter + 1):
        # one step of inverse iteration on each side: L = orth(R^{-T} Y), then Y = orth(R^{-1} L)
        L = _solve(trtrs, qr, Y, trans=1)
        S, Ub, Vb, res = _ritz(qr, L, Y, k, trmm, d, lift)
        worst = float(res.max())
        history.append(worst)
        since_growth += 1
        settled = before is not None and bool(
            np.all(np.abs(S - before) <= np.maximum(1e-10 * S, eps * smax)))
        # stalled: no halving over GROW_EVERY steps (the round-off floor, or a cluster that the
        # block cannot separate: widened first, accepted as the floor once the block is widest)
        stalled = since_growth > GROW_EVERY and worst >= 0.5 * history[-1 - GROW_EVERY]
        if settled and (worst <= 0.1 * tol * smax or (stalled and b >= b_max)):
            break
        before = S
        Y = _solve(trtrs, qr, L, trans=0)
        if since_growth >= GROW_EVERY and (stalled or not settled) and b < b_max:
            b = min(b_max, 2 * b)  # a cluster wider than the block: widen it
            Y = np.asfortranarray(np.linalg.qr(np.hstack([Y, randn(b - Y.shape[1])]))[0])
            before, since_growth = None, 0
    qr[lift, lift] = d[lift]
    # the left vectors of J: U = Q U_R, Q from the reflectors below R's diagonal
    lw = int(ormqr("L", "N", qr, tau, Ub, -1)[1][0])
    U, _, info = ormqr("L", "N", qr, tau, Ub, max(lw, 1), overwrite_c=0)
    if info != 0:  # pragma: no cover
        raise RuntimeError(f"LAPACK ormqr failed (info={info})")
    return S, np.asarray(U), Vb, smax, {"steps": steps, "block": b, "patched": int(lift.size),
                                         "max_residual": float(res.max()) / smax,
                                         "factor_seconds": t1 - t0,
                                         "iterate_seconds": time.perf_counter() - t1}


def dense_bottom_torch(J: np.ndarray, k: int, *, tol: float, gen: torch.Generator, device,
                       dtype):
    """:func:`dense_bottom` with S, U, V handed back as torch tensors on ``device`` in ``dtype``
    (the operator's); returns ``(S, U, V, smax, info)``. ``J`` is overwritten."""
    S, U, V, smax, info = dense_bottom(J, k, tol=tol, gen=gen)
    S, U, V = (torch.from_numpy(np.ascontiguousarray(a)).to(device, dtype) for a in (S, U, V))
    return S, U, V, smax, info


def _solve(trtrs, R, X, *, trans):
    """orth(R^{-1} X) (trans=0) or orth(R^{-T} X) (trans=1), R upper triangular in place."""
    Z, info = trtrs(R, X, lower=0, trans=trans)
    if info:  # pragma: no cover (every tiny pivot was lifted)
        raise RuntimeError(f"LAPACK trtrs failed (info={info})")
    return np.asfortranarray(np.linalg.qr(Z)[0])


def _ritz(R, L, Y, k, trmm, d, lift):
    """Two-sided Rayleigh-Ritz for the bottom of the upper-triangular R on the orthonormal left
    and right subspaces L, Y: L^T R Y = P s Q^T, u_R = L p, v = Y q, the smallest k, with both
    residuals max(||R v - s u_R||, ||R^T u_R - s v||) per pair. (A one-sided u_R = R v / s is noise
    for sigma near round-off: the left subspace comes from its own inverse iteration.) R's lifted
    pivots are restored to their true values for the products and lifted again on return."""
    lifted = R[lift, lift].copy()
    R[lift, lift] = d[lift]
    try:
        RY = trmm(1.0, R, Y)
        Pm, s, Qt = np.linalg.svd(L.T @ RY)
        idx = np.arange(s.shape[0] - 1, s.shape[0] - 1 - k, -1)
        S = s[idx]
        Ub = np.asfortranarray(L @ Pm[:, idx])
        Vb = Y @ Qt[idx].T
        res = np.maximum(np.linalg.norm(RY @ Qt[idx].T - Ub * S, axis=0),
                         np.linalg.norm(trmm(1.0, R, Ub, trans_a=1) - Vb * S, axis=0))
    finally:
        R[lift, lift] = lifted
    return S, Ub, Vb, res
