"""The main job: train, check, solve top and bottom, analyse, and store everything, resumably.

Each phase commits to the store before the next starts, and each solve checkpoints its own state
(the dense path: J's columns block by block; Lanczos: the whole recurrence after every step), so a
run killed at any moment resumes with ``resume=True`` and ends with the same singular values as an
uninterrupted run.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from .. import __version__, distributed, query, replay, store
from ..analysis import structural_ones
from ..analysis.summary import trivial_spectrum
from ..linalg import default_tol
from ..linalg.dense import dense_values
from ..operator import TrainingJacobian, theta_sha256
from ..rebuild import cpu_description, not_reproduced, same_inputs
from ..recipe import Recipe
from ..problem import Problem

from .plans import _plan_top_by_cost, _plans, _recheck  # noqa: F401 (tests reach them here)
from .solves import _dense_bottom, _dense_resumable, _krylov_resumable, _residuals, _svd_full, _to_np, _values_fit  # noqa: F401,E501

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunOutcome:
    run_id: str
    store: str
    summary: dict


def provenance(recipe: Recipe, op: TrainingJacobian, argv=None) -> dict:
    import scipy

    module = op.problem.model.module
    return {"model": {"class": f"{type(module).__module__}.{type(module).__qualname__}",
                      "theta0_sha256": theta_sha256(op.trajectory.theta0),
                      "num_params": op.problem.num_params,
                      "param_layout": [[p.name, list(p.shape), p.offset] for p in op.param_layout]},
            "data": dict(op.problem.data.sources),
            "loss": recipe.loss,
            "tjac": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "scipy": scipy.__version__, "zarr": store.zarr_version(), "python": sys.version.split()[0],
            "platform": platform.platform(), "cpu": cpu_description(),
            "device": str(op.device), "dtype": str(op.dtype),
            "seeds": {"init": recipe.seed, "split": recipe.data.split_seed, "solver": 0},
            "argv": list(argv if argv is not None else sys.argv),
            "start_time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


class ComputationError(RuntimeError):
    """The computation failed one of its own checks (e.g. the adjoint identity): not bad input."""


def run_analysis(recipe: Recipe, store_path: str, *, k_top: int = 32, k_bottom: int = 32,
                 tol: float | None = None, method: str = "auto", run_id: str | None = None,
                 resume: bool = False, overwrite: bool = False, checkpoint="all", argv=None,
                 progress=None, block: int | None = None, backend: str = "auto",
                 group=None) -> RunOutcome | None:
    """Run the analysis of ``recipe`` into ``store_path`` (see module doc).

    ``backend`` (see :mod:`tjac.replay`): ``auto`` measures the candidates with
    :meth:`TrainingJacobian.autotune` once per run (keeping the default unless another is 20%
    cheaper; nothing timed for a tiny run); a name pins it (its block width is still tuned
    unless ``block`` is given: ``block`` is the replay width too). The choice, and why, lives in
    the run's provenance (``autotune``) and a resume reuses it (same arithmetic, same chunks).
    A resume must repeat the run's solve settings (``k_top``, ``k_bottom``, ``tol``, ``method``,
    ``block``): other settings are refused (:class:`tjac.store.StoreError`), never mixed in.
    ``tol`` defaults to :func:`tjac.linalg.default_tol` of the recipe's dtype (1e-8 in float64,
    1.2e-5 in float32). ``progress``: a tqdm-like factory for bars (a terminal); without one, a
    long solve logs a progress line every ~30 s (:class:`tjac.linalg.Progress`, shown with -v).
    When neither J nor the bottom's Lanczos basis fits in memory, the basis spills to disk in a
    temporary directory beside the store (:mod:`tjac.linalg.spill`; that solve does not
    checkpoint: a killed run restarts it).

    With ``group`` (a :class:`tjac.distributed.Group`, e.g. ``tjac.distributed.init()`` under
    torchrun; None, the default, keeps this process alone) every rank calls this with the same
    arguments: rank 0 trains, solves and writes the store with each block's columns spread over
    the ranks; the other ranks train the same recipe, replay their slices and return None. The
    ranks refuse to start when their arguments differ, or to go on when their theta_0 or theta_T
    differ. What a run stores and resumes from does not depend on the world size (only the
    provenance and the summary record it): a run interrupted at any world size resumes at any
    other, 1 included."""
    kw = dict(k_top=k_top, k_bottom=k_bottom, tol=tol, method=method, run_id=run_id,
              resume=resume, overwrite=overwrite, checkpoint=checkpoint, argv=argv,
              progress=progress, block=block, backend=backend)
    if group is None or group.world_size == 1:
        return _run_analysis(recipe, store_path, group=group, **kw)
    if block is not None and block < group.world_size:
        raise ValueError(f"--block {block} is narrower than the world size {group.world_size}: "
                         f"some ranks would have no columns; use --block >= {group.world_size} "
                         f"or fewer ranks")
    try:  # the same validation on every rank before any message
        problem = Problem(recipe)
        replay.resolve(problem, backend)
    except BaseException as e:
        if group.is_driver:  # (a worker that fails here exits; rank 0's check names it)
            group.fail(e)
        raise
    group.agree({"recipe": recipe.to_json(), "k_top": k_top, "k_bottom": k_bottom, "tol": tol,
                 "method": method, "run_id": run_id, "resume": resume, "overwrite": overwrite,
                 "checkpoint": str(checkpoint), "block": block, "backend": backend}, "arguments")
    if not group.is_driver:
        op = TrainingJacobian(problem, checkpoint=checkpoint, backend=backend)
        if op.distribute(group):
            distributed.serve(op, group)
        return None
    try:
        out = _run_analysis(recipe, store_path, group=group, problem=problem, **kw)
    except BaseException as e:
        group.fail(e)
        raise
    group.stop()
    return out


def _run_analysis(recipe: Recipe, store_path: str, *, k_top, k_bottom, tol, method, run_id,
                  resume, overwrite, checkpoint, argv, progress, block, backend, group,
                  problem=None) -> RunOutcome:
    run_id = store.check_run_id(run_id or f"{recipe.hash()}")
    if problem is None:  # bad recipes and backends are refused before the store is touched
        problem = Problem(recipe)
        replay.resolve(problem, backend)
    if tol is None:
        tol = default_tol(problem.dtype)
    P = problem.num_params if problem.selection is None else int(problem.selection.numel())
    for flag, k in (("k_top (--k-top)", k_top), ("k_bottom (--k-bottom)", k_bottom)):
        if k > P:
            raise ValueError(f"`{flag}` must be at most P = {P}, got {k}")
    spill_dir = os.path.dirname(os.path.abspath(store_path))
    plans, budget = _plans(problem, P, k_top, k_bottom, method, checkpoint, spill_dir, block)
    request = {"k_top": int(k_top), "k_bottom": int(k_bottom), "tol": float(tol), "method": method,
               "block": None if block is None else int(block)}
    with store.Writer(store_path) as w:
        if w.has_run(run_id) and not overwrite:
            same_inputs(w.run(run_id), run_id, problem)
            _same_request(w.run(run_id), run_id, store_path, request)
        if w.has_run(run_id):
            status = w.run(run_id).attrs.get("status")
            if overwrite:
                w.delete_run(run_id)
            elif status == "complete" and resume:
                log.info("run %s is already complete: nothing to resume", run_id)
                return RunOutcome(run_id=run_id, store=store_path,
                                  summary=dict(w.run(run_id).attrs["summary"]))
            elif status == "complete":
                raise store.StoreError(f"run {run_id!r} is already complete in {store_path!r}; "
                                       f"pass --overwrite to recompute it")
            elif not resume:
                raise store.StoreError(f"run {run_id!r} in {store_path!r} is incomplete; pass "
                                       f"--resume to continue it or --overwrite to restart it")
        t0 = time.perf_counter()
        traffic0 = group.traffic() if group is not None else {}
        op = TrainingJacobian(problem, checkpoint=checkpoint, backend=backend)
        op.distribute(group)  # (under a process group: the ranks compare theta_0 and theta_T)
        try:
            check = op.check()
        except ValueError as e:  # the adjoint identity failed: the computation is wrong, not the input
            raise ComputationError(str(e)) from None
        P = op.shape[0]
        if w.has_run(run_id):
            run = w.run(run_id)
            tuned = run.attrs.get("provenance", {}).get("autotune")
            if tuned:  # tuned once per run; a resume reuses the pick (same arithmetic, same chunks)
                op.apply_tuning(tuned)
            stored = np.asarray(run["thetaT"][:])
            if (not np.array_equal(stored, _to_np(op.thetaT)) and group is None
                    and getattr(problem.model, "recognised", False)):
                # a user's MLP run started before MLP chains were recognised trained through
                # torch.func (the same numbers to ~1e-16, not bit for bit): resume it that way
                try:  # (fused is the hand-derived path's: the torch.func one picks its own)
                    alt = TrainingJacobian(Problem(recipe, model_backend="func"),
                                           checkpoint=checkpoint,
                                           backend="auto" if backend == "fused" else backend)
                except replay.Unsupported:
                    alt = None
                if alt is not None and np.array_equal(stored, _to_np(alt.thetaT)):
                    log.info("run %s: resumed with torch.func derivatives (how it was started)",
                             run_id)
                    try:
                        check = alt.check()
                    except ValueError as e:
                        raise ComputationError(str(e)) from None
                    op = alt
                    if tuned:
                        op.apply_tuning(tuned)
            if not np.array_equal(stored, _to_np(op.thetaT)):
                raise store.StoreError(not_reproduced(run_id, run.attrs.get("provenance", {})))
            plans = _plan_top_by_cost(plans, problem, P, k_top, method, checkpoint, spill_dir,
                                      block, op, started=run.attrs.get("provenance", {})
                                      .get("plans", {}).get("top"))
            _recheck(plans, problem, op, {"top": k_top, "bottom": k_bottom}, block)
        else:  # (replaces the debris of a creation that was killed before its status was written)
            # a --block is the replay width too (vectors per replay): only backends are compared
            # then, and a pinned backend with a --block times nothing
            tuned = op.autotune(backends=None if backend == "auto" else [backend],
                                products=sum(p.estimate.products for p in plans.values()),
                                **({} if block is None else {"blocks": (block,)}))
            plans = _plan_top_by_cost(plans, problem, P, k_top, method, checkpoint, spill_dir,
                                      block, op)
            _recheck(plans, problem, op, {"top": k_top, "bottom": k_bottom}, block)
            prov = provenance(recipe, op, argv)
            prov["autotune"] = tuned
            prov["distributed"] = (group.describe() if group is not None
                                   else {"world_size": 1, "backend": None})
            prov["plans"] = {which: p.as_dict() for which, p in plans.items()}
            run = w.create_run(run_id, recipe_json=recipe.to_json(), recipe_hash=recipe.hash(),
                               provenance=prov, theta0=_to_np(op.theta0), thetaT=_to_np(op.thetaT),
                               request=request)
        np_dtype = _to_np(op.theta0).dtype
        methods = {which: p.method for which, p in plans.items()}
        # the full SVD does not fit: J's QR gives the bottom only, the top takes its own plan
        bottom_only = "bottom" in plans and plans["bottom"].bottom_only
        if "dense" in methods.values() and not bottom_only:  # J is formed: both ends for free
            methods = {which: "dense" for which in methods}
        ks = {"top": k_top, "bottom": k_bottom}
        prior = dict(run.attrs.get("products", {"matvecs": 0, "rmatvecs": 0}))
        prior_replays = int(run.attrs.get("replays", 0))

        def products():
            return {"matvecs": prior["matvecs"] + op.num_matvecs,
                    "rmatvecs": prior["rmatvecs"] + op.num_rmatvecs}

        def commit(which, r):  # each solve is committed as soon as it is certified
            # the run's product count is descriptive: written before the solve's counter
            w.set_attrs(run, products=products(), replays=prior_replays + op.num_replays)
            w.commit_solve(run, which, sigma=_to_np(r["S"]).astype(np.float64),
                           residual=_to_np(r["res"]).astype(np.float64),
                           U=_to_np(r["U"].T).astype(np_dtype), V=_to_np(r["V"].T).astype(np_dtype),
                           method=r["method"], tol=tol, norm_estimate=r["smax"],
                           converged=[bool(c) for c in r["conv"]])
            w.drop_state(run, which)

        if bottom_only:
            todo = not w.solve_committed(run, "bottom", k_bottom)
            values = not w.spectrum_committed(run) and _values_fit(P, op.dtype)
            if todo or values:
                J = _dense_resumable(w, run, op, block=block or 128, progress=progress,
                                     plan=plans["bottom"], host=True)
                if values:  # every sigma, for the region counts (a copy of J; J stays intact)
                    t_values = time.perf_counter()
                    w.commit_spectrum(run, dense_values(J), None)
                    log.info("all %d singular values (values only, from a copy of J) in %.1f s",
                             P, time.perf_counter() - t_values)
                if todo:
                    commit("bottom", _dense_bottom(op, J, k_bottom, tol))
                del J  # (before the top's solve)
            w.drop_state(run, "dense")
        elif "dense" in methods.values():
            todo = [which for which in methods if not w.solve_committed(run, which, ks[which])]
            if todo or not w.spectrum_committed(run):
                J = _dense_resumable(w, run, op, block=block or 128, progress=progress,
                                     plan=plans.get("bottom") or plans.get("top"))
                U, S, V = _svd_full(J)
                res = _residuals(J, U, S, V)
                if not w.spectrum_committed(run):
                    w.commit_spectrum(run, _to_np(S).astype(np.float64),
                                      _to_np(res).astype(np.float64))
                for which in todo:
                    k = ks[which]
                    idx = torch.arange(k) if which == "top" else torch.arange(P - 1, P - 1 - k, -1)
                    commit(which, dict(S=S[idx], U=U[:, idx], V=V[:, idx], res=res[idx],
                                       method="dense", smax=float(S[0]),
                                       conv=res[idx].max(1).values <= tol * float(S[0])))
            w.drop_state(run, "dense")
        for which, k in ks.items():
            if not k or methods[which] == "dense":
                continue
            if w.solve_committed(run, which, k):  # committed by an earlier process
                w.drop_state(run, which)
                continue
            commit(which, _krylov_resumable(w, run, op, which, k, tol, methods[which], progress,
                                            block or plans[which].estimate.block,
                                            plan=plans[which], max_memory=budget,
                                            spill_dir=spill_dir))
        summary = _summarize(run, run_id, op, check, time.perf_counter() - t0, tol)
        summary["products"] = products()
        summary["products_total"] = sum(summary["products"].values())
        # passes over training by the solves (under a process group: rank 0's, each over its
        # slice of a block; every other rank makes as many over its own slice)
        summary["replays"] = prior_replays + op.num_replays
        summary["backend"], summary["block"] = op.backend, op.block_size
        summary["distributed"] = {"world_size": 1, "backend": None} if group is None else dict(
            group.describe(), **{k: v - traffic0[k] for k, v in group.traffic().items()})
        w.finish(run, summary)
        return RunOutcome(run_id=run_id, store=store_path, summary=summary)


def _same_request(run, run_id: str, store_path: str, request: dict) -> None:
    """Refuse to continue (or report as complete) a run with other solve settings than it was
    started with: its stored triplets would be mixed with, or mistaken for, the ones asked for.
    Runs written before the settings were stored are checked against their committed solves' k."""
    stored = run.attrs.get("request")
    if stored is None:
        stored = {}
        for which in ("top", "bottom"):
            got = store.solve_arrays(run, which)
            if got is not None:
                stored[f"k_{which}"] = got[4].get("k")
    diff = [name for name in request if name in stored and stored[name] != request[name]]
    if diff:
        flag = {"k_top": "--k-top", "k_bottom": "--k-bottom", "tol": "--tol", "method": "--method",
                "block": "--block"}
        was = ", ".join(f"{flag[n]} {stored[n]}" for n in diff)
        now = ", ".join(f"{flag[n]} {request[n]}" for n in diff)
        raise store.StoreError(f"run {run_id!r} in {store_path!r} was started with {was}, not "
                               f"{now}; repeat its settings to resume it, pass --overwrite to "
                               f"recompute it, or choose another --run-id")


def _summarize(run, run_id, op, check, seconds, tol):
    """The run's summary, from what the store holds (the same reading as ``tjac.open``'s)."""
    view = query.Run(run, run_id)
    out = {"P": op.shape[0], "T": op.num_steps, "seconds": seconds, "tol": tol,
           "adjoint_rel_error": check.adjoint_rel_error,
           "spectrum": view.spectrum_summary(structural=structural_ones(op.problem))}
    order = op.problem.order
    out["batches"] = {"n_train": order.n, "batch_size": order.batch_size,
                      "per_epoch": order.per_epoch, "dropped_per_epoch": order.dropped}
    for which in ("top", "bottom"):
        if store.solve_arrays(run, which) is not None:
            out[which] = view.solve_summary(which)
    out["train"] = op.problem.evaluate(op.trajectory.thetaT, op.trajectory.buffers)
    # J = c I (the check's probes) or all sigma equal (the two ends): said, logged and stored
    out["warnings"] = trivial_spectrum(getattr(check, "scalar", None), out["spectrum"],
                                       both_ends="top" in out and "bottom" in out, tol=tol)
    for w in out["warnings"]:
        log.warning("run %s: %s", run_id, w)
    out["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return out


def default_png(store_path: str, run_id: str) -> str:
    base = os.path.splitext(os.path.abspath(store_path))[0]
    return f"{base}-{run_id}.png"
