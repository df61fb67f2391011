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
