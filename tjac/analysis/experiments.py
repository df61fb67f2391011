r"""The paper's experiments on singular directions: shared pieces, movement and subspace overlap.

Every experiment returns an :class:`AnalysisResult` (arrays with dimension names, parameters and
key numbers as JSON attributes) that :meth:`AnalysisResult.commit` stores as ``analyses/<name>`` of a
run (:meth:`tjac.store.Writer.commit_analysis`) and :meth:`tjac.query.Run.analysis` reads back.

Bases are (P, k) matrices of orthonormal columns (numpy or torch); a solve's right singular vectors
are the rows of ``run.vectors(which, ...)[1]``, so pass their transpose.

* :func:`movement` — |v_i . (theta_T - theta_0)| for each direction and each region's share of
  ||theta_T - theta_0||^2 (the paper's "training barely moves along the bulk").
* :func:`subspace_overlap` — principal-angle cosines cos(theta_j) between two subspaces, the
  geodesic (Grassmann) distance ||theta||_2 and the same numbers for random subspaces of the same
  dimensions (the baseline: two random k-planes in R^P have mean cos^2 ~ k/P).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import numpy as np

ORTHO_TOL = 1e-6  # max |B^T B - I| accepted as orthonormal (solver vectors: ~1e-12)


@dataclass(frozen=True)
class AnalysisResult:
    """One experiment's outcome: ``arrays`` maps a name to (ndarray, dimension names); ``attrs``
    are JSON parameters and key numbers."""

    name: str
    arrays: dict
    attrs: dict = field(default_factory=dict)

    def __getitem__(self, key):
        return self.arrays[key][0]


# -- validation ----------------------------------------------------------------------------------
def as_numpy(x, what: str) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.dtype == object or not np.issubdtype(x.dtype, np.number):
        raise ValueError(f"`{what}` must be a numeric array, got dtype {x.dtype}")
    return x.astype(np.float64)


def check_basis(B, P: int, what: str = "basis", *, tol: float = ORTHO_TOL,
                orthonormal: bool = True) -> np.ndarray:
    """(P, k) with orthonormal columns (``orthonormal=False``: unit columns), as float64 numpy;
    one-line ValueError otherwise."""
    B = as_numpy(B, what)
    if B.ndim == 1:
        B = B[:, None]
    if B.ndim != 2 or B.shape[0] != P:
        raise ValueError(f"`{what}` must have shape (P, k) = ({P}, k), got {B.shape}")
    if B.shape[1] == 0:
        raise ValueError(f"`{what}` is empty (k = 0)")
    if B.shape[1] > P:
        raise ValueError(f"`{what}` has k = {B.shape[1]} > P = {P} columns")
    if not np.isfinite(B).all():
        raise ValueError(f"`{what}` has non-finite entries")
    if not orthonormal:
        err = float(np.abs(np.linalg.norm(B, axis=0) - 1).max())
        if not err <= tol:
            raise ValueError(f"`{what}` must have unit columns: max | ||b_i|| - 1 | = {err:.2e} "
                             f"> {tol:g}")
        return B
    err = float(np.abs(B.T @ B - np.eye(B.shape[1])).max())
    if not err <= tol:
        raise ValueError(f"`{what}` must have orthonormal columns: max |B^T B - I| = {err:.2e} "
                         f"> {tol:g} (orthonormalize it, e.g. numpy.linalg.qr)")
    return B


def check_eps(eps, what: str = "eps") -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"`{what}` must be a positive finite number, got {eps!r}")
    return float(eps)


def check_eps_grid(grid, what: str = "eps_grid") -> np.ndarray:
    g = as_numpy(grid, what).reshape(-1)
    if g.size == 0:
        raise ValueError(f"`{what}` is empty")
    if not (np.isfinite(g).all() and (g > 0).all()):
        raise ValueError(f"`{what}` must hold positive finite values, got {g[~(g > 0) | ~np.isfinite(g)][:3].tolist()}")
    return g


def regions_of(sigma, eps: float) -> np.ndarray:
    """0 chaotic (sigma > 1 + eps), 1 bulk (|sigma - 1| <= eps), 2 stable (sigma < 1 - eps)."""
    s = np.asarray(sigma, np.float64)
    return np.where(s > 1 + eps, 0, np.where(s < 1 - eps, 2, 1)).astype(np.int64)


REGION_NAMES = ("chaotic", "bulk", "stable")


def random_basis(P: int, k: int, rng: int, *, within=None) -> np.ndarray:
    """An orthonormal (P, k) basis of a uniformly random k-plane (QR of a Gaussian, sign-fixed);
    ``within`` (P, m) orthonormal: a random k-plane inside its span."""
    gen = np.random.default_rng(rng)
    if within is None:
        Q, R = np.linalg.qr(gen.standard_normal((P, k)))
    else:
        Q, R = np.linalg.qr(within @ gen.standard_normal((within.shape[1], k)))
    return Q * np.sign(np.where(np.diag(R) == 0, 1, np.diag(R)))


def complement_basis(Q: np.ndarray, k: int, rng: int) -> np.ndarray:
    """An orthonormal (P, k) basis of a random k-plane inside the orthogonal complement of span(Q)
    (Gaussian projected out of Q twice, then QR)."""
    gen = np.random.default_rng(rng)
    G = gen.standard_normal((Q.shape[0], k))
    for _ in range(2):
        G = G - Q @ (Q.T @ G)
    B, R = np.linalg.qr(G)
    return B * np.sign(np.where(np.diag(R) == 0, 1, np.diag(R)))


# -- 4. movement -----------------------------------------------------------------------------------
def movement(delta, V, *, sigma=None, eps: float = 1e-3) -> AnalysisResult:
    r"""How far training moved along each direction.

    ``delta`` = theta_T - theta_0 (P,), ``V`` (P, k) orthonormal (right singular vectors), ``sigma``
    (k,) their singular values (optional: then each region's share is reported).

    Returns arrays ``coefficient`` c_i = |v_i . delta|, ``share`` c_i^2 / ||delta||^2, ``sigma``,
    ``region`` (0 chaotic, 1 bulk, 2 stable at ``eps``); attrs: ``delta_norm``, ``explained``
    (sum of shares: the part of ||delta||^2 inside span V; 1 for a complete basis) and
    ``share_<region>``. With a partial basis the rest of ||delta||^2 is ``share_outside``.
    """
    d = as_numpy(delta, "delta").reshape(-1)
    V = check_basis(V, d.size, "V")
    eps = check_eps(eps)
    nrm2 = float(d @ d)
    c = V.T @ d
    share = c ** 2 / nrm2 if nrm2 > 0 else np.zeros_like(c)
    arrays = {"coefficient": (np.abs(c), ("direction",)), "share": (share, ("direction",))}
    attrs = {"P": int(d.size), "n_directions": int(V.shape[1]), "delta_norm": math.sqrt(nrm2),
             "explained": float(share.sum()), "share_outside": float(max(0.0, 1 - share.sum())),
             "eps": eps}
    if sigma is not None:
        s = as_numpy(sigma, "sigma").reshape(-1)
        if s.size != V.shape[1]:
            raise ValueError(f"`sigma` must have one value per column of V ({V.shape[1]}), got {s.size}")
        reg = regions_of(s, eps)
        arrays["sigma"] = (s, ("direction",))
        arrays["region"] = (reg, ("direction",))
        for i, n in enumerate(REGION_NAMES):
            attrs[f"share_{n}"] = float(share[reg == i].sum())
            attrs[f"n_{n}"] = int((reg == i).sum())
    return AnalysisResult("movement", arrays, attrs)


# -- 5. subspace overlap --------------------------------------------------------------------------
def principal_cosines(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Cosines of the principal angles between span A and span B (orthonormal), descending."""
    s = np.linalg.svd(A.T @ B, compute_uv=False)
    return np.clip(s, 0.0, 1.0)[: min(A.shape[1], B.shape[1])]


def _angles(A, B):
    """Principal angles, ascending, accurate for small angles too (scipy's sin/cos mix)."""
    import scipy.linalg

    return np.sort(scipy.linalg.subspace_angles(A, B))


def subspace_overlap(A, B, *, n_random: int = 20, rng: int = 0, name: str = "overlap",
                     angles=None) -> AnalysisResult:
    r"""Principal angles between span A and span B (both (P, k_a), (P, k_b) orthonormal).

    Returns arrays ``cosine`` cos(theta_j) (descending, min(k_a, k_b) values), ``angle`` theta_j
    (ascending, radians) and ``random_cosine`` (the mean over ``n_random`` pairs of uniformly random
    subspaces of the same dimensions, seeded by ``rng``); attrs ``geodesic`` = ||theta||_2 (the
    Grassmann distance), ``mean_cos2`` (= ||A^T B||_F^2 / min k) and their random baselines
    ``random_geodesic`` (mean, ``_std``) and ``random_mean_cos2``. ``angles`` (ascending radians)
    may be passed when already computed (:meth:`tjac.query.Run.compare`).
    """
    A = check_basis(A, as_numpy(A, "A").shape[0], "A")
    B = check_basis(B, A.shape[0], "B")
    if isinstance(n_random, bool) or not isinstance(n_random, int) or n_random < 0:
        raise ValueError(f"`n_random` must be a non-negative integer, got {n_random!r}")
    P, ka, kb = A.shape[0], A.shape[1], B.shape[1]
    th = _angles(A, B) if angles is None else np.sort(np.asarray(angles, np.float64))
    cos = principal_cosines(A, B)  # descending; from the SVD of A^T B (accurate near 0 too)
    rc, rg, r2 = [], [], []
    for i in range(n_random):
        RA, RB = random_basis(P, ka, (rng, i, 0)), random_basis(P, kb, (rng, i, 1))
        t = _angles(RA, RB)
        c = principal_cosines(RA, RB)
        rc.append(c)
        rg.append(float(np.linalg.norm(t)))
        r2.append(float((c ** 2).mean()))
    m = min(ka, kb)
    attrs = {"P": P, "k_a": ka, "k_b": kb, "geodesic": float(np.linalg.norm(th)),
             "mean_cos2": float((cos ** 2).mean()), "mean_cos": float(cos.mean()),
             "n_random": n_random, "rng": rng,
             "random_geodesic": float(np.mean(rg)) if rg else None,
             "random_geodesic_std": float(np.std(rg)) if rg else None,
             "random_mean_cos2": float(np.mean(r2)) if r2 else None,
             "random_mean_cos2_expected": max(ka, kb) / P}
    arrays = {"cosine": (cos, ("angle",)), "angle": (th, ("angle",)),
              "random_cosine": (np.mean(rc, 0) if rc else np.full(m, np.nan), ("angle",))}
    return AnalysisResult(name, arrays, attrs)


def overlap_runs(run, other, which: str = "top", k: int | None = None, *, n_random: int = 20,
                 rng: int = 0, name: str | None = None) -> AnalysisResult:
    """:func:`subspace_overlap` of two stored runs' right singular subspaces at one end (``top``:
    chaotic, ``bottom``: stable), angles from :meth:`tjac.query.Run.compare`."""
    if which not in ("top", "bottom"):
        raise ValueError(f"unknown which {which!r}; expected 'top' or 'bottom'")
    for r in (run, other):
        _need_solve(r, which)
    angles = run.compare(other, which=which, k=k)
    k1, k2 = run._k(which, k), other._k(which, k)
    A = run.vectors(which, slice(0, k1))[1].T
    B = other.vectors(which, slice(0, k2))[1].T
    out = subspace_overlap(A, B, n_random=n_random, rng=rng, angles=angles,
                           name=name or f"overlap-{which}")
    out.attrs.update(which=which, run=run.id, other=other.id)
    return out


def _need_solve(run, which: str) -> None:
    try:
        run.sigma(which)
    except KeyError:
        raise ValueError(f"run {run.id!r} has no committed {which} solve; compute one with "
                         f"`tjac run ... --k-{which} K` (tjac.runner.run_analysis(..., "
                         f"k_{which}=K))") from None
