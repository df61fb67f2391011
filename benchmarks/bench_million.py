"""A user's model at 1e6 parameters, end to end on this CPU: top-16 singular triplets at tol 1e-6.

Targets (benchmarks/_models.py, written as users write them; synthetic data written here):

* ``resnet``: a ResNet-style CNN with BatchNorm (widths 32-64-128-256, 1,369,770 parameters) on
  CIFAR-shaped uint8 images (``cifar_like``: 1,600 train, 256 test), batch 16, 1 epoch: T = 100.
* ``lm``: a causal transformer LM (d 128, 5 blocks, vocab 512, 32 tokens, 1,127,296 parameters)
  on token sequences of a sparse Markov chain (``tokens_like``), batch 16, lr 0.03, T = 100.

Both train by the paper's SGD (momentum 0.9, cosine schedule) in float64, trajectory stored with
``checkpoint="sqrt"``. Each target runs in a fresh subprocess (``--case``), which reports:

* R: one plain training run (best of 2), the trajectory pass, and the training's losses;
* per-vector JVP cost in R for each backend (``hand``: the hand-derived rules of
  tjac.models.graph; ``func``: torch.func's forward-over-reverse; ``double-backward``) at blocks
  1, 4, 16, from partial replays of ``--probe-steps`` steps (median of 2 after a warm-up),
  products checked against func's on one vector over those steps;
* planned vs measured peak resident memory of the solve: base (VmRSS after building the problem)
  + :func:`tjac.problem.memory_estimate` (checkpoints, the segment buffer, the tangents and the
  measured step, :meth:`tjac.TrainingJacobian.measure_activation`, at the widest replay: the
  solve's or the k certificate vectors') + the solver's bytes: up front (the plan's, a full
  Lanczos basis) and at the solve's end (the basis it reached; ``--replan`` recomputes it for a
  written result without products); the measured peak is VmHWM after ``/proc/self/clear_refs``
  (before the first product);
* the solve: ``tjac.svd(op, 16, which="top", tol=1e-6)`` by the method and block ``auto`` plans
  from the measured costs (:func:`tjac.linalg.plan.plan_solve`): its plan (expected products,
  bytes), products, wall seconds, certified count; stopped at ``--cap-minutes`` (a step that
  would end past the cap is not started), with the projection planned products x measured
  seconds per product.

``--memory-steps N`` runs memory only (no probes): N single-vector Lanczos steps and the k
vectors' fresh residuals, measured peak against the plan at the basis reached, kept as the
target's ``memory_check`` (with ``--merge``, beside its full result).

    python benchmarks/bench_million.py [--targets resnet,lm] [--cap-minutes 30]
        [--probe-steps 2] [--tiny] [--merge] [--replan] [--memory-steps N]
        [--out benchmarks/results/million.json]

The committed result: ``--targets lm --cap-minutes 125 --merge``, then ``--targets lm
--memory-steps 10 --merge`` (the LM's ``memory_check``, with the doubling Lanczos storage), then
``--targets resnet --cap-minutes 40 --merge`` (rerun after the hand rules' later speed-ups; the
LM's probes predate them: ``bench_hand.py --targets resnet-1e6,lm-1e6`` measures both now).
"""
import argparse
import functools
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

K, TOL, BLOCKS, HOURS = 16, 1e-6, (1, 4, 16), 2.0


def recipe(target, tiny=False):
    """The target's recipe; ``tiny``: the same pipeline on a small net and 4 steps (a check of
    this script, not a measurement)."""
    import _models

    import tjac
    n, n_test = (64, 32) if tiny else (1600, 256)
    if target == "resnet":
        kw = {"widths": (4, 8, 8, 8)} if tiny else {}
        return tjac.Recipe.paper(model=functools.partial(_models.resnet, **kw),
                                 dataset=_models.cifar_like(n, n_test), batch_size=16, epochs=1)
    if target == "lm":
        kw = {"vocab": 64, "d": 16, "depth": 1} if tiny else {}
        data = _models.tokens_like(n, n_test, vocab=kw.get("vocab", 512))
        return tjac.Recipe.paper(model=functools.partial(_models.tiny_lm, **kw), dataset=data,
                                 batch_size=16, epochs=1, lr=0.03)
    raise SystemExit(f"unknown target {target!r}")


def status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])


class _OutOfTime(Exception):
    pass


def per_vector_costs(op, func_prob, steps, log):
    """Seconds per vector of a full JVP (T steps) from ``steps``-step partial replays: hand and
    double-backward on the operator's problem, func on ``func_prob`` (same training)."""
    import statistics

    import torch

    import tjac
    prob, traj, T = op.problem, op.trajectory, op.num_steps
    runs = {"hand": (prob, "eager"), "func": (func_prob, "eager"),
            "double-backward": (func_prob, "double-backward")}
    gen = torch.Generator().manual_seed(0)
    V = torch.randn(max(BLOCKS), op.shape[0], generator=gen, dtype=op.dtype)
    ref = tjac.replay.make(func_prob, traj, "eager").jvp(V[:1], steps=steps)
    out = {}
    for name, (p, backend) in runs.items():
        rp = tjac.replay.make(p, traj, backend)
        got = rp.jvp(V[:1], steps=steps)
        err = float((got - ref).abs().max() / ref.abs().max())
        if err > 1e-10:
            raise RuntimeError(f"{name}: a {steps}-step JVP differs from func's by {err:.1e}")
        row = {"rel_error_vs_func": err}
        for k in BLOCKS:
            ts = []
            for _ in range(3):  # a warm-up, then the median of 2
                t = time.perf_counter()
                rp.jvp(V[:k], steps=steps)
                ts.append((time.perf_counter() - t) / (k * steps) * T)
            row[str(k)] = statistics.median(ts[1:])
        out[name] = row
        log(f"  {name}: JVP per vector " + ", ".join(f"block {k} {row[str(k)]:.1f}s"
                                                     for k in BLOCKS) + f" (vs func {err:.0e})")
    return out


def replay_width(method, block, operator_block):
    """Vectors per replay in the solve: Lanczos replays its block, randomized its l columns in
    chunks of the operator's block size."""
    return block if method == "lanczos" else min(K + 8, operator_block)


def upfront(prob, base, est, block, operator_block):
    """The plan before the solve: base + states and the widest replay step (the solve's, or the
    k certificate vectors') + the solver's planned bytes (a full Lanczos basis)."""
    from tjac.problem import memory_estimate
    width = max(replay_width(est.method, block, operator_block), min(K, operator_block))
    states = memory_estimate(prob, checkpoint="sqrt", block=width)
    return states, est.bytes, base + states + est.bytes


def at_end(prob, base, method, block, operator_block, history, peak, certified):
    """The plan's peak for the solve as it ended (certified or stopped by the cap) (Lanczos: a
    basis of the size reached; randomized: the passes run): base + states and one replay step
    + the solver's bytes. The replay step is the solve's width, or k where the solve certified
    (the fresh residuals of the k triplets replay k vectors at once)."""
    from tjac.linalg.plan import estimate
    from tjac.linalg.randomized import peak_values
    from tjac.problem import memory_estimate
    P, item = prob.num_params, 8
    width = replay_width(method, block, operator_block)
    if certified:
        width = max(width, min(K, operator_block))
    states = memory_estimate(prob, checkpoint="sqrt", block=width)
    basis = max(h.get("basis", 0) for h in history)
    solver = (estimate("lanczos", P, K, "top", itemsize=item, block=block, max_basis=basis).bytes
              if method == "lanczos" else item * peak_values(P, (K + 8) * len(history), K + 8))
    planned = base + states + solver
    return {"basis_at_end": basis, "replay_width_at_end": width, "planned_peak_at_end": planned,
            "ratio_measured_over_planned_at_end": peak / planned}


def run_case(target, cap_minutes, probe_steps, log, tiny=False):
    import torch

    import tjac
    from tjac.bench import plain_run_seconds
    from tjac.linalg.plan import plan_solve
    from tjac.memory import _libc

    torch.set_num_threads(os.cpu_count() or 1)
    t_all = time.perf_counter()
    r = recipe(target, tiny)
    prob = tjac.Problem(r)
    func_prob = tjac.Problem(r, model_backend="func")
    _libc().malloc_trim(0)
    base = status_kib("VmRSS") * 1024
    t = time.perf_counter()
    op = tjac.TrainingJacobian(prob, checkpoint="sqrt", backend="eager", block_size=K + 8)
    traj_s = time.perf_counter() - t
    P, T = op.shape[0], op.num_steps
    R = min(plain_run_seconds(prob) for _ in range(2))
    res = tjac.train(prob)
    training = {key: float(getattr(res, key)) for key in
                ("train_loss", "test_loss", "train_acc", "test_acc") if hasattr(res, key)}
    log(f"{target}: {type(prob.model).__name__}, P={P:,} T={T} R={R:.1f}s, trajectory pass "
        f"{traj_s:.1f}s; training {training}")
    out = {"target": target, "recipe": r.to_dict(), "P": P, "T": T, "R_seconds": R,
           "trajectory_seconds": traj_s, "checkpoint": "sqrt", "model": type(prob.model).__name__,
           "training": training, "base_rss": base}
    costs = per_vector_costs(op, func_prob, probe_steps, log)
    out["jvp_seconds_per_vector"] = costs
    out["jvp_R_per_vector"] = {n: {k: (v / R if k != "rel_error_vs_func" else v)
                                   for k, v in row.items()} for n, row in costs.items()}
    out["probe_steps"] = probe_steps
    act = op.measure_activation()
    out["activation"] = act.as_dict() if act else None
    # the solve's plan from the measured costs of the hand rules (the operator's eager replay):
    # what svd's `auto` weighs after autotune, without timing the same replays again
    vector_costs = {k: costs["hand"][str(k)] / T for k in BLOCKS}
    item = torch.empty((), dtype=op.dtype).element_size()
    plan = plan_solve(P, K, "top", itemsize=item, vector_costs=vector_costs,
                      replay_block=op.block_size)
    est = plan.estimate
    block = est.block or K + 8
    stored_and_step, solver, planned = upfront(prob, base, est, block, op.block_size)
    per_vector = costs["hand"][str(min(BLOCKS, key=lambda b: abs(b - block)))]
    projected = est.products * per_vector + traj_s
    out["plan"] = {"method": est.method, "block": est.block, "products": est.products,
                   "max_products": est.max_products, "solver_bytes": solver,
                   "states_and_step_bytes": stored_and_step, "planned_peak": planned,
                   "projected_seconds": projected, "projected_hours": projected / 3600}
    log(f"plan: {est.method} block {est.block}, ~{est.products} products (at most "
        f"{est.max_products}) x {per_vector:.1f}s = {projected / 3600:.2f} h projected; planned "
        f"peak {planned / 2**30:.2f} GiB")
    _libc().malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    history, calls, t0, cap = [], [0], time.perf_counter(), cap_minutes * 60
    p0 = op.num_matvecs + op.num_rmatvecs

    def on_pass(h):
        h = dict(h, elapsed_s=time.perf_counter() - t0,
                 products=op.num_matvecs + op.num_rmatvecs - p0)
        h.pop("expected_products", None)
        if h.get("checked", True):  # Lanczos: the steps with a Ritz extraction
            history.append(h)
            log(f"  step {h.get('iteration', h.get('step'))}: sigma_max {h['sigma_max']:.4g}, "
                f"max residual {h['max_residual']:.1e}, {h['n_converged']}/{K}, "
                f"{h['elapsed_s']:.0f}s, {h['products']} products")
        calls[0] += 1  # steps (Lanczos) or passes (randomized) so far
        if h.get("n_converged", 0) < K and h["elapsed_s"] * (1 + 1 / calls[0]) > cap:
            raise _OutOfTime  # the next step (as long as the average one) would end past the cap

    solve = {"k": K, "tol": TOL, "cap_minutes": cap_minutes}
    first = (2 * (K + 8) if est.method == "randomized" else 2 * block) * per_vector
    try:
        if first > cap:  # the first step alone would end past the cap
            raise _OutOfTime
        s = tjac.svd(op, K, which="top", tol=TOL, method=est.method, block=block,
                     callback=on_pass)
        solve.update(status="certified", method=s.method, wall_seconds=s.wall_time,
                     products=s.num_matvecs + s.num_rmatvecs, converged=int(s.converged.sum()),
                     sigma=[float(x) for x in s.S],
                     max_residual_rel=float(s.residuals.max() / s.S[0]))
    except _OutOfTime:
        el = time.perf_counter() - t0
        done = op.num_matvecs + op.num_rmatvecs - p0
        rate = el / done if done else per_vector  # seconds per product, measured where it ran
        solve.update(status="stopped at the cap" if done else "not started: its first step "
                     "alone was projected past the cap", wall_seconds=el, products=done,
                     seconds_per_product=rate,
                     converged=history[-1]["n_converged"] if history else 0,
                     projected_seconds=est.products * rate + traj_s,
                     projected_hours=(est.products * rate + traj_s) / 3600)
    except tjac.linalg.ConvergenceError as e:
        s = e.result
        solve.update(status="ConvergenceError", message=str(e), converged=int(s.converged.sum()))
    solve["history"] = history
    peak = status_kib("VmHWM") * 1024
    out["solve"] = solve
    out["memory"] = {"planned_peak": planned, "measured_peak": peak,
                     "ratio_measured_over_planned": peak / planned}
    if history:  # the plan at the basis the solve reached
        out["memory"].update(at_end(prob, base, est.method, block, op.block_size, history, peak,
                                    solve["status"] == "certified"))
    out["within_2h"] = (solve.get("status") == "certified"
                        and solve["wall_seconds"] + traj_s <= HOURS * 3600)
    out["total_seconds"] = time.perf_counter() - t_all
    log(f"{target}: {solve['status']}, {solve.get('products')} products in "
        f"{solve.get('wall_seconds', 0):.0f}s; peak {peak / 2**30:.2f} GiB measured vs "
        f"{planned / 2**30:.2f} planned")
    return out


def memory_check(target, steps, log, tiny=False):
    """Memory only: the target's solve path (single-vector Lanczos) for ``steps`` steps, no
    per-vector probes: measured peak (VmHWM after clear_refs, as in :func:`run_case`) against the
    plan at the basis reached (:func:`at_end`), with the k vectors' replay of the fresh residuals
    that end the solve (as a certified one's do)."""
    import torch

    import tjac
    from tjac.memory import _libc

    torch.set_num_threads(os.cpu_count() or 1)
    prob = tjac.Problem(recipe(target, tiny))
    tjac.Problem(recipe(target, tiny), model_backend="func")  # as run_case holds (its base)
    _libc().malloc_trim(0)
    base = status_kib("VmRSS") * 1024
    op = tjac.TrainingJacobian(prob, checkpoint="sqrt", backend="eager", block_size=K + 8)
    act = op.measure_activation()
    _libc().malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    history = []
    t = time.perf_counter()
    tjac.svd(op, K, which="top", tol=TOL, method="lanczos", block=1, maxiter=steps,
             raise_on_failure=False,
             callback=lambda h: history.append(h) if h.get("checked", True) else None)
    peak = status_kib("VmHWM") * 1024
    out = {"steps": steps, "seconds": time.perf_counter() - t, "base_rss": base,
           "activation": act.as_dict() if act else None, "measured_peak": peak,
           **at_end(prob, base, "lanczos", 1, op.block_size, history, peak, True)}
    log(f"{target}: memory check, {steps} steps: {out}")
    return out


def replan(path, log):
    """The plan at the solve's end (:func:`at_end`) for results written without it: the problem is
    rebuilt (no training) with the activation the run measured."""
    import tjac
    from tjac.memory import ActivationEstimate
    with open(path) as f:
        out = json.load(f)
    for target, res in out["results"].items():
        solve, plan = res.get("solve", {}), res.get("plan", {})
        if not solve.get("history"):
            continue
        prob = tjac.Problem(recipe(target))
        act = res["activation"]
        prob.activation = ActivationEstimate(tuple(act["widths"]), tuple(act["bytes"]),
                                             act["fixed"], act["per_vector"], act["method"])
        block = plan["block"] or K + 8
        from types import SimpleNamespace
        est = SimpleNamespace(method=plan["method"], bytes=plan["solver_bytes"])
        states, _, planned = upfront(prob, res["base_rss"], est, block, K + 8)
        plan.update(states_and_step_bytes=states, planned_peak=planned)
        peak = res["memory"]["measured_peak"]
        res["memory"].update(planned_peak=planned, ratio_measured_over_planned=peak / planned)
        res["memory"].update(at_end(prob, res["base_rss"], plan["method"], block, K + 8,
                                     solve["history"], res["memory"]["measured_peak"],
                                     solve["status"] == "certified"))
        log(f"{target}: {res['memory']}")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", default="resnet,lm")
    ap.add_argument("--cap-minutes", type=float, default=30.0)
    ap.add_argument("--probe-steps", type=int, default=2)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--tiny", action="store_true", help="small nets, 4 steps: check the script")
    ap.add_argument("--merge", action="store_true", help="keep the other targets already in --out")
    ap.add_argument("--replan", action="store_true",
                    help="recompute the plan at each solve's end in --out (no products)")
    ap.add_argument("--memory-steps", type=int, default=0,
                    help="memory only: this many single-vector Lanczos steps per target, "
                         "no probes; kept as the target's memory_check in --out")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                  "million.json"))
    a = ap.parse_args()

    def log(s):
        print(s, file=sys.stderr, flush=True)

    unknown = set(a.targets.split(",")) - {"resnet", "lm"}
    if unknown:
        ap.error(f"unknown targets {sorted(unknown)} (resnet, lm)")
    if a.memory_steps < 0:
        ap.error(f"--memory-steps must be >= 0, got {a.memory_steps}")
    if a.replan:
        replan(a.out, log)
        return
    if a.case:
        print(json.dumps(memory_check(a.case, a.memory_steps, log, a.tiny) if a.memory_steps
                         else run_case(a.case, a.cap_minutes, a.probe_steps, log, a.tiny)))
        return
    from _env import environment
    out = {"note": __doc__.split("\n\n")[0], "environment": environment(), "results": {}}
    if a.merge and os.path.exists(a.out):
        with open(a.out) as f:
            out["results"] = json.load(f)["results"]
    for target in a.targets.split(","):
        p = subprocess.run([sys.executable, __file__, "--case", target, "--cap-minutes",
                            str(a.cap_minutes), "--probe-steps", str(a.probe_steps),
                            "--memory-steps", str(a.memory_steps)]
                           + (["--tiny"] if a.tiny else []),
                           check=False, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        row = ({"error": f"exit {p.returncode}"} if p.returncode
               else json.loads(p.stdout.strip().splitlines()[-1]))
        if a.memory_steps:  # beside the target's full result, which stays
            out["results"].setdefault(target, {})["memory_check"] = row
        else:
            out["results"][target] = row
        os.makedirs(os.path.dirname(a.out), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)
    print(f"wrote {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
