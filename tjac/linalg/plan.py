"""The up-front plan of a solve: expected products, memory and time of each path, and the pick.

Estimates (measured on this package's solvers, float64; see BENCHMARKS.md "Solve plans"):

* ``dense``: P forward products in wide blocks. Memory: J (P^2) plus LAPACK gesdd's copy, U, V^T
  and workspace (measured peak 6.2 P^2 values above J at P = 3000): ``DENSE_FACTOR`` P^2 values.
* ``dense``, bottom only (:func:`tjac.linalg.dense.dense_bottom`), when the full SVD does not fit:
  J is overwritten by its QR and the bottom comes from inverse subspace iteration on R: ~P^2
  values plus a few P x b blocks; P products plus 2k fresh ones for the certificates.
* ``lanczos``, bottom: the basis must nearly exhaust the non-bulk values: measured 1.23 P products
  (block 16, k = 32, P = 9,610). Memory: both bases (2 P n), one more while a block is appended,
  and the full SVD of the n x n projected matrix at the end (like the dense path's): at n ~ P,
  ``LANCZOS_BOTTOM_FACTOR`` P^2 values.
* ``lanczos``, top: a basis of ``max_basis`` vectors per side, restarted; products about two
  bases' worth.
* ``randomized``, top: l = k + 8 columns per pass, about ``RANDOMIZED_PASSES`` passes of 2 l
  products (measured 4-8 on the paper's spectra); memory: what its peak holds
  (:func:`tjac.linalg.randomized.peak_values`: four P x (passes l) arrays, the bases in storage
  allocated once and the Q factor of the Rayleigh-Ritz step's QR, plus a few P x l blocks). The solve
  itself sizes its storage to the budget and stops, with the partial result, before a pass that
  would outgrow it (:class:`tjac.linalg.BudgetError`).
* The top by cost: randomized needs the most products but in the widest blocks; single-vector
  Lanczos the fewest (``LANCZOS_TOP_PRODUCTS``: top-16 at tol 1e-6 on the paper's net, Lanczos
  at block 1/2/4/8 used 0.45/0.51/0.68/0.91 of randomized's products). Where replays do not get
  cheaper per vector in blocks (measured: a 1e5-parameter BatchNorm CNN through torch.func, 0.167 s
  per vector and step alone, 0.191 s at block 4, 0.496 s at block 24), ``auto`` takes Lanczos at the block that
  minimizes products x seconds per vector, given the operator's measured costs per block
  (:meth:`tjac.TrainingJacobian.vector_costs`, from its autotune), when that is predicted at least
  ``LANCZOS_TOP_MARGIN`` times cheaper.

* ``lanczos`` spilled (bottom, :mod:`tjac.linalg.spill`): the same products; both bases on disk
  (2 P n values, n ~ products / 2), in RAM a read chunk, a few P x b blocks, the k Ritz vectors and
  the band of B (:mod:`tjac.linalg.banded`).

The bottom of a training Jacobian is a near-null cluster: product-only methods need about as many
products as the dense path and (without spilling the basis) more memory, so ``auto`` takes the dense
path for the bottom whenever it fits (the full SVD, else the bottom only from J's QR; in-RAM
Lanczos needs more products and more memory than either, so it is only taken when asked for), then
Lanczos with its basis spilled to disk when the disk (``disk_bytes`` free where it spills) holds
it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .dense import dense_bottom_block
from .randomized import peak_values as randomized_peak

DENSE_FACTOR = 8            # values of P^2 at the dense path's peak (J, its copy, U, V^T, work)
DENSE_BOTTOM_FACTOR = 1     # values of P^2 at the bottom-only dense path's peak (J, in place)
LANCZOS_BOTTOM_PRODUCTS = 1.25
LANCZOS_BOTTOM_FACTOR = 10  # values of P^2 at long-basis Lanczos' peak
RANDOMIZED_PASSES = 6
# products of top-k Lanczos at each block width, as a share of randomized block Krylov's (measured:
# top-16, tol 1e-6, the paper's net: 272/308/408/544 against 600; BENCHMARKS.md "User models")
LANCZOS_TOP_PRODUCTS = {1: 0.45, 2: 0.51, 4: 0.68, 8: 0.91}
# ... and Lanczos is taken only where it is predicted this many times cheaper: the shares come from
# one spectrum (on the 1e5 MLP's fused costs, 0.76x predicted: randomized stays, as measured there)
LANCZOS_TOP_MARGIN = 1.5
SPILL_CHUNK_BYTES = 64 * 2**20  # spill.CHUNK_BYTES: one read chunk of a spilled basis
HEADROOM = 0.9              # share of the available memory a plan may use


@dataclass(frozen=True)
class Estimate:
    method: str
    products: int
    bytes: int
    seconds: float | None
    disk_bytes: int = 0     # the spilled path's bases on disk
    spill: bool = False
    bottom_only: bool = False  # dense: J's QR gives the bottom only (no full spectrum)
    block: int | None = None   # the solver's block width, when the plan chose it

    def as_dict(self) -> dict:
        out = {"method": self.method, "products": self.products, "bytes": self.bytes,
               "seconds": self.seconds, "disk_bytes": self.disk_bytes, "spill": self.spill,
               "bottom_only": self.bottom_only}
        if self.block is not None:
            out["block"] = self.block
        return out

    def label(self) -> str:
        if self.spill:
            return f"{self.method} (basis spilled to disk)"
        return f"{self.method} (QR, bottom only)" if self.bottom_only else self.method


@dataclass(frozen=True)
class SolvePlan:
    """What a solve is expected to cost before it starts, and why its method was picked."""

    which: str
    k: int
    P: int
    method: str
    estimate: Estimate
    available_bytes: int | None
    fits: bool
    reason: str
    alternatives: tuple = field(default=())
    disk_free_bytes: int | None = None

    @property
    def spill(self) -> bool:
        """The Lanczos basis goes to disk (:mod:`tjac.linalg.spill`)."""
        return self.estimate.spill

    @property
    def bottom_only(self) -> bool:
        """The dense path factorizes J in place and finds the bottom only
        (:func:`tjac.linalg.dense.dense_bottom`): no full spectrum."""
        return self.estimate.bottom_only

    def as_dict(self) -> dict:
        return {"which": self.which, "k": self.k, "P": self.P, "method": self.method,
                **{f"expected_{n}": v for n, v in self.estimate.as_dict().items()
                   if n not in ("method", "spill")},
                "spill": self.spill, "bottom_only": self.bottom_only,
                "available_bytes": self.available_bytes,
                "disk_free_bytes": self.disk_free_bytes, "fits": self.fits,
                "reason": self.reason, "alternatives": [a.as_dict() for a in self.alternatives]}

    def describe(self) -> str:
        e = self.estimate
        t = f", ~{_duration(e.seconds)}" if e.seconds is not None else ""
        d = f" + ~{_gib(e.disk_bytes)} GiB on disk" if e.spill else ""
        return (f"{self.which}-{self.k}: {e.label()}, ~{e.products:,} products, "
                f"~{_gib(e.bytes)} GiB{d}{t} ({self.reason})")

    def refusal(self) -> str:
        """Why nothing fits: every candidate's estimate against what is available."""
        have = "unknown" if self.available_bytes is None else f"{_gib(self.available_bytes)} GiB"
        disk = ("" if self.disk_free_bytes is None
                else f", {_gib(self.disk_free_bytes)} GiB free on disk")
        cands = ", ".join(f"{e.label()} ~{_gib(e.bytes)} GiB"
                          + (f" + ~{_gib(e.disk_bytes)} GiB on disk" if e.spill else "")
                          for e in (self.estimate,) + tuple(self.alternatives))
        exact = ("" if self.available_bytes is None else
                 f" (needs {self.estimate.bytes:,} bytes; {self.available_bytes:,} bytes "
                 f"available, of which a plan may use {HEADROOM:.0%})")
        return (f"{self.which}-{self.k} of P = {self.P:,} does not fit: {cands}; "
                f"{have} of memory available{disk}{exact}")


def _gib(b: int) -> str:
    return f"{b / 2**30:.2f}" if b < 2**30 else f"{b / 2**30:.1f}"


def _duration(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def estimate(method: str, P: int, k: int, which: str, *, itemsize: int = 8, block: int | None = None,
             max_basis: int | None = None, seconds_per_product: float | None = None,
             spill: bool = False, bottom_only: bool = False) -> Estimate:
    """Expected products and peak solver memory (bytes) of one method (see the module doc);
    ``spill``: long-basis Lanczos for the bottom with its basis on disk (also disk bytes);
    ``bottom_only``: the dense path's bottom from J's QR, in ~P^2 values."""
    disk = 0
    if bottom_only:
        if method != "dense" or which != "bottom":
            raise ValueError("only the dense path's bottom comes from J's QR")
        b = dense_bottom_block(k, P, widest=True)  # (the block widens on a wide cluster)
        products = P + 2 * k
        values = DENSE_BOTTOM_FACTOR * P * P + P * (8 * b + 128)
        seconds = None if seconds_per_product is None else products * seconds_per_product
        return Estimate(method=method, products=int(products), bytes=int(values * itemsize),
                        seconds=seconds, bottom_only=True)
    if spill:
        if method != "lanczos" or which != "bottom":
            raise ValueError("only the bottom's Lanczos basis spills to disk")
        b = block or min(16, P)
        products = min(int(LANCZOS_BOTTOM_PRODUCTS * P) + 4 * k, 2 * P)
        n = min(P, products // 2 + 4 * b)
        u = 2 * b - 1   # half-bandwidth of the banded Jordan-Wielandt form of B (2n x 2n)
        # blocks in RAM, the band's LU in LAPACK storage and the copy scipy makes of it, Ritz vectors
        values = P * (8 * b + 4 * k + 16) + n * ((12 * u + 8) + 6 * (k + 8))
        disk = 2 * P * n * itemsize
        seconds = None if seconds_per_product is None else products * seconds_per_product
        # each basis (U and V) streams through its own read chunk
        return Estimate(method=method, products=int(products),
                        bytes=int(values * itemsize + 2 * min(SPILL_CHUNK_BYTES, disk // 2)),
                        seconds=seconds,
                        disk_bytes=int(disk), spill=True)
    if method == "dense":
        products, values = P, DENSE_FACTOR * P * P
    elif method == "randomized":
        l = min(P, block or (k + 8))
        passes = RANDOMIZED_PASSES * -(-k // min(l, k))
        products = min(P, l * (2 * passes + 1))
        values = randomized_peak(P, l * passes, l)
    elif which == "bottom":
        products = min(int(LANCZOS_BOTTOM_PRODUCTS * P) + 4 * k, 2 * P)
        values = LANCZOS_BOTTOM_FACTOR * P * P
    else:
        b = block or min(16, P)
        n = min(P, max_basis or max(8 * k + 8 * b, 256))
        products = min(2 * P, 4 * n)
        values = 3 * P * n + 7 * n * n
    seconds = None if seconds_per_product is None else products * seconds_per_product
    return Estimate(method=method, products=int(products), bytes=int(values * itemsize),
                    seconds=seconds)


def _top_by_cost(P, k, kw, vector_costs, replay_block):
    """Lanczos at the block width whose products x seconds per vector undercut randomized block
    Krylov's by ``LANCZOS_TOP_MARGIN``, given measured seconds per vector at each replay width
    (``vector_costs``: {width: s}; a solver block wider than the operator's replays runs at
    ``replay_block``; an unmeasured width costs what the widest measured one below it does). None
    when randomized is about as cheap, or the costs do not cover the widths compared."""
    def cost(width):  # at the widest measured width the replays of `width` vectors would use
        w = min(width, replay_block) if replay_block else width
        below = [m for m in vector_costs if m <= w]
        return vector_costs[max(below)] if below else None

    l = min(P, k + 8)
    c_r = cost(l)
    if c_r is None or c_r <= 0:
        return None
    best = None
    for b, share in LANCZOS_TOP_PRODUCTS.items():
        c = cost(b)
        if b <= k and c is not None and LANCZOS_TOP_MARGIN * share * c < c_r \
                and (best is None or share * c < best[1]):
            best = (b, share * c, c)
    if best is None:
        return None
    b, _, c = best
    r = estimate("randomized", P, k, "top", **kw)
    lz = estimate("lanczos", P, k, "top", **{**kw, "block": b})
    products = max(2 * k, int(round(LANCZOS_TOP_PRODUCTS[b] * r.products)))
    e = Estimate(method="lanczos", products=products, bytes=lz.bytes, block=b,
                 seconds=None if kw.get("seconds_per_product") is None
                 else products * kw["seconds_per_product"])
    why = (f"top: Lanczos at block {b}, ~{LANCZOS_TOP_PRODUCTS[b]:.2f} of randomized's products; "
           f"replays cost {c:.3g} s per vector and step at width {b}, {c_r:.3g} s at the width "
           f"randomized's would run at")
    return e, why, r


def plan_solve(P: int, k: int, which: str, *, method: str = "auto", itemsize: int = 8,
               block: int | None = None, seconds_per_product: float | None = None,
               available_bytes: int | None = None, reserved_bytes: int = 0,
               disk_bytes: int | None = None, host_bytes: int | None = None,
               vector_costs: dict | None = None, replay_block: int | None = None) -> SolvePlan:
    """The plan of one solve. ``auto`` picks randomized for the top (dense when 4k >= P) unless
    ``vector_costs`` (measured seconds per vector at each replay width, {width: s}; replays of
    at most ``replay_block`` vectors) say Lanczos is cheaper (:func:`_top_by_cost`; not when
    ``block`` is given), and for
    the bottom the cheapest path that fits in ``available_bytes`` minus ``reserved_bytes`` (the
    trajectory and the replay's own memory): dense, else Lanczos in RAM, else Lanczos with its
    basis spilled to disk when ``disk_bytes`` (free where it spills; None: unknown, no limit) hold
    it. Between the full dense path and the spill: the bottom only from J's QR, which holds J on
    the host (``host_bytes``: the host's free memory when the operator lives on a GPU; default:
    ``available_bytes`` less ``reserved_bytes``). A named method is planned as asked (``lanczos``
    for the bottom spills when only that fits, ``dense`` for the bottom falls back to J's QR);
    ``fits`` says whether it is expected to fit."""
    budget = None if available_bytes is None else int(HEADROOM * available_bytes) - reserved_bytes
    host_budget = budget if host_bytes is None else int(HEADROOM * host_bytes)
    kw = dict(itemsize=itemsize, block=block, seconds_per_product=seconds_per_product)

    def fits(e):
        room = host_budget if e.bottom_only else budget
        return ((room is None or e.bytes <= room)
                and (disk_bytes is None or e.disk_bytes <= HEADROOM * disk_bytes))

    def plan(pick, ok, why, alternatives=()):
        return SolvePlan(which, k, P, pick.method, pick, available_bytes, ok, why,
                         alternatives=tuple(alternatives), disk_free_bytes=disk_bytes)

    spills = which == "bottom" and 4 * k < P
    if method != "auto":
        e = estimate(method, P, k, which, **kw)
        if method == "dense" and which == "bottom" and not fits(e):
            q = estimate(method, P, k, which, bottom_only=True, **kw)
            if fits(q):
                return plan(q, True, "as asked; the full SVD does not fit in memory: the bottom "
                            "only, from J's QR", [e])
            return plan(e, False, "as asked", [q])
        if method == "lanczos" and spills and not fits(e):
            s = estimate(method, P, k, which, spill=True, **kw)
            if fits(s):
                return plan(s, True, "as asked; the basis does not fit in memory: spilled to disk",
                            [e])
            return plan(e, False, "as asked", [s])
        return plan(e, fits(e), "as asked")
    if which == "top" and 4 * k < P:
        if vector_costs and block is None:
            got = _top_by_cost(P, k, kw, {int(w): float(c) for w, c in vector_costs.items()},
                               replay_block)
            if got is not None and fits(got[0]):  # (Lanczos' basis needs more memory)
                e, why, r = got
                return plan(e, True, why, [r])
        e = estimate("randomized", P, k, which, **kw)
        return SolvePlan(which, k, P, "randomized", e, available_bytes, fits(e),
                         "top: randomized block Krylov (measured fastest)")
    cands = [estimate("dense", P, k, which, **kw)]
    if which == "bottom":
        cands.append(estimate("dense", P, k, which, bottom_only=True, **kw))
    if spills:
        cands.append(estimate("lanczos", P, k, which, **kw))
    ok = [e for e in cands if fits(e)]
    if not ok and spills:  # neither dense nor the in-RAM basis: the basis goes to disk
        cands.append(estimate("lanczos", P, k, which, spill=True, **kw))
        ok = [e for e in cands if fits(e)]
    if ok:
        pick = min(ok, key=lambda e: (e.products, e.bytes))
        why = ("J does not fit in memory: the Lanczos basis spills to disk" if pick.spill
               else "the full SVD does not fit in memory: the bottom only, from J's QR"
               if pick.bottom_only
               else "the cheapest certified path that fits in memory" if len(cands) > 1
               else "k is a large share of P")
    else:
        pick, why = min(cands, key=lambda e: e.bytes), "nothing fits in memory"
    return plan(pick, fits(pick), why, [e for e in cands if e is not pick])
