"""Pick the replay backend and block width by measuring them on a few steps of the run."""

from __future__ import annotations

import time

import torch

from ..trajectory import Trajectory
from .support import BACKENDS, supported


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


def stop_widening(costs) -> bool:
    """Whether the last ``WORSE_IN_A_ROW`` per-vector costs (in order of width) are all above
    ``WORSE`` times the best so far."""
    if len(costs) <= WORSE_IN_A_ROW:
        return False
    best = min(costs)
    return all(c > WORSE * best for c in costs[-WORSE_IN_A_ROW:])


def autotune(prob, *, blocks=(1, 4, 8, 16, 32, 64, 128), backends=None, steps: int = 10,
             compile_threshold_s: float = 1.0, trajectory=None) -> dict:
    """Pick the replay backend and block width with the lowest measured cost per vector-step.

    Each (backend, block) pair runs ``steps`` JVP steps on the recipe's first batches (after one
    warm-up pass). ``double-backward`` is measured only at the best width of ``eager``/``fused``,
    and at width 1 when that is asked for (single-vector solves weigh that cost); a model autograd
    cannot differentiate twice is skipped with the reason. ``compiled`` is measured only at the best width found for the others, only
    when a C++ compiler is present, and only when one replay of the best so far is projected above
    ``compile_threshold_s`` (below that its compile time, 20-70 s here, can't pay off). Returns
    ``{"backend", "block", "seconds_per_vector_step": {backend: {block: s}}, "skipped": {...}}``;
    the widths of a backend are measured from narrow to wide and stop after ``WORSE_IN_A_ROW``
    in a row cost more than ``WORSE`` times its best per vector (:func:`stop_widening`; skipped
    with the reason) when measuring the next would take over ``WIDEN_SECONDS``; the runner
    stores it in the run's provenance and reuses it on resume;
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
    steps = max(1, min(steps, prob.num_steps))
    if trajectory is None:  # the JVPs below start from theta_0 and need nothing else
        trajectory = Trajectory.start_only(prob, prob.init_theta())
    table: dict = {}

    def measure(name, k):
        rp = _make(prob, trajectory, name)
        gen = torch.Generator().manual_seed(0)  # not zeros: `compiled` checks itself against eager
        V = torch.randn(k, prob.num_params, generator=gen, dtype=torch.float64).to(prob.device,
                                                                                 prob.dtype)
        rp.jvp(V, steps=steps)  # warm-up: compiles `compiled`, fills `fused`'s primal cache
        # (every replay of a run after its first reads that cache: time the steady state)
        _sync(prob.device)
        t = time.perf_counter()
        rp.jvp(V, steps=steps)
        _sync(prob.device)
        return (time.perf_counter() - t) / (k * steps)

    at_best = ("compiled", "double-backward")  # measured at the best width of the others only
    for name in [b for b in backends if b not in at_best]:
        table[name] = {}
        widths = sorted(set(int(k) for k in blocks))
        for i, k in enumerate(widths):
            table[name][str(k)] = measure(name, k)
            # (cheap widths are all measured: a stop there would only add timing noise to the pick)
            nxt = widths[i + 1] if i + 1 < len(widths) else None
            if nxt is not None and stop_widening(list(table[name].values())) \
                    and 2 * table[name][str(k)] * nxt * steps > WIDEN_SECONDS:
                skipped[f"{name} wider than {k}"] = (
                    f"not measured: {', '.join(map(str, widths[i + 1:]))} (the last "
                    f"{WORSE_IN_A_ROW} widths cost more than {WORSE:g}x the best per vector)")
                break
    best = min(((b, k) for b in table for k in table[b]), key=lambda bk: table[bk[0]][bk[1]],
               default=None)
    if "double-backward" in backends:
        k = best[1] if best else str(max(blocks))
        try:  # (and alone, where asked for: what single-vector solves cost on it)
            ks = sorted({int(k)} | ({1} if 1 in blocks else set()))
            table["double-backward"] = {str(w): measure("double-backward", w) for w in ks}
        except Exception as e:  # noqa: BLE001 - a model autograd cannot differentiate twice
            if backends == ["double-backward"]:  # asked for by name: the reason is the error
                raise
            skipped["double-backward"] = f"double backward failed: {type(e).__name__}: {e}"[:300]
        else:
            for w, c in table["double-backward"].items():
                if best is None or c < table[best[0]][best[1]]:
                    best = ("double-backward", w)
    if "compiled" in backends:
        k = int(best[1]) if best else max(blocks)
        per_replay = table[best[0]][best[1]] * k * prob.num_steps if best else float("inf")
        if per_replay < compile_threshold_s:
            skipped["compiled"] = (f"one replay takes {per_replay:.2f} s < {compile_threshold_s} s: "
                                   f"compiling would not pay off")
        else:
            try:
                table["compiled"] = {str(k): measure("compiled", k)}
            except Exception as e:  # noqa: BLE001 - inductor failures are environment problems
                skipped["compiled"] = f"torch.compile failed: {type(e).__name__}: {e}"[:300]
            else:
                if best is None or table["compiled"][str(k)] < table[best[0]][best[1]]:
                    best = ("compiled", str(k))
    return {"backend": best[0], "block": int(best[1]), "steps": steps,
            "seconds_per_vector_step": table, "skipped": skipped}
