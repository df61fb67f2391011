"""The operator protocol, results, errors and shared helpers of the solvers.

An operator is anything with ``shape`` (P, P), ``dtype``, ``device``, ``matmat(X[P, k])`` and
``rmatmat(Y[P, k])`` returning torch tensors. :class:`DenseOperator` wraps a matrix (tests, toys).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch


class DenseOperator:
    """A dense matrix behind the operator protocol, with product counters."""

    def __init__(self, A: torch.Tensor):
        self.A = A
        self.shape = tuple(A.shape)
        self.dtype = A.dtype
        self.device = A.device
        self.num_matvecs = 0
        self.num_rmatvecs = 0

    def matmat(self, X):
        out = self.A @ X  # counted once done: a refused block is no product
        self.num_matvecs += X.shape[1]
        return out

    def rmatmat(self, Y):
        out = self.A.T @ Y
        self.num_rmatvecs += Y.shape[1]
        return out


class DiagonalOperator:
    """diag(d) behind the operator protocol, with product counters: its singular values are |d|
    in closed form, and a product costs O(P k) with no P x P matrix (solver checks at any P)."""

    def __init__(self, d: torch.Tensor):
        self.d = d
        self.shape = (d.shape[0], d.shape[0])
        self.dtype = d.dtype
        self.device = d.device
        self.num_matvecs = 0
        self.num_rmatvecs = 0

    def matmat(self, X):
        self.num_matvecs += X.shape[1]
        return self.d[:, None] * X

    def rmatmat(self, Y):
        self.num_rmatvecs += Y.shape[1]
        return self.d[:, None] * Y


class Counted:
    """Counts the columns pushed through an operator, whatever the operator counts itself."""

    def __init__(self, op):
        self.op = op
        self.shape, self.dtype, self.device = tuple(op.shape), op.dtype, op.device
        self.num_matvecs = 0
        self.num_rmatvecs = 0

    def matmat(self, X):
        self.num_matvecs += X.shape[1]
        return self.op.matmat(X)

    def rmatmat(self, Y):
        self.num_rmatvecs += Y.shape[1]
        return self.op.rmatmat(Y)


@dataclass(frozen=True)
class KrylovResult:
    """What an iterative solver hands back to :func:`tjac.linalg.svd`: the wanted Ritz triplets
    (``S``, ``U``, ``V``; possibly fewer than asked when it stopped early), their ``residuals``
    (k, 2) — fresh products when ``fresh``, else the recurrence's estimates —, the per-check
    ``history`` and ``smax``, the largest Ritz value (an estimate of ||J||); ``budget_note``: why the
    solve stopped before the pass that would have outgrown its memory budget (None: it did not)."""

    S: torch.Tensor
    U: torch.Tensor
    V: torch.Tensor
    residuals: torch.Tensor
    fresh: bool
    history: tuple
    smax: float
    budget_note: str | None = None


@dataclass(frozen=True)
class SVDResult:
    """k singular triplets J v_i = s_i u_i, ordered as requested (``top``: descending; ``bottom``:
    ascending). ``residuals[i] = (||J v_i - s_i u_i||, ||J^T u_i - s_i v_i||)`` from fresh products;
    |s_i - sigma_true| <= hypot(*residuals[i]). ``U``, ``V`` are (P, k)."""

    S: torch.Tensor
    U: torch.Tensor
    V: torch.Tensor
    residuals: torch.Tensor
    converged: torch.Tensor
    num_matvecs: int
    num_rmatvecs: int
    wall_time: float
    method: str
    which: str
    tol: float
    norm_estimate: float
    history: tuple = field(default=())
    k: int | None = None           # triplets requested (a short result has fewer rows)
    floor: float | None = None     # estimated round-off floor of the residuals, relative to s_max
    plan: dict | None = None       # the up-front plan (tjac.linalg.plan.SolvePlan.as_dict())

    @property
    def certificate(self) -> torch.Tensor:
        """r_i = sqrt(||J v - s u||^2 + ||J^T u - s v||^2) (bounds |s_i - sigma_true|)."""
        return self.residuals.norm(dim=1)

    @property
    def bound_only(self) -> torch.Tensor:
        """Triplets whose certificate is >= 0.1 s: s is an upper bound on sigma, not a measurement
        (typical of the near-null cluster at the bottom, certified only relative to ||J||)."""
        return bound_only(self.S, self.certificate)

    @property
    def all_converged(self) -> bool:
        """Every requested triplet is present and certified."""
        short = self.k is not None and int(self.S.shape[0]) < self.k
        return not short and bool(self.converged.all())


BOUND_ONLY = 0.1  # r >= BOUND_ONLY * s: the value is an upper bound, not a measurement


def bound_only(S, certificate) -> torch.Tensor:
    """True where a triplet's certificate r (|s - sigma_true| <= r) is at least a tenth of s itself:
    sigma_true lies in [max(0, s - r), s + r], so s bounds it from above but does not measure it."""
    S, r = torch.as_tensor(S), torch.as_tensor(certificate)
    return r >= BOUND_ONLY * S.abs()


class ConvergenceError(RuntimeError):
    """Raised when not every requested triplet certified; ``.result`` holds what was found."""

    def __init__(self, msg: str, result: SVDResult):
        super().__init__(msg)
        self.result = result


class BudgetError(ConvergenceError, MemoryError):
    """A solve stopped before the step that would have outgrown its memory budget (the message
    names the bytes needed and available); ``.result`` holds what was found."""


def orthonormalize(X: torch.Tensor, basis: torch.Tensor | None = None, *, gen=None,
                   drop_tol: float = 1e-10):
    """Orthonormalize X's columns against ``basis`` and each other (Gram-Schmidt, twice).

    Returns (Q, C, R) with X = basis C + Q R, R upper triangular. A column that vanishes after
    projection (relative to its own norm: the Krylov space closed on an invariant subspace) gets
    R[j, j] = 0 and a random direction orthogonal to everything, so the recurrence continues in
    the complement instead of amplifying round-off.
    """
    P, b = X.shape
    nb = 0 if basis is None else basis.shape[1]
    # fast path: block classical Gram-Schmidt twice, then QR; falls back on breakdown
    norms = X.norm(dim=0)
    Y, C = X, X.new_zeros((nb, b))
    for _ in range(2):
        if nb:
            c = basis.T @ Y
            Y = Y - basis @ c
            C = C + c
    Q, R = torch.linalg.qr(Y)
    if nb:
        c = basis.T @ Q
        Q2, R2 = torch.linalg.qr(Q - basis @ c)
        C, Q, R = C + c @ R, Q2, R2 @ R
    d = R.diagonal().abs()
    if bool((d > drop_tol * norms.clamp_min(torch.finfo(X.dtype).tiny)).all()):
        return Q, C, R
    return _orthonormalize_columns(X, basis, gen=gen, drop_tol=drop_tol)


def _orthonormalize_columns(X, basis, *, gen, drop_tol):
    P, b = X.shape
    nb = 0 if basis is None else basis.shape[1]
    C = X.new_zeros((nb, b))
    R = X.new_zeros((b, b))
    Q = X.new_empty((P, b))
    for j in range(b):
        x = X[:, j].clone()
        x_norm = float(x.norm())
        for _ in range(3):
            if nb:
                c = basis.T @ x
                x -= basis @ c
                C[:, j] += c
            if j:
                r = Q[:, :j].T @ x
                x -= Q[:, :j] @ r
                R[:j, j] += r
        n = float(x.norm())
        if n > drop_tol * x_norm and n > 0:
            R[j, j] = n
            Q[:, j] = x / n
            continue
        for _ in range(5):  # breakdown: a random direction orthogonal to everything so far
            z = torch.randn(P, generator=gen, dtype=torch.float64).to(X.device, X.dtype)
            for _ in range(2):
                if nb:
                    z -= basis @ (basis.T @ z)
                if j:
                    z -= Q[:, :j] @ (Q[:, :j].T @ z)
            if float(z.norm()) > 1e-3:
                break
        Q[:, j] = z / z.norm()
    return Q, C, R


def fresh_residuals(op, S, U, V, block: int = 128):
    """(||J v - s u||, ||J^T u - s v||) per triplet, from new products (counted on ``op``)."""
    res = []
    for i in range(0, S.shape[0], block):
        sl = slice(i, i + block)
        JV = op.matmat(V[:, sl])
        JtU = op.rmatmat(U[:, sl])
        res.append(torch.stack([(JV - U[:, sl] * S[sl]).norm(dim=0),
                                (JtU - V[:, sl] * S[sl]).norm(dim=0)], 1))
    return torch.cat(res) if res else S.new_zeros((0, 2))


def values_unchanged(values, before, tol: float, smax: float) -> bool:
    """The wanted values of two checks agree to the certificate's scale: max |a - c| <= 4 tol s_max
    (the confirmation of a certified block narrower than k: no missed copy moved them)."""
    return before is not None and max(abs(a - c) for a, c in zip(values, before)) <= 4 * tol * smax


class Timer:
    def __init__(self):
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0


def small_svd(B: torch.Tensor):
    """Full SVD of a small dense matrix on the CPU via LAPACK gesdd (gesvd if it fails).

    torch.linalg.svd on CPU measured 10-15x slower than scipy's gesdd on 1000-4000 square
    matrices here; the result goes back to B's device and dtype. Returns (X, s, Yt).
    """
    import numpy as np
    import scipy.linalg

    A = B.detach().cpu().numpy()
    try:
        X, s, Yt = scipy.linalg.svd(A, lapack_driver="gesdd", check_finite=False)
    except np.linalg.LinAlgError:  # pragma: no cover (gesdd's rare failure to converge)
        X, s, Yt = scipy.linalg.svd(A, lapack_driver="gesvd", check_finite=False)
    back = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(B.device, B.dtype)  # noqa: E731
    return back(X), back(s), back(Yt)
