"""Planned against measured peak resident memory of a solve, per model family and solver path.

Each case runs in a fresh subprocess (``--case``): the problem is built and its resident size read
(VmRSS, the base: interpreter, torch, data, model); the operator stores its trajectory and measures
one replay step's peak at two widths (:meth:`tjac.TrainingJacobian.measure_activation`); the
process's high-water mark is reset (``/proc/self/clear_refs``) and the solve runs; the measured
peak is VmHWM after it. Planned: base + :func:`tjac.problem.memory_estimate` (stored states,
tangents, the measured step) + the solver's plan (:func:`tjac.linalg.plan.estimate` at the solve's
parameters). Target: planned within 25% of measured.

Models at P ~ 1e5: the paper's MLP (one hidden layer of 1,300), a CNN with BatchNorm
(tests/usermodels.py ``bn_cnn``, 600 channels) and the built-in transformer (width 112). Paths:
randomized top (k = 8, block 16, the plan's 6 passes), Lanczos top (k = 8, block 16, a basis of 64
per side, full at step 4 and restarted: 5 steps); for the CNN and the transformer (slower replays)
3 passes, and 3 Lanczos steps (a basis of 48 of the 64 planned). The solver's planned bytes are
the plan's count at the solve's parameters (randomized: at its maxiter passes). The bottom's
paths (dense: J in P^2 values, 80 GB at P = 1e5; long-basis Lanczos: ~1.25 P products) do not
apply at this size on this machine and are not run. Short training
(1 epoch of 128 examples, 2 steps): only memory is measured.

``--models basis``: the solver's own storage at P = 1e6 on a diagonal operator (products cost
nothing), measured growth against the solver's planned bytes alone, for both top paths above and
single-vector Lanczos (k = 16, 100 steps: the basis grows one column per step and its storage
doubles), the path the plan picks for a user's 1e6 model (bench_million.py).

    python benchmarks/bench_memory.py [--minutes 15] [--models mlp,cnn_bn,transformer,basis]
        [--paths randomized_top,lanczos_top,lanczos_top_single] [--merge]
        [--out benchmarks/results/memory.json]
"""
import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MODELS = {
    "mlp": dict(family="mlp", width=1300),
    "cnn_bn": dict(model="tests.usermodels:bn_cnn", model_kwargs={"channels": 600, "p": 0.0}),
    "transformer": dict(family="transformer", width=112),
}
PATHS = {
    "randomized_top": dict(method="randomized", k=8, block=16, maxiter=6),
    "lanczos_top": dict(method="lanczos", k=8, block=16, maxiter=5, max_basis=64),
}
# the slower replays (CNN, transformer through torch.func on 2 shared cores): fewer products
SHORT = {
    "randomized_top": dict(method="randomized", k=8, block=16, maxiter=3),
    "lanczos_top": dict(method="lanczos", k=8, block=16, maxiter=3, max_basis=64),
}
# the solver's storage alone at P = 1e6 (no training: a diagonal operator whose products cost
# nothing), so its own term of the plan is checked at the size of a user's 1e6 model; with the
# single-vector Lanczos that the plan picks for such models (one column per step, doublings)
BASIS_P = 1_000_000
BASIS_PATHS = {**PATHS, "lanczos_top_single": dict(method="lanczos", k=16, block=1, maxiter=100,
                                                   max_basis=256)}
TARGET = 0.25


def status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])


def measured_solve(op, spec):
    """The solve of ``spec`` on ``op`` after freed heap memory is returned and the high-water mark
    reset: (result, seconds, resident bytes before, peak resident bytes)."""
    import tjac
    from tjac.memory import _libc

    _libc().malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status_kib("VmRSS") * 1024
    t = time.perf_counter()
    kw = {n: spec[n] for n in ("block", "maxiter", "max_basis") if n in spec}
    res = tjac.svd(op, spec["k"], which="top", method=spec["method"], tol=1e-12,
                   raise_on_failure=False, rng=0, **kw)
    return res, time.perf_counter() - t, before, status_kib("VmHWM") * 1024


def basis_case(path):
    """The solver's measured growth against its planned bytes (no states, no replay step)."""
    import torch

    import tjac
    from tjac.linalg.plan import estimate
    from tjac.linalg.randomized import peak_values

    spec = BASIS_PATHS[path]
    # a slowly decaying spectrum: no value certifies at tol 1e-12 within the steps run, so every
    # case runs its maxiter
    op = tjac.linalg.DiagonalOperator(
        1 + 1e-3 * (1 + torch.arange(BASIS_P, dtype=torch.float64)) ** -0.25)
    res, seconds, before, peak = measured_solve(op, spec)
    grown = peak - before
    P, item = BASIS_P, 8
    if spec["method"] == "randomized":
        solver = item * peak_values(P, spec["block"] * spec["maxiter"], spec["block"])
    else:  # the plan at the basis the solve reached (or its restart size)
        n = min(spec["max_basis"], spec["block"] * spec["maxiter"])
        solver = estimate("lanczos", P, spec["k"], "top", itemsize=item, block=spec["block"],
                          max_basis=n).bytes
    return {"model": "basis", "path": path, "P": P, "k": spec["k"], "block": spec["block"],
            "maxiter": spec["maxiter"], "max_basis": spec.get("max_basis"),
            "planned_solver": solver, "solver_growth_measured": grown,
            "ratio_measured_over_planned": grown / solver,
            "passes_or_steps": len(res.history),
            "products": res.num_matvecs + res.num_rmatvecs, "solve_seconds": seconds,
            "within_target": abs(grown / solver - 1) <= TARGET}


def run_case(model, path):
    import torch

    import tjac
    from tjac.linalg.plan import estimate
    from tjac.linalg.randomized import peak_values
    from tjac.memory import _libc
    from tjac.problem import memory_estimate

    spec = (PATHS if model == "mlp" else SHORT)[path]
    recipe = tjac.Recipe.paper(epochs=1, n_train=128, **MODELS[model])
    prob = tjac.Problem(recipe)
    _libc().malloc_trim(0)
    base = status_kib("VmRSS") * 1024
    op = tjac.TrainingJacobian(prob, block_size=spec["block"])
    act = op.measure_activation()
    P = op.shape[0]
    item = torch.empty((), dtype=op.dtype).element_size()
    res, seconds, before, peak = measured_solve(op, spec)
    stored_and_step = memory_estimate(prob, checkpoint="all", block=spec["block"])
    upfront = estimate(spec["method"], P, spec["k"], "top", itemsize=item, block=spec["block"],
                       max_basis=spec.get("max_basis")).bytes
    # the plan's count at the passes the solve may run (randomized: its maxiter; the up-front
    # estimate assumes RANDOMIZED_PASSES); Lanczos: a full basis of max_basis
    solver = (item * peak_values(P, spec["block"] * spec["maxiter"], spec["block"])
              if spec["method"] == "randomized" else upfront)
    planned = base + stored_and_step + solver
    return {"model": model, "path": path, "P": P, "k": spec["k"], "block": spec["block"],
            "backend": op.backend, "base_rss": base, "rss_before_solve": before,
            "planned_states_and_step": stored_and_step, "planned_solver": solver,
            "planned_solver_upfront": upfront, "maxiter": spec["maxiter"],
            "max_basis": spec.get("max_basis"),
            "activation": act.as_dict() if act else None,
            "planned_peak": planned, "measured_peak": peak,
            "ratio_measured_over_planned": peak / planned,
            "solver_growth_measured": peak - before, "passes_or_steps": len(res.history),
            "products": res.num_matvecs + res.num_rmatvecs, "solve_seconds": seconds,
            "within_target": abs(peak / planned - 1) <= TARGET}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", help="MODEL:PATH (internal: one case in this process)")
    ap.add_argument("--minutes", type=float, default=15.0)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks/results/memory.json"))
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--paths", default=",".join(BASIS_PATHS),
                    help="each model runs those of these that apply to it")
    ap.add_argument("--merge", action="store_true",
                    help="keep the --out file's rows of (model, path) cases not run now")
    a = ap.parse_args()
    for name, given, known in (("model", a.models, {**MODELS, "basis": None}),
                               ("path", a.paths, BASIS_PATHS)):
        bad = [x for x in given.split(",") if x not in known]
        if bad:
            ap.error(f"unknown {name} {bad[0]!r} (known: {', '.join(known)})")
    if a.case:
        model, path = a.case.split(":")
        print(json.dumps(basis_case(path) if model == "basis" else run_case(model, path)))
        return
    import _env

    t0 = time.time()
    cases = []
    for model in a.models.split(","):
        for path in a.paths.split(","):
            if path not in (BASIS_PATHS if model == "basis" else PATHS):
                continue
            left = a.minutes * 60 - (time.time() - t0)
            if left < 10:
                cases.append({"model": model, "path": path, "skipped": "time cap reached"})
                continue
            env = {**os.environ, "PYTHONPATH": ROOT}
            try:
                p = subprocess.run([sys.executable, __file__, "--case", f"{model}:{path}"],
                                   capture_output=True, text=True, timeout=left, env=env)
                row = (json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0
                       else {"model": model, "path": path, "error": p.stderr.strip()[-500:]})
            except subprocess.TimeoutExpired:
                row = {"model": model, "path": path, "skipped": "time cap reached mid-case"}
            cases.append(row)
            print(json.dumps({k: row.get(k) for k in ("model", "path", "P", "planned_peak",
                                                       "measured_peak",
                                                       "ratio_measured_over_planned",
                                                       "skipped", "error")}), flush=True)
    kept = {}  # with --merge, the old file's other records (e.g. basis_before_storage) stay
    if a.merge and os.path.exists(a.out):
        with open(a.out) as f:
            kept = json.load(f)
        old = kept.pop("cases")
        ran = {(c["model"], c["path"]) for c in cases}
        cases = [c for c in old if (c["model"], c["path"]) not in ran and "skipped" not in c] \
            + cases
    _env.write(a.out, {**kept, "target": TARGET, "minutes_cap": a.minutes, "cases": cases,
                       "not_run": {"bottom (dense, lanczos)": "P^2 values (80 GB at P = 1e5) or "
                                   "~1.25 P products: not at this size on this machine"}})


if __name__ == "__main__":
    main()
