"""One rule for choosing by measured cost without flipping on noise, shared by the replay
autotuner (:mod:`tjac.replay.autotune`) and the solve planner (:mod:`tjac.linalg.plan`)."""

from __future__ import annotations


def prefer(costs: dict, order, margin: float):
    """The first key of ``order`` (a fixed order of preference, the default first) whose cost in
    ``costs`` is within ``margin`` of the cheapest: ``c - c_min >= margin * c`` rules a key out, so
    a later key replaces an earlier one only where it is at least ``margin`` (a fraction, 0.2:
    20%) cheaper. Costs that differ by noise smaller than the margin never change the pick; keys of
    ``order`` without a cost are passed over, and costs of keys not in ``order`` come last. None
    when nothing has a cost."""
    keys = [k for k in order if costs.get(k) is not None]
    keys += [k for k in costs if k not in keys and costs[k] is not None]
    if not keys:
        return None
    best = min(costs[k] for k in keys)
    return next(k for k in keys if (1 - margin) * costs[k] < best or costs[k] == best)
