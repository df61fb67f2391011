"""The paper's split of the spectrum counted from products only: the bulk (|σ − 1| ≤ ε) and the
chaotic (σ > 1 + ε) and stable (σ < 1 − ε) regions, each with its guaranteed bracket, on the
quadrature of :mod:`tjac.linalg.quadrature` (stochastic Lanczos quadrature on JᵀJ, which knows
nothing of the paper's regions). Its names are re-exported here for the analyses' users."""

from __future__ import annotations

import math

from ..linalg.quadrature import (Density, IntervalCount, Quadrature, ResolutionError,
                                 count_in_interval, slq, spectral_density, steps_needed)

__all__ = ["Density", "IntervalCount", "Quadrature", "ResolutionError", "bulk_size",
           "count_in_interval", "count_regions", "slq", "spectral_density", "steps_needed"]


def bulk_size(op, eps: float, **kw) -> IntervalCount:
    """How many σ satisfy |σ − 1| ≤ ``eps`` (:func:`count_in_interval`)."""
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise ValueError(f"`eps` must be > 0, got {eps!r}")
    return count_in_interval(op, max(1.0 - eps, 0.0), 1.0 + eps, **kw)


def count_regions(q: Quadrature, eps: float, *, confidence: float = 0.95) -> dict:
    """Chaotic (σ > 1 + ε), bulk (|σ − 1| ≤ ε) and stable (σ < 1 − ε) counts of one quadrature
    ``q`` (:func:`slq`), each an :class:`IntervalCount`."""
    if not 0 < eps < 1:
        raise ValueError(f"`eps` must be in (0, 1), got {eps!r}")
    lo_stable = 1.0 - eps
    return {"chaotic": q.count(1.0 + eps * (1 + 1e-12), math.inf, confidence=confidence),
            "bulk": q.count(max(1.0 - eps, 0.0), 1.0 + eps, confidence=confidence),
            "stable": q.count(0.0, lo_stable * (1 - 1e-12), confidence=confidence)}
