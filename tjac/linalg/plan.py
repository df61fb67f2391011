"""The up-front plan of a solve: expected products, memory and time of each path, and the pick.

Estimates (measured on this package's solvers, float64; see BENCHMARKS.md "Solve plans"):

* ``dense``: P forward products in wide blocks. Memory: J (P^2) plus LAPACK gesdd's copy, U, V^T
  and workspace (measured peak 6.2 P^2 values above J at P = 3000): ``DENSE_FACTOR`` P^2 values.
* ``dense``, bottom only (:func:`tjac.linalg.dense.dense_bottom`), when the full SVD does not fit:
  J is overwritten by its QR and the bottom comes from inverse subspace iteration on R: ~P^2
  values plus a few P x b blocks; P products plus 2k fresh ones for the certificates.
* ``lanczos``, bottom: the basis must nearly exhaust the non-bulk values: measured 1.52 P products
  (``LANCZOS_BOTTOM_PRODUCTS``; block 16, k = 16, P = 4,810). Memory: both bases (2 P n), a copy
  of one while its storage doubles (:class:`tjac.linalg.lanczos.Basis`), and the full SVD of the
  n x n projected matrix at the end (like the dense path's): at n ~ P, ``LANCZOS_BOTTOM_FACTOR``
  P^2 values.
* ``lanczos``, top: a basis of ``max_basis`` vectors per side, restarted; products about two
  bases' worth. Memory: 3 P n values as above (the k result vectors per side, made after the
  last step, fit in the copy's place when n >= 2k) and ``LANCZOS_BLOCK_ARRAYS`` P x b arrays of
  one step (its blocks and their Gram-Schmidt).
* ``randomized``, top: l = k + 8 columns per pass, l products to start and about
  ``RANDOMIZED_PASSES`` passes of 2 l (measured 7-19, median 13, over the committed runs from
  P = 1,060 to 112,810), never more than l + 2P (the basis fills) nor than
  ``RANDOMIZED_MAX_PASSES`` passes (``max_products``, the bound progress reports once past the
  estimate); memory: what its peak holds
  (:func:`tjac.linalg.randomized.peak_values`: five P x (passes l) arrays, the bases in storage
  allocated once and the Q factor of the Rayleigh-Ritz step's QR, plus a few P x l blocks). The solve
  itself sizes its storage to the budget and stops, with the partial result, before a pass that
  would outgrow it (:class:`tjac.linalg.BudgetError`).
* The top by cost: randomized needs the most products but in the widest blocks; single-vector
  Lanczos the fewest (``LANCZOS_TOP_PRODUCTS``: top-16 at tol 1e-6 on the paper's net, Lanczos
  at block 1/2/4/8 used 0.40/0.46/0.63/0.86 of randomized's products). Where replays do not get
  cheaper per vector in blocks (measured: a 1e5-parameter BatchNorm CNN through torch.func, 0.167 s
  per vector and step alone, 0.191 s at block 4, 0.496 s at block 24), ``auto`` takes Lanczos, given
  the operator's measured costs per block (:meth:`tjac.TrainingJacobian.vector_costs`, from its
  autotune), where products x seconds per vector are predicted at least ``LANCZOS_TOP_MARGIN``
  times cheaper than randomized's; of those widths the narrowest within ``LANCZOS_WIDTH_MARGIN``
  (20%) of the cheapest (:func:`tjac._prefer.prefer`: the autotuner's rule, so costs within noise of each other
  never flip the pick).

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

from .._prefer import prefer
from .dense import dense_bottom_block
from .randomized import peak_values as randomized_peak

DENSE_FACTOR = 8            # values of P^2 at the dense path's peak (J, its copy, U, V^T, work)
DENSE_BOTTOM_FACTOR = 1     # values of P^2 at the bottom-only dense path's peak (J, in place)
# The product counts below are measurements committed in benchmarks/results/ (rounded up);
# tests/test_plan_constants.py recomputes each from that JSON and fails when they disagree.
# Bottom Lanczos products / P, the certified run at the largest P (bottom-width64.json: 7,296
# products at P = 4,810 -> 1.52; the plan had 1.25 before that measurement).
LANCZOS_BOTTOM_PRODUCTS = 1.52
LANCZOS_BOTTOM_FACTOR = 10  # values of P^2 at long-basis Lanczos' peak
# P x b arrays of one Lanczos step beside its bases: the operator's input and output blocks,
# Gram-Schmidt's projection and QR factors, A^T U's block (measured: 4.7 blocks of 16 beyond the
# 3 P n term at P = 1e6 on a diagonal operator, bench_memory.py --models basis)
LANCZOS_BLOCK_ARRAYS = 6
# Randomized passes (products = l (2 passes + 1), l = k + 8): the median over the committed top
# runs (scale-top16.json, scale-top16-mid.json, solvers-paper.json, top-products-paper.json:
# 7, 11, 12, 12, 14, 14, 18, 19 passes).
RANDOMIZED_PASSES = 13
# Products of top-k Lanczos at each block width, as a share of randomized block Krylov's
# (top-products-paper.json, benchmarks/bench_top_products.py: top-16, tol 1e-6, the paper's net,
# 240/276/376/512 products against randomized's 600; rounded up to 2 decimals).
LANCZOS_TOP_PRODUCTS = {1: 0.40, 2: 0.46, 4: 0.63, 8: 0.86}
RANDOMIZED_MAX_PASSES = 30  # svd's default maxiter for randomized (times ceil(k / l))
# ... and Lanczos is taken only where it is predicted this many times cheaper: the shares come from
# one spectrum (on the 1e5 MLP's fused costs in operator.json the shares predict 0.65x, just past)
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
    max_products: int | None = None  # at most this many, where the method bounds its products

    def as_dict(self) -> dict:
        out = {"method": self.method, "products": self.products, "bytes": self.bytes,
               "seconds": self.seconds, "disk_bytes": self.disk_bytes, "spill": self.spill,
               "bottom_only": self.bottom_only}
        if self.block is not None:
            out["block"] = self.block
        if self.max_products is not None:
            out["max_products"] = self.max_products
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
        most = (f" (at most {e.max_products:,})"
                if e.max_products is not None and e.max_products != e.products else "")
        return (f"{self.which}-{self.k}: {e.label()}, ~{e.products:,} products{most}, "
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
    most = None
    if method == "dense":
        products, values = P, DENSE_FACTOR * P * P
        most = P
    elif method == "randomized":
        l = min(P, block or (k + 8))
        per = -(-k // min(l, k))  # a block narrower than k takes more passes
        passes = RANDOMIZED_PASSES * per
        # l to start, 2 l per pass (4 l with a narrow block's random directions), until the
        # basis holds all P directions
        most = min(l + 2 * P, l * ((2 if l >= k else 4) * RANDOMIZED_MAX_PASSES * per + 1))
        products = min(most, l * (2 * passes + 1))
        values = randomized_peak(P, l * passes, l)
    elif which == "bottom":
        products = min(int(LANCZOS_BOTTOM_PRODUCTS * P) + 4 * k, 2 * P)
        values = LANCZOS_BOTTOM_FACTOR * P * P
    else:
        b = block or min(16, P)
        n = min(P, max_basis or max(8 * k + 8 * b, 256))
        products = min(2 * P, 4 * n)
        values = 3 * P * n + LANCZOS_BLOCK_ARRAYS * P * b + 7 * n * n
    seconds = None if seconds_per_product is None else products * seconds_per_product
    return Estimate(method=method, products=int(products), bytes=int(values * itemsize),
                    seconds=seconds, max_products=most)


# Lanczos widths compared with each other by the autotuner's rule (tjac.replay.autotune.MARGIN):
# the narrowest (fewest products) within this share of the cheapest prediction
LANCZOS_WIDTH_MARGIN = 0.2


def _top_by_cost(P, k, kw, vector_costs, replay_block, world_size=1):
    """Lanczos at the block width whose products x seconds per vector undercut randomized block
    Krylov's by ``LANCZOS_TOP_MARGIN``, given measured seconds per vector at each replay width
    (``vector_costs``: {width: s}; a solver block wider than the operator's replays runs at
    ``replay_block``; an unmeasured width costs what the widest measured one below it does). None
    when randomized is about as cheap, or the costs do not cover the widths compared.

    Over ``world_size`` ranks a block of ``b`` columns takes as long as the busiest rank's
    ``ceil(b / world_size)`` columns: its seconds per vector are that slice's replay seconds over
    ``b``. Blocks narrower than the world size (single-vector Lanczos on 2 ranks) would leave
    ranks idle and are not candidates (as ``--block`` narrower than the world size is refused)."""
    n = max(1, int(world_size))

    def cost(width):  # at the widest measured width the replays of `width` vectors would use
        w = min(width, replay_block) if replay_block else width
        below = [m for m in vector_costs if m <= w]
        return vector_costs[max(below)] if below else None

    def spread(width):  # seconds per vector of a block of `width` columns over the n ranks
        m = -(-width // n)  # the busiest rank's columns
        c = cost(m)
        return None if c is None else c * m / width

    l = min(P, k + 8)
    c_r = spread(l)
    if c_r is None or c_r <= 0:
        return None
    # Lanczos replaces randomized (the default) only at widths predicted LANCZOS_TOP_MARGIN times
    # cheaper; of those the narrowest (fewest products) within LANCZOS_WIDTH_MARGIN of the
    # cheapest (measured costs within noise of each other do not flip the width). A width below
    # the world size would leave ranks idle: never a candidate.
    pred = {b: share * spread(b) for b, share in LANCZOS_TOP_PRODUCTS.items()
            if n <= b <= k and spread(b) is not None and LANCZOS_TOP_MARGIN * share * spread(b) < c_r}
    b = prefer(pred, sorted(pred), LANCZOS_WIDTH_MARGIN)
    if b is None:
        return None
    c = spread(b)
    r = estimate("randomized", P, k, "top", **kw)
    lz = estimate("lanczos", P, k, "top", **{**kw, "block": b})
    products = max(2 * k, int(round(LANCZOS_TOP_PRODUCTS[b] * r.products)))
    e = Estimate(method="lanczos", products=products, bytes=lz.bytes, block=b,
                 seconds=None if kw.get("seconds_per_product") is None
                 else products * kw["seconds_per_product"])
    over = f" over {n} ranks" if n > 1 else ""
    why = (f"top: Lanczos at block {b}, ~{LANCZOS_TOP_PRODUCTS[b]:.2f} of randomized's products; "
           f"replays cost {c:.3g} s per vector and step at width {b}{over}, {c_r:.3g} s at the "
           f"width randomized's would run at")
    return e, why, r


def plan_solve(P: int, k: int, which: str, *, method: str = "auto", itemsize: int = 8,
               block: int | None = None, seconds_per_product: float | None = None,
               available_bytes: int | None = None, reserved_bytes: int = 0,
               disk_bytes: int | None = None, host_bytes: int | None = None,
               vector_costs: dict | None = None, replay_block: int | None = None,
               world_size: int = 1) -> SolvePlan:
    """The plan of one solve. ``auto`` picks randomized for the top (dense when 4k >= P) unless
    ``vector_costs`` (measured seconds per vector at each replay width, {width: s}; replays of
    at most ``replay_block`` vectors) say Lanczos is cheaper (:func:`_top_by_cost`; not when
    ``block`` is given; over ``world_size`` ranks a block costs its busiest rank's share, and no
    block narrower than the world size is chosen), and for
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
                               replay_block, world_size)
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
