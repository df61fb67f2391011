"""Pick the replay backend and block width by measuring them on a few steps of the run.

The pick does not flip on timing noise: the default (``auto``'s backend at the widest block) is
kept unless another candidate is at least ``MARGIN`` (20%) cheaper per vector by the median of
``REPEATS`` timed replays (:func:`decide`); a replay too small to be worth timing
(P x T <= ``TINY_PARAM_STEPS``) is not timed at all and takes the default, so small runs are
bitwise reproducible; ``compiled`` is measured only when the solve's projected replays outlast a
compile, and picked only when its projected saving pays for its compiles.
"""

from __future__ import annotations

import logging
import statistics
import time

import torch

from .._prefer import prefer
from ..trajectory import Trajectory
from .support import BACKENDS, supported

log = logging.getLogger(__name__)


def _make(prob, trajectory, name):
    from . import make

    return make(prob, trajectory, name)


def _resolve(prob, name):
    from . import resolve

    return resolve(prob, name)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# widening stops once this many widths in a row cost more than WORSE times the best per vector:
# where blocks do not pay (measured: a 1e5-parameter CNN through torch.func, 0.21 s per vector
# alone, 0.18 at 4, 0.43 at 24) the widest ones take minutes and the memory of a wide block's
# activations; where they pay (the fused MLP) the cost falls with every width and all are measured
WORSE, WORSE_IN_A_ROW = 1.25, 2
WIDEN_SECONDS = 5.0  # ... and only when measuring the next width would take longer than this
MARGIN = 0.2         # another candidate replaces the default only when this much cheaper (median)
REPEATS = 3          # timed replays per candidate (after one warm-up); the median is its cost
# P x T at or below which nothing is timed: one replay of the tests' recipes (P x T ~ 1e3-1e4)
# takes 10-30 ms here, where timing noise decides between near-equal candidates and any pick
# costs about the same; the default is taken, and the run is bitwise reproducible
TINY_PARAM_STEPS = 20_000
COMPILE_SECONDS = 20.0  # the least a cold compile of one direction took here (20-70 s)


def stop_widening(costs) -> bool:
    """Whether the last ``WORSE_IN_A_ROW`` per-vector costs (in order of width) are all above
    ``WORSE`` times the best so far."""
    if len(costs) <= WORSE_IN_A_ROW:
        return False
    best = min(costs)
    return all(c > WORSE * best for c in costs[-WORSE_IN_A_ROW:])


def preference(backends, blocks, default_backend) -> list:
    """The fixed order in which candidates (backend, width) are preferred: the default backend
    first, then the others in :data:`BACKENDS` order with ``compiled`` last; each backend's widths
    widest first (fewer replays for the same cost). The first is the default."""
    names = [default_backend] + [b for b in BACKENDS if b in backends and b != default_backend
                                 and b != "compiled"]
    if "compiled" in backends and default_backend != "compiled":
        names.append("compiled")
    widths = sorted({int(k) for k in blocks}, reverse=True)
    return [(b, w) for b in names for w in widths]


def decide(table: dict, order, margin: float = MARGIN):
    """The pick among measured costs ``table`` ({backend: {width: s}}, widths as strings or ints):
    the first candidate of ``order`` (:func:`preference`) whose cost is within ``margin`` of the
    cheapest (:func:`tjac._prefer.prefer`). So the default (first) stays unless another is at
    least ``margin`` cheaper, and noise smaller than that never changes the pick. Returns
    ``(backend, width)`` (width an int), or None when nothing was measured."""
    costs = {(b, int(w)): float(c) for b, row in table.items() for w, c in row.items()}
    return prefer(costs, list(order), margin)


def _default_backend(prob, backends):
    auto = _resolve(prob, "auto")
    return auto if auto in backends else next(b for b in BACKENDS if b in backends)


def autotune(prob, *, blocks=(1, 4, 8, 16, 32, 64, 128), backends=None, steps: int = 10,
             compile_threshold_s: float = COMPILE_SECONDS, trajectory=None,
             products: int | None = None, repeats: int = REPEATS, margin: float = MARGIN,
             tiny: int = TINY_PARAM_STEPS, measure=None) -> dict:
    """Pick the replay backend and block width: the default unless another is clearly cheaper.

    The default is ``auto``'s backend (``fused`` where it applies, else ``eager``; among
    ``backends`` when given, else the first of them) at the widest of ``blocks``. Nothing is timed
    when there is one candidate, or when P x T <= ``tiny`` (:data:`TINY_PARAM_STEPS`): the default
    is taken, so small runs give bitwise-identical results run after run. Otherwise each
    candidate (backend, width) runs ``steps`` JVP steps on the recipe's first batches, once to
    warm up and ``repeats`` times timed; its cost is the median per vector and step, and the pick
    is :func:`decide`'s: the first candidate in :func:`preference` order within ``margin`` (20%)
    of the cheapest, so another candidate replaces the default only when at least 20% cheaper.

    The widths of a backend are measured from narrow to wide and stop after ``WORSE_IN_A_ROW``
    in a row cost more than ``WORSE`` times its best per vector (:func:`stop_widening`; skipped
    with the reason) when measuring the next would take over ``WIDEN_SECONDS``.
    ``double-backward`` is measured at the pick's width (and at width 1 when asked for); a model
    autograd cannot differentiate twice is skipped with the reason. ``compiled`` (a C++ compiler
    present) is measured at the pick's width only when the solve's projected replays at the pick
    (``products`` vectors, default P, of T steps) take longer than ``compile_threshold_s`` (the
    least a compile takes, 20 s here), and picked only when, besides the margin, the projected
    saving over the solve exceeds its compiles (the measured one, once per direction).

    ``measure(backend, width)`` (tests) replaces the timing: it returns seconds per vector and
    step, the warm-up first, then the repeats. Returns ``{"backend", "block", "steps",
    "repeats", "reason", "seconds_per_vector_step": {backend: {width: median s}}, "skipped":
    {...}}``; the runner stores it in the run's provenance and reuses it on resume;
    :meth:`tjac.TrainingJacobian.autotune` applies it to an operator."""
    skipped: dict = {}
    if backends is None:
        backends = []
        for b in BACKENDS:
            why = supported(prob, b)
            if why:
                skipped[b] = why
            else:
                backends.append(b)
    for b in backends:
        _resolve(prob, b)  # unknown or unsupported names raise here
    if not backends:
        raise ValueError("autotune needs at least one replay backend")
    widths = sorted(set(int(k) for k in blocks))
    if not widths or widths[0] < 1:
        raise ValueError(f"`blocks` must be positive integers, got {blocks!r}")
    repeats = max(1, int(repeats))
    steps = max(1, min(steps, prob.num_steps))
    default = _default_backend(prob, backends)
    order = preference(backends, widths, default)
    table: dict = {}

    def result(pick, reason):
        log.info("autotune: %s at width %d (%s)", pick[0], pick[1], reason)
        return {"backend": pick[0], "block": int(pick[1]), "steps": steps, "repeats": repeats,
                "reason": reason, "seconds_per_vector_step": table, "skipped": skipped}

    if len(backends) == 1 and len(widths) == 1:
        return result(order[0], "the only candidate: nothing timed")
    if backends == ["compiled"]:  # asked for by name: timing each width would cost a compile each
        return result(order[0], "compiled, asked for by name, at the widest width (nothing "
                                "timed: each width compiles anew)")
    work = prob.num_params * prob.num_steps
    if work <= tiny:
        for b in backends:
            if b != default:
                skipped[b] = f"not timed: P x T = {work:,} <= {tiny:,}"
        return result(order[0], f"the default: P x T = {work:,} <= {tiny:,}, too small to "
                                f"time (nothing timed: the same pick every run)")
    if trajectory is None:  # the JVPs below start from theta_0 and need nothing else
        trajectory = Trajectory.start_only(prob, prob.init_theta())

    def timed(name, k):
        rp = _make(prob, trajectory, name)
        gen = torch.Generator().manual_seed(0)  # not zeros: `compiled` checks itself against eager
        V = torch.randn(k, prob.num_params, generator=gen, dtype=torch.float64).to(prob.device,
                                                                                 prob.dtype)
        out = []
        for _ in range(1 + repeats):  # the warm-up compiles `compiled`, fills `fused`'s primal
            _sync(prob.device)        # cache (every replay after a run's first reads that cache)
            t = time.perf_counter()
            rp.jvp(V, steps=steps)
            _sync(prob.device)
            out.append((time.perf_counter() - t) / (k * steps))
        return out

    measure = measure or timed
    warm: dict = {}

    def cost(name, k):
        got = [float(x) for x in measure(name, k)]
        c = statistics.median(got[1:]) if len(got) > 1 else got[0]
        table.setdefault(name, {})[str(k)] = c
        warm[(name, k)] = got[0]
        log.info("autotune: %s at width %d: %.3g s per vector and step (median of %d)", name, k,
                 c, max(1, len(got) - 1))
        return c

    at_best = ("compiled", "double-backward")  # measured at the pick's width only
    for name in [b for b in backends if b not in at_best]:
        for i, k in enumerate(widths):
            cost(name, k)
            # (cheap widths are all measured: a stop there would only add timing noise to the pick)
            nxt = widths[i + 1] if i + 1 < len(widths) else None
            if nxt is not None and stop_widening(list(table[name].values())) \
                    and 2 * table[name][str(k)] * nxt * steps > WIDEN_SECONDS:
                skipped[f"{name} wider than {k}"] = (
                    f"not measured: {', '.join(map(str, widths[i + 1:]))} (the last "
                    f"{WORSE_IN_A_ROW} widths cost more than {WORSE:g}x the best per vector)")
                break
    pick = decide(table, order, margin)
    if "double-backward" in backends:
        k = pick[1] if pick else widths[-1]
        try:  # (and alone, where asked for: what single-vector solves cost on it)
            for w in sorted({k} | ({1} if 1 in widths else set())):
                cost("double-backward", w)
        except Exception as e:  # noqa: BLE001 - a model autograd cannot differentiate twice
            if backends == ["double-backward"]:  # asked for by name: the reason is the error
                raise
            table.pop("double-backward", None)
            skipped["double-backward"] = f"double backward failed: {type(e).__name__}: {e}"[:300]
        pick = decide(table, order, margin)
    if "compiled" in backends:
        pick = _compiled(prob, pick, widths, products, compile_threshold_s, table, warm, skipped,
                         order, margin, steps, cost)
    if pick is None:
        return result(order[0], "the default: nothing could be measured")
    d, pct = order[0], _pct(margin)
    if pick == d:
        why = f"the default: no other candidate is {pct} or more cheaper per vector"
    elif d[0] in table and str(d[1]) in table[d[0]]:
        why = f"{pct} or more cheaper per vector than the default {d[0]} at width {d[1]}"
    else:
        why = (f"the first preferred within {pct} of the cheapest (the default {d[0]} at width "
               f"{d[1]} was not measured)")
    return result(pick, f"{why} (medians of {repeats} timed replays)")


def _pct(margin):
    return f"{100 * margin:g}%"


def _compiled(prob, pick, widths, products, threshold, table, warm, skipped, order, margin,
              steps, cost):
    """Measure ``compiled`` at the pick's width where the solve could pay for its compile, and
    keep it only where the projected saving does; returns the pick."""
    k = pick[1] if pick else widths[-1]
    n = prob.num_params if products is None else int(products)
    c_pick = table[pick[0]][str(k)] if pick else None
    solve_s = None if c_pick is None else c_pick * n * prob.num_steps
    if solve_s is None or solve_s < threshold:
        skipped["compiled"] = (f"the solve's replays are projected at {solve_s or 0:.1f} s < "
                               f"{threshold:g} s (a compile): compiling would not pay off")
        return pick
    log.info("autotune: compiling the compiled backend's JVP at width %d (20-70 s on CPU; the "
             "solve's replays are projected at %.0f s)", k, solve_s)
    try:
        c = cost("compiled", k)
    except Exception as e:  # noqa: BLE001 - inductor failures are environment problems
        table.pop("compiled", None)
        skipped["compiled"] = f"torch.compile failed: {type(e).__name__}: {e}"[:300]
        return pick
    compile_s = max(0.0, (warm[("compiled", k)] - c) * k * steps)
    log.info("autotune: compiled in %.1f s", compile_s)
    best = decide(table, order, margin)
    if best is None or best[0] != "compiled":  # (not a pick the others' costs alone would not make)
        return pick
    saving = (c_pick - c) * n * prob.num_steps
    if saving <= 2 * compile_s:  # the VJP compiles once more when the solve first uses it
        skipped["compiled"] = (f"measured, not picked: it saves ~{saving:.0f} s over the solve's "
                               f"projected {n:,} products, less than its compiles "
                               f"(~{2 * compile_s:.0f} s, JVP and VJP)")
        return pick
    return best
