"""Region counts, exactly-1 counts and alignment, gathered into one JSON-ready summary."""

from __future__ import annotations

import torch

from ..linalg.regions import EPSILONS, alignment, region_counts


def spectrum_summary(S: torch.Tensor, *, P: int, U=None, V=None, structural=None,
                     epsilons=EPSILONS, exact_tol: float = 1e-12) -> dict:
    """Counts of chaotic / bulk / stable at each eps over the singular values ``S`` (complete only
    when all P are given), how many are 1 to within ``exact_tol`` (numerically exact), the
    structural prediction, and the mean alignment |u_i . v_i| in the bulk."""
    S = torch.as_tensor(S).double().cpu()
    out = {"n_sigma": int(S.numel()), "complete": int(S.numel()) == P, "P": P,
           "sigma_max": float(S.max()) if S.numel() else None,
           "sigma_min": float(S.min()) if S.numel() else None,
           "regions": [region_counts(S, e, P=P).as_dict() for e in epsilons],
           "numerically_one": int(((S - 1).abs() <= exact_tol).sum())}
    if structural is not None:
        out["structural"] = structural.as_dict()
    if U is not None and V is not None:
        a = alignment(U.double().cpu(), V.double().cpu())
        bulk = (S - 1).abs() <= 1e-3
        out["alignment_mean_bulk"] = float(a[bulk].mean()) if bool(bulk.any()) else None
        out["alignment_mean_other"] = float(a[~bulk].mean()) if bool((~bulk).any()) else None
    return out
