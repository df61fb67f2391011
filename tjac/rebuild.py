"""A stored run's problem and operator rebuilt for an analysis, refused unless they are the run's.

An analysis of a stored run (:mod:`tjac.analyze_store`) rebuilds its recipe: the model, the data and the
training, and so J. Files can change after the run was stored (an edited ``.npz``, another
version of the user's model code), and the rebuilt J would then be another J whose numbers get
committed into the run. Before any product or write, :func:`problem_of` refuses, in one line
(:class:`tjac.store.StoreError`), a rebuild whose

1. data files' SHA-256 differ from the ones stored (checked before the data is read; the same
   check as a resume's, naming the file),
2. recipe hash or SHA-256 of theta_0 differ from the stored ones,

and :func:`check_thetaT` (after one training, :func:`trained`, or the operator's own,
:func:`operator_of`) a retrained theta_T that differs from the stored one: bit for bit when the
run was stored on the same device type and dtype, else to ``sqrt(eps)`` of the dtype in the max
norm relative to ``max(1, max |theta_T|)`` (training on another device rounds differently).
"""

from __future__ import annotations

import logging
import platform

import numpy as np
import torch

from . import store
from .operator import theta_sha256
from .problem import Problem

log = logging.getLogger(__name__)


def cpu_description() -> str:
    """The CPU model and the vector kernels torch picked on it (training bits depend on both)."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f
                          if ln.startswith("model name")), model)
    except OSError:
        pass
    return f"{model} ({torch.backends.cpu.get_cpu_capability()})"


def not_reproduced(run_id: str, prov: dict, action: str = "resume") -> str:
    """The one-line refusal of a resume (``action``) whose training differs, naming what differs from the
    machine that started the run (training bits depend on the CPU's and torch's kernels)."""
    diff = _elsewhere(prov)
    why = ("it was started with " + diff if diff else
           "training bits depend on the CPU's vector kernels and the torch build"
           + ("" if "cpu" in prov else ", and the store does not record the CPU it was started on"))
    return (f"run {run_id!r}: this machine's training does not reproduce the stored thetaT bit for "
            f"bit ({why}); cannot {action}")


def _elsewhere(prov: dict) -> str:
    """What of the CPU and torch build differs from the run's provenance ("" if nothing known)."""
    here = {"cpu": cpu_description(), "torch": torch.__version__}
    return "; ".join(f"{k} {prov[k]!r}, here {v!r}" for k, v in here.items()
                     if prov.get(k) is not None and prov[k] != v)


def problem_of(run, *, action: str = "analyze") -> Problem:
    """The :class:`tjac.problem.Problem` of a stored run (:class:`tjac.query.Run`), refused
    (:class:`tjac.store.StoreError`) when its data, recipe hash or theta_0 differ from the stored
    ones (module doc). ``action`` names what is refused in the message."""
    from .data import digest

    recipe = run.recipe
    try:
        now = digest(recipe.data)
    except ValueError:  # e.g. in-memory arrays: Problem() says why it cannot rebuild them
        now = None
    if now is not None:  # before the data is parsed: a changed file is named, not misread
        same_data(run, run.id, now, action)
    problem = Problem(recipe)
    same_inputs(run, run.id, problem, action)
    return problem


def check_thetaT(run, thetaT: torch.Tensor, problem: Problem, *, action: str = "analyze") -> None:
    """Refuse (:class:`tjac.store.StoreError`) a retrained ``thetaT`` (the operator's: restricted
    to a ``param_filter``) that is not the stored one (module doc: bit for bit on the device type
    and dtype the run was stored with, else to sqrt(eps) of the dtype)."""
    stored = np.asarray(run.thetaT())
    now = thetaT.detach().cpu().numpy()
    if now.shape != stored.shape:
        raise store.StoreError(f"run {run.id!r}: the rebuilt recipe has P = {now.size}, the stored "
                               f"run P = {stored.size}; cannot {action} it")
    prov = run.provenance
    same_place = (torch.device(prov.get("device", str(problem.device))).type == problem.device.type
                  and prov.get("dtype", str(problem.dtype)) == str(problem.dtype))
    if same_place:
        if np.array_equal(now, stored):
            return
        how = "bit for bit"
    else:
        tol = float(np.sqrt(torch.finfo(problem.dtype).eps))
        err = float(np.abs(now.astype(np.float64) - stored.astype(np.float64)).max(initial=0.0))
        if err <= tol * max(1.0, float(np.abs(stored).max(initial=0.0))):
            return
        how = f"to {tol:.1e} (stored on {prov.get('device')} {prov.get('dtype')})"
    other = _elsewhere(prov)
    why = f"it was stored with {other}" if other else "the model, loss or optimizer code changed?"
    raise store.StoreError(f"run {run.id!r}: retraining its recipe here does not reproduce the "
                           f"stored theta_T {how} ({why}); cannot {action} it")


def trained(run, problem: Problem, *, action: str = "analyze") -> Problem:
    """Train ``problem`` once and check its theta_T against the run's (:func:`check_thetaT`).
    Returns the problem that reproduces it: a user's MLP run stored before MLP chains were
    recognised trained through torch.func (the same numbers to ~1e-16, not bit for bit) and is
    rebuilt that way, as a resume does."""
    from .analysis.response import restrict
    from .trajectory import train

    try:
        check_thetaT(run, restrict(problem, train(problem).thetaT), problem, action=action)
        return problem
    except store.StoreError:
        alt = _func_problem(problem)
        if alt is None:
            raise
    check_thetaT(run, restrict(alt, train(alt).thetaT), alt, action=action)
    log.info("run %s: rebuilt with torch.func derivatives (how it was trained)", run.id)
    return alt


def operator_of(run, problem: Problem | None = None, *, action: str = "analyze"):
    """The run's :class:`tjac.operator.TrainingJacobian`, rebuilt (:func:`problem_of` unless a
    ``problem`` already checked is given) and its theta_T checked (:func:`check_thetaT`)."""
    from .operator import TrainingJacobian

    problem = problem_of(run, action=action) if problem is None else problem
    op = TrainingJacobian(problem)
    try:
        check_thetaT(run, op.thetaT, problem, action=action)
        return op
    except store.StoreError:
        alt = _func_problem(problem)
        if alt is None:
            raise
    op = TrainingJacobian(alt)
    check_thetaT(run, op.thetaT, alt, action=action)
    return op


def _func_problem(problem: Problem) -> Problem | None:
    if not getattr(problem.model, "recognised", False):
        return None
    return Problem(problem.recipe, model_backend="func")


def same_inputs(run, run_id: str, problem, action: str = "resume") -> None:
    """Refuse to resume (or to report as complete; ``action`` names what is refused, e.g.
    "analyze" for :mod:`tjac.rebuild`) a run whose recipe, theta_0 or data differ from the ones it
    was started on: the recipe's hash, SHA-256 of theta_0, of each data file, or of the arrays.
    Runs written before these digests were stored carry none (their resume still checks theta_T
    bit for bit)."""
    prov = run.attrs.get("provenance", {})
    sha = prov.get("model", {}).get("theta0_sha256")
    if sha and sha != theta_sha256(problem.init_theta()):
        other = _elsewhere(prov)
        where = f", or on this machine: it was started with {other}" if other else ""
        raise store.StoreError(f"run {run_id!r} was started from another theta_0 (the model "
                               f"{prov['model'].get('class')!r} initialises differently now"
                               f"{where}); cannot {action} it")
    same_data(run, run_id, problem.data.sources, action)
    stored_hash, now = run.attrs.get("recipe_hash"), problem.recipe.hash()
    if stored_hash and stored_hash != now:  # (another epochs, lr, seed, ... under an explicit id)
        hint = ("repeat its settings to resume it, pass --overwrite to recompute it, or choose "
                "another --run-id" if action == "resume" else f"cannot {action} it")
        raise store.StoreError(f"run {run_id!r} was started from another recipe (hash "
                               f"{stored_hash}, not {now}); {hint}")


def same_data(run, run_id: str, sources: dict, action: str = "resume") -> None:
    stored = run.attrs.get("provenance", {}).get("data")
    if not stored:
        return
    for name, digest in stored.items():
        now = sources.get(name)
        if now != digest:
            what = "is missing" if now is None else "has changed (SHA-256 differs)"
            raise store.StoreError(f"run {run_id!r}: the data {name!r} it was started on {what}; "
                                   f"cannot {action} on different data")
    extra = set(sources) - set(stored)
    if extra:
        raise store.StoreError(f"run {run_id!r} was started on other data ({', '.join(stored)}), "
                               f"not {', '.join(sorted(extra))}; cannot {action}")
