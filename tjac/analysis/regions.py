"""The paper's split of the spectrum: chaotic (s > 1 + eps), bulk (|s - 1| <= eps), stable (s < 1 - eps).

Counts respect the certificates. A value s certified to r (|s - sigma_true| <= r, r = hypot of
its two residuals) lies somewhere in [s - r, s + r]: it is certainly in a region when that whole
interval is, and *ambiguous* when the interval meets two regions (|s - boundary| < r). A partial
spectrum (only some of the P values known, e.g. the top-k and bottom-k) says nothing about the
others: they are *unknown* and may lie in any region. So every count is an interval
``[<region>_min, <region>_max]``; ``<region>`` itself is the count with each known value taken at
face value when all P are known, and ``None`` otherwise (never a count of values nobody computed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

EPSILONS = (1e-2, 1e-3, 1e-4)  # a run's summary: counts over its known values at each
# ... and the matrix-free counts' default (tjac analyze --what density, tjac scale): resolving 1 -+ 1e-4 by
# quadrature would take ~sigma_max / 1e-4 Lanczos steps per probe
COUNT_EPSILONS = EPSILONS[:2]
REGIONS = ("chaotic", "bulk", "stable")


@dataclass(frozen=True)
class Regions:
    eps: float
    chaotic: int | None        # counts at face value, when all P values are known; else None
    bulk: int | None
    stable: int | None
    chaotic_min: int           # values certainly in the region (their whole interval is)
    chaotic_max: int           # ... possibly in it: + ambiguous ones that reach it + unknown ones
    bulk_min: int
    bulk_max: int
    stable_min: int
    stable_max: int
    ambiguous: int             # known values within their certificate of a boundary 1 -+ eps
    n: int                     # how many singular values are known
    P: int                     # how many there are
    complete: bool             # n == P (the dense path)

    @property
    def unknown(self) -> int:
        return self.P - self.n

    @property
    def exact(self) -> bool:
        """All P known and none ambiguous: the counts are certified."""
        return self.complete and self.ambiguous == 0

    def bounds(self, region: str) -> tuple[int, int]:
        return getattr(self, f"{region}_min"), getattr(self, f"{region}_max")

    def as_dict(self) -> dict:
        d = {"eps": self.eps, "n": self.n, "P": self.P, "complete": self.complete,
             "exact": self.exact, "ambiguous": self.ambiguous, "unknown": self.unknown}
        for name in REGIONS:
            d[name] = getattr(self, name)
            d[f"{name}_min"], d[f"{name}_max"] = self.bounds(name)
        return d

    def describe(self) -> str:
        """One line: ``chaotic 12, bulk 500 (499..501), stable 98`` or ``chaotic >= 32, bulk
        unknown, stable >= 32``."""
        return ", ".join(f"{name} {format_count(self.as_dict(), name, sep=' ')}" for name in REGIONS)


def format_count(d: dict, name: str, *, sep: str = "") -> str:
    """What is known of one count of a :meth:`Regions.as_dict` (or of any dict with ``name``,
    ``name_min``, ``name_max``): ``12`` (exact), ``12 (11..13)`` (all known, some ambiguous),
    ``>=32`` (a lower bound: some values unknown) or ``unknown`` (nothing known)."""
    if f"{name}_min" not in d:  # a summary written before counts had bounds
        return str(d[name])
    lo, hi, face = d[f"{name}_min"], d[f"{name}_max"], d.get(name)
    if lo == hi:
        return str(lo)
    if face is not None:
        return f"{face} ({lo}..{hi})"
    return f">={sep}{lo}" if lo else "unknown"


def _certificate(S: torch.Tensor, certificate) -> torch.Tensor:
    if certificate is None:
        return torch.zeros_like(S)
    r = torch.as_tensor(certificate).double().to(S.device).reshape(-1)
    if r.shape != S.shape:
        raise ValueError(f"`certificate` must hold one value per singular value ({S.numel()}), "
                         f"got {r.numel()}")
    return r.abs()


def interval_counts(S, lo: float, hi: float, *, certificate=None) -> tuple[int, int, int, int]:
    """(at face value, certainly, possibly, ambiguous) counts of values in the closed interval
    [lo, hi], each value s being anywhere in [s - r, s + r]."""
    S = torch.as_tensor(S).double().reshape(-1)
    r = _certificate(S, certificate)
    face = int(((S >= lo) & (S <= hi)).sum())
    surely = (S - r >= lo) & (S + r <= hi)
    maybe = (S + r >= lo) & (S - r <= hi)
    return face, int(surely.sum()), int(maybe.sum()), int((maybe & ~surely).sum())


def region_counts(S: torch.Tensor, eps: float, *, P: int | None = None,
                  certificate=None) -> Regions:
    """Region counts of the known singular values ``S`` out of ``P`` (default: ``S`` is all of
    them), each certified to ``certificate`` (r per value; default 0, values taken as exact)."""
    S = torch.as_tensor(S).double().reshape(-1)
    if not eps > 0:
        raise ValueError(f"`eps` must be a positive number, got {eps!r}")
    r = _certificate(S, certificate)
    n = int(S.numel())
    P = n if P is None else int(P)
    if P < n:
        raise ValueError(f"{n} singular values given for P = {P}")
    lo, hi = 1 - eps, 1 + eps
    # which regions each value's interval [s - r, s + r] meets
    in_chaotic = S + r > hi
    in_stable = S - r < lo
    in_bulk = (S + r >= lo) & (S - r <= hi)
    meets = in_chaotic.int() + in_stable.int() + in_bulk.int()
    sure = meets == 1
    unknown = P - n
    complete = unknown == 0
    face = {"chaotic": int((S > hi).sum()), "stable": int((S < lo).sum())}
    face["bulk"] = n - face["chaotic"] - face["stable"]
    kw = {}
    for name, m in (("chaotic", in_chaotic), ("bulk", in_bulk), ("stable", in_stable)):
        kw[name] = face[name] if complete else None
        kw[f"{name}_min"] = int((m & sure).sum())
        kw[f"{name}_max"] = int(m.sum()) + unknown
    return Regions(eps=float(eps), ambiguous=int((~sure).sum()), n=n, P=P, complete=complete, **kw)


def alignment(U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """|u_i . v_i| per triplet (1 in the bulk, where J acts like the identity)."""
    return (U * V).sum(0).abs()
