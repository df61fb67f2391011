"""Region counts, exactly-1 counts and alignment, gathered into one JSON-ready summary.

Every count respects the certificates (see :mod:`tjac.analysis.regions`): a value s certified to r
is only known to lie in [s - r, s + r], and a partial spectrum leaves the other values unknown, so
each count comes with its bounds and the number of ambiguous values, and is ``None`` at face value
when not all P values are known.
"""

from __future__ import annotations

import torch

from ..linalg import bound_only
from .regions import EPSILONS, alignment, interval_counts, region_counts


def spectrum_summary(S: torch.Tensor, *, P: int, certificate=None, U=None, V=None,
                     structural=None, epsilons=EPSILONS, exact_tol: float = 1e-12) -> dict:
    """Counts of chaotic / bulk / stable at each eps over the known singular values ``S`` (out of
    ``P``), each certified to ``certificate`` (r per value, |s - sigma_true| <= r; ``None``: the
    values are taken as exact); how many are 1 to within ``exact_tol`` (numerically exact: at face
    value when all P are known, certainly, possibly, ambiguous); how many are upper bounds only
    (:func:`tjac.linalg.bound_only`); the structural prediction; and the mean alignment
    |u_i . v_i| in the bulk."""
    S = torch.as_tensor(S).double().cpu().reshape(-1)
    r = (torch.zeros_like(S) if certificate is None
         else torch.as_tensor(certificate).double().cpu().reshape(-1))
    n = int(S.numel())
    complete = n == P
    bound = bound_only(S, r) if n else torch.zeros(0, dtype=torch.bool)
    imin = int(S.argmin()) if n else None
    face, surely, maybe, amb = interval_counts(S, 1 - exact_tol, 1 + exact_tol, certificate=r)
    out = {"n_sigma": n, "complete": complete, "P": P,
           "sigma_max": float(S.max()) if n else None,
           "sigma_min": float(S[imin]) if n else None,
           "sigma_min_bound_only": bool(bound[imin]) if n else None,
           "n_bound_only": int(bound.sum()),
           "certificate_max": float(r.max()) if n else None,
           "regions": [region_counts(S, e, P=P, certificate=r).as_dict() for e in epsilons],
           "exact_tol": exact_tol,
           "numerically_one": face if complete else None,
           "numerically_one_min": surely,
           "numerically_one_max": maybe + (P - n),
           "numerically_one_ambiguous": amb}
    if structural is not None:
        out["structural"] = structural.as_dict()
    if U is not None and V is not None:
        a = alignment(U.double().cpu(), V.double().cpu())
        bulk = (S - 1).abs() <= 1e-3
        out["alignment_mean_bulk"] = float(a[bulk].mean()) if bool(bulk.any()) else None
        out["alignment_mean_other"] = float(a[~bulk].mean()) if bool((~bulk).any()) else None
    return out


def trivial_spectrum(scalar: float | None, spectrum: dict, *, both_ends: bool,
                     tol: float) -> list[str]:
    """Warnings for a spectrum that says nothing about training (a run's summary ``warnings``).

    ``scalar``: c of :class:`tjac.operator.CheckReport` (J v = c v on the adjoint check's random
    probes: J = c I, found without a product of its own). Else, with both ends solved
    (``both_ends``) or every value known, a ``spectrum`` (:func:`spectrum_summary`) whose sigma_max
    and sigma_min agree to their certificates (or ``tol`` sigma_max): J = s Q with Q orthogonal."""
    if scalar is not None:
        what = "J = I" if abs(scalar - 1) <= 1e-12 else f"J = {scalar:.12g} I"
        return [f"{what} (J v = {'v' if what == 'J = I' else 'c v'} on the adjoint check's random "
                f"probes to round-off): every singular value is {abs(scalar):.12g}, so the "
                f"spectrum says nothing about training; the optimizer's update does not depend "
                f"on theta through its derivative (e.g. a sign-based update such as Lion's, whose "
                f"derivative is zero)"]
    hi, lo = spectrum.get("sigma_max"), spectrum.get("sigma_min")
    if hi is None or lo is None or not (both_ends or spectrum.get("complete")):
        return []
    slack = max(2 * (spectrum.get("certificate_max") or 0.0), tol * hi)
    if hi - lo <= slack:
        return [f"every singular value is {hi:.12g} (sigma_max - sigma_min = {hi - lo:.1e}, "
                f"within the certificates): J is {hi:.6g} times an orthogonal matrix and its "
                f"spectrum says nothing about training"]
    return []
