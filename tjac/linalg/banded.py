r"""The bottom Ritz triplets of block GKL's projected matrix B in O(n b) memory.

Without restarts, block GKL (:mod:`tjac.linalg.lanczos`) gives A V = U B with B block upper
bidiagonal up to round-off: block column j holds R_j (upper triangular, U_j's rows) and the coupling
to U_{j-1} (S_{j-1}^T, lower triangular), so B is an upper band matrix of bandwidth ~b. Full
reorthogonalization also records round-off couplings to the earlier blocks U_0 .. U_{j-2}; they
are dropped here and their Frobenius norm is kept (``BandedB.dropped``): by Weyl's inequality each
singular value moves by at most that much, and it enters the residual estimate.

The k smallest triplets come from shift-invert subspace iteration on the Jordan-Wielandt form
H = [[0, B], [B^T, 0]] (eigenvalues +-sigma, eigenvectors [x; +-y]), its rows and columns
interleaved so that H is a band of width 2b + 1: Z <- orth((H - mu I)^{-1} Z) with a banded LU
(LAPACK ``gbtrf``, O(n b^2) once, O(n b) per column), 2m columns (m = k + ``OVERSAMPLE``); then
two-sided Rayleigh-Ritz on B with the m leading directions of Z's u- and v-halves (each spans m
directions once converged; the rest is noise that pairs into spurious small values: measured on
a training Jacobian's B) (X^T B Y, m x m), and the
residuals ||B y - s x||, ||B^T x - s y|| from the band itself, until they reach ``rtol * s_max``
(or stop improving). The shift mu = ``SHIFT`` s_max sits above the round-off cluster: plain inverse
iteration (mu = 0) on a B with values far below eps s_max (exact breakdowns, graded triangular
factors) amplifies one direction by up to 1e80 and loses the others to round-off (measured on a
random banded B with two zero pivots: residuals O(1)); with the shift every member of the
cluster is amplified alike. Each sweep gains |sigma_i - mu| / |sigma_{m+1} - mu|. s_max comes from a
few block power steps on B^T B (its relative accuracy only scales the tolerance).

Why not LAPACK's banded eigensolver on the Jordan-Wielandt form (``scipy.linalg.eig_banded``,
``?sbevx``): with eigenvectors it forms the (2n x 2n) matrix of its reduction to tridiagonal form
(18 GB at n = 24,000), and that O(n^2 b) reduction would run at every check.

Measured (block 16, k = 8; bottom-8 of the band extraction against ``torch.linalg.svdvals`` of the
full B of an in-RAM GKL, all relative to s_max; tests/test_spill.py asserts them with margin):

=========================================  ====  =======  ==================  ===================
B of                                        n    dropped  |s_band - s_dense|  residual vs full B
=========================================  ====  =======  ==================  ===================
synthetic P = 400 (3 zeros, tail to 1e-8)   368  9.2e-16  1.1e-18             4.3e-16
synthetic P = 800                           720  1.2e-15  4.8e-19             1.5e-16
training Jacobian, tiny recipe (P = 310)    288  5.9e-15  1.1e-15             3.0e-14
=========================================  ====  =======  ==================  ===================

so what the band drops is round-off, and the values agree with the dense extraction to round-off.
Memory: the band and H's LU take ~(3 (2u + 1) + u) n values (u = 31 for b = 16: ~50 MB at
n = 12,000) against n^2 for B (1.2 GB) and ~3 n^2 more for its dense SVD.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ._base import small_svd

# extra vectors of the subspace iteration (rate |sigma_k - mu| / |sigma_{k+16} - mu|; measured on
# the tiny recipe's B, whose bottom is no cluster: 8 stalled at 3e-9 s_max, 16 reached 9e-14)
OVERSAMPLE = 16
CHECK_EVERY = 4     # sweeps between Rayleigh-Ritz checks (a sweep is cheaper than a check)
SHIFT = 1e-12       # the shift of the inverse, relative to s_max
DENSE_BELOW = 128   # a B this small is decomposed densely


class BandedB:
    """B of an unrestarted block GKL, appended block column by block column (``C``: the new
    column's coupling to all earlier U blocks; ``R``: to the new U block)."""

    def __init__(self):
        self.widths: list[int] = []
        self.diag: list[torch.Tensor] = []
        self.upper: list[torch.Tensor | None] = []
        self._dropped_sq = 0.0
        self.n = 0
        self.warm = None  # the last extraction's subspace: the next one starts from it

    def append(self, C: torch.Tensor, R: torch.Tensor) -> None:
        w = R.shape[0]
        if self.widths:
            wp = self.widths[-1]
            self.upper.append(C[-wp:].detach().to("cpu", torch.float64).clone())
            if C.shape[0] > wp:
                self._dropped_sq += float(C[:-wp].double().pow(2).sum())
        else:
            self.upper.append(None)
        self.diag.append(R.detach().to("cpu", torch.float64).clone())
        self.widths.append(w)
        self.n += w

    @property
    def dropped(self) -> float:
        """Frobenius norm of the couplings left out of the band (round-off of full reorth.)."""
        return math.sqrt(self._dropped_sq)

    def _blocks(self):
        off = np.cumsum([0] + self.widths)
        for j, w in enumerate(self.widths):
            yield off[j], off[j], self.diag[j]
            if self.upper[j] is not None:
                yield off[j - 1], off[j], self.upper[j]

    def band(self) -> tuple[np.ndarray, int]:
        """(ab, u): LAPACK upper band storage ab[u + i - j, j] = B[i, j], u the bandwidth."""
        u = 0
        for r0, c0, blk in self._blocks():
            nz = blk.nonzero()
            if nz.shape[0]:
                u = max(u, int((c0 + nz[:, 1] - r0 - nz[:, 0]).max()))
        ab = np.zeros((u + 1, self.n))
        for r0, c0, blk in self._blocks():
            M = blk.numpy()
            i, j = np.nonzero(M)
            keep = (c0 + j) - (r0 + i) <= u
            ab[u + r0 + i[keep] - c0 - j[keep], c0 + j[keep]] = M[i[keep], j[keep]]
        return ab, u

    def dense(self) -> torch.Tensor:
        B = torch.zeros(self.n, self.n, dtype=torch.float64)
        for r0, c0, blk in self._blocks():
            B[r0:r0 + blk.shape[0], c0:c0 + blk.shape[1]] = blk
        return B


def _matmul(ab, u, Y, trans=False):
    """B Y (or B^T Y) from upper band storage, one diagonal at a time: O(n u m)."""
    n = ab.shape[1]
    out = np.zeros_like(Y)
    for d in range(u + 1):  # diagonal d: B[i, i + d] = ab[u - d, i + d]
        vals = ab[u - d, d:]
        if not trans:
            out[:n - d] += vals[:, None] * Y[d:]
        else:
            out[d:] += vals[:, None] * Y[:n - d]
    return out


def _jw_lu(ab, u, mu):
    """LU (LAPACK gbtrf) of the Jordan-Wielandt matrix H = [[0, B], [B^T, 0]] - mu I, rows and
    columns interleaved (u_i -> 2i, v_j -> 2j + 1) so that H is banded, kl = ku = 2u + 1."""
    from scipy.linalg import lapack

    n = ab.shape[1]
    w = 2 * u + 1
    H = np.zeros((3 * w + 1, 2 * n))  # gbtrf storage: H[i, j] at [2w + i - j, j]
    for d in range(u + 1):  # B[i, i + d] = ab[u - d, i + d]: H[2i, 2i + 2d + 1] and its transpose
        vals = ab[u - d, d:]
        i = np.arange(n - d)
        H[2 * w + 2 * i - (2 * i + 2 * d + 1), 2 * i + 2 * d + 1] = vals
        H[2 * w + (2 * i + 2 * d + 1) - 2 * i, 2 * i] = vals
    H[2 * w] = -mu
    lu, piv, info = lapack.dgbtrf(H, w, w)
    if info != 0:  # pragma: no cover (mu on an eigenvalue: measure zero)
        raise np.linalg.LinAlgError(f"banded LU failed (info {info})")
    return lambda Z: lapack.dgbtrs(lu, w, w, Z, piv)[0]


def _orth(Y):
    Y = Y / np.maximum(np.abs(Y).max(axis=0), np.finfo(Y.dtype).tiny)  # 1/|theta - mu| growth
    return np.linalg.qr(Y)[0]


def _split(Z):
    return Z[0::2], Z[1::2]


def _residuals(ab, u, s, X, Y):
    r1 = np.linalg.norm(_matmul(ab, u, Y) - X * s, axis=0)
    r2 = np.linalg.norm(_matmul(ab, u, X, trans=True) - Y * s, axis=0)
    return np.hypot(r1, r2)


def _ritz(ab, u, Z, k, m):
    """Triplets from the subspace Z of H: one-sided Rayleigh-Ritz on each half (variational: the
    values of B Y are >= B's, so unconverged directions cannot pose as small values, as they do in
    a two-sided X^T B Y), paired in order; then, if it does better, two-sided Rayleigh-Ritz on the
    first m pairs (rotations within a cluster of equal values). Returns (s, X, Y, ext) of the k
    smallest."""
    Zx, Zy = _split(Z)
    Ys = np.linalg.qr(Zy)[0]
    Xs = np.linalg.qr(Zx)[0]
    _, sr, qt = np.linalg.svd(_matmul(ab, u, Ys), full_matrices=False)
    _, sl, pt = np.linalg.svd(_matmul(ab, u, Xs, trans=True), full_matrices=False)
    Y = Ys @ qt.T[:, ::-1][:, :m]
    X = Xs @ pt.T[:, ::-1][:, :m]
    s = sr[::-1][:m]
    sign = np.sign(np.einsum("ij,ij->j", X, _matmul(ab, u, Y)))
    X = X * np.where(sign == 0, 1.0, sign)
    ext = _residuals(ab, u, s, X, Y)
    a, s2, bt = np.linalg.svd(X.T @ _matmul(ab, u, Y))
    order = np.argsort(s2)
    X2, Y2, s2 = X @ a[:, order], Y @ bt.T[:, order], s2[order]
    ext2 = _residuals(ab, u, s2[:k], X2[:, :k], Y2[:, :k])
    if ext2.max() < ext[:k].max():
        return s2[:k], X2[:, :k], Y2[:, :k], ext2
    return s[:k], X[:, :k], Y[:, :k], ext[:k]


def _norm_estimate(ab, u, gen, steps=8):
    n = ab.shape[1]
    Y = _orth(gen.standard_normal((n, 4)))
    for _ in range(steps):
        Y = _orth(_matmul(ab, u, _matmul(ab, u, Y), trans=True))
    return float(np.linalg.svd(_matmul(ab, u, Y), compute_uv=False)[0])


def bottom_triplets(band: BandedB, k: int, *, rtol: float = 1e-13, maxiter: int = 200,
                    seed: int = 0):
    """The k smallest singular triplets of B (the band; see the module doc).

    Returns (s ascending (k,), X (n, k), Y (n, k), ext (k,), s_max) with B y_i ~ s_i x_i and
    ext_i = hypot(||B y - s x||, ||B^T x - s y||) from the band, all torch float64 on the CPU."""
    n = band.n
    k = min(k, n)
    if n <= max(DENSE_BELOW, 3 * (k + OVERSAMPLE)):
        X, s, Yt = small_svd(band.dense())
        want = torch.arange(n - 1, n - 1 - k, -1)
        return s[want], X[:, want], Yt.T[:, want], torch.zeros(k, dtype=torch.float64), float(s[0])
    ab, u = band.band()
    gen = np.random.default_rng(seed)
    smax = _norm_estimate(ab, u, gen)
    # shift-invert on H (see the module doc): eigenvalues +-sigma of H nearest mu come first; mu
    # sits above the round-off cluster so its members are amplified alike (no collapse onto one)
    mu = SHIFT * smax
    solve = _jw_lu(ab, u, mu)
    m = min(k + OVERSAMPLE, n)
    Z = gen.standard_normal((2 * n, 2 * m))
    if band.warm is not None and band.warm.shape[1] == 2 * m:  # B grew: old rows, new random rows
        Z[:band.warm.shape[0]] = band.warm
        Z[band.warm.shape[0]:] *= 1e-3
    Z = np.linalg.qr(Z)[0]
    best, stale = np.inf, 0
    for sweep in range(1, maxiter + 1):
        Z = _orth(solve(Z))
        if sweep % CHECK_EVERY and sweep != maxiter:
            continue
        s, Xr, Yr, ext = _ritz(ab, u, Z, k, m)
        worst = float(ext.max())
        if worst <= rtol * smax:
            break
        stale = stale + 1 if worst > 0.96 * best else 0
        best = min(best, worst)
        if stale >= 3:  # converged as far as round-off lets it
            break
    band.warm = Z
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    return t(s[:k]), t(Xr[:, :k]), t(Yr[:, :k]), t(ext), smax
