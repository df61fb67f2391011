"""The run's solve plans: each end's method, block and memory, weighed by the operator's measured
costs, before any product."""

from __future__ import annotations

import logging

import torch

from .. import _checks
from ..linalg import plan_solve
from ..linalg.plan import HEADROOM

log = logging.getLogger("tjac.runner")


def _plan_top_by_cost(plans, problem, P, k_top, method, checkpoint, spill_dir, block, op,
                      started=None):
    """Once the operator's replay costs are measured (its autotune, or the one a resumed run
    stored): the top's plan weighs them (:func:`tjac.linalg.plan_solve`'s ``vector_costs``), which
    takes Lanczos at a narrow block where replays are not cheaper per vector in wide ones. Only
    for ``method='auto'`` without a ``block``. The pick depends on the world size (a block costs
    its busiest rank's share), so a resumed run whose top was ``started`` as Lanczos (the stored
    plan) keeps that block, and so its Lanczos checkpoint, at any world size."""
    if method != "auto" or block is not None or "top" not in plans \
            or plans["top"].method != "randomized" or op.vector_costs() is None:
        return plans
    if started and started.get("method") == "lanczos" and started.get("expected_block"):
        from dataclasses import replace

        b = int(started["expected_block"])
        again, _ = _plans(problem, P, k_top, 0, "lanczos", checkpoint, spill_dir, b)
        top = again["top"]
        return {**plans, "top": replace(top, estimate=replace(top.estimate, block=b),
                                        reason=f"top: Lanczos at block {b}, as the run started")}
    again, _ = _plans(problem, P, k_top, 0, method, checkpoint, spill_dir, block,
                      vector_costs=op.vector_costs(), replay_block=op.block_size,
                      world_size=op.world_size)
    return {**plans, "top": again["top"]}


def _plans(problem, P: int, k_top: int, k_bottom: int, method: str, checkpoint, spill_dir,
           block=None, *, vector_costs=None, replay_block=None, world_size=1):
    """The plan of each solve (:func:`tjac.linalg.plan_solve`) against the memory left once the
    trajectory and a replay block are held (and the disk free in ``spill_dir``); logged (shown
    with ``-v``), kept in the provenance, and a solve that cannot fit is refused before anything is
    trained or written. Returns the plans and the memory budget to hand each ``svd`` (so that its
    own plan is this one)."""
    import shutil
    from ..problem import memory_estimate

    item = torch.empty((), dtype=problem.dtype).element_size()
    reserved = memory_estimate(problem, checkpoint=checkpoint, block=128)
    have = _checks.available_bytes(problem.device)
    try:
        disk = int(shutil.disk_usage(spill_dir).free)
    except OSError:  # no such directory: the store's writer refuses it, with its own message
        disk = None
    host = None if problem.device.type == "cpu" else _checks.available_bytes("cpu")
    plans = {which: plan_solve(P, k, which, method=method, itemsize=item, available_bytes=have,
                               reserved_bytes=reserved, disk_bytes=disk, block=block,
                               host_bytes=host, vector_costs=vector_costs,
                               replay_block=replay_block, world_size=world_size)
             for which, k in (("top", k_top), ("bottom", k_bottom)) if k}
    for which, p in plans.items():
        log.info("plan %s", p.describe())
        if not p.fits:
            raise MemoryError(f"{p.refusal()} (less {reserved / 2**30:.1f} GiB for the "
                              f"trajectory); use fewer parameters, --k-bottom 0 or a machine "
                              f"with more memory")
    budget = None if have is None else max(1, have - int(-(-reserved // HEADROOM)))
    return plans, budget


def _recheck(plans, problem, op, ks: dict, block=None):
    """Each solve's plan once ``op.check()`` has measured one replay step's memory
    (``problem.activation``): the step at the width the solve's products replay (the solver's
    block or its k certificate vectors, in chunks of the operator's block) plus the solver's
    bytes, against what is available now (the stored trajectory is already resident, so it is
    not counted again). A solve that no longer fits is refused here, in one line, before any of
    its products; the methods and the budget stay as planned (a measurement's noise never flips a
    pick). The dense bottom-only path's J lives in host memory: checked there."""
    from ..problem import step_bytes

    if getattr(problem, "activation", None) is None:
        return
    for which, p in plans.items():
        e = p.estimate
        host = e.bottom_only and problem.device.type != "cpu"
        have = _checks.available_bytes("cpu" if host else problem.device)
        if have is None:
            continue
        default = ks[which] + 8 if e.method == "randomized" else min(16, op.shape[0])
        solver_block = block or e.block or default
        width = max(1, min(op.block_size, max(solver_block, ks[which])))
        step = step_bytes(problem, width)
        need = e.bytes + (0 if host else step)
        if need > HEADROOM * have:
            raise MemoryError(
                f"{which}-{ks[which]} by {e.label()} needs {need:,} bytes once one replay step's "
                f"memory is measured ({step:,} for a {width}-vector step, {e.bytes:,} for the "
                f"solver) but {have:,} bytes are available, of which a plan may use "
                f"{HEADROOM:.0%}; use fewer parameters, a smaller --block or a machine with more "
                f"memory")
