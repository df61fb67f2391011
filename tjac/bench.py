"""Operator throughput in units of R = one plain training run of the same recipe on the same device,
measured side by side in one process; block-size autotuning; memory estimates.

Behind ``tjac bench`` and ``benchmarks/bench_operator.py``.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

import torch

from .operator import TrainingJacobian
from .recipe import Recipe
from .trajectory import Problem, check_fits, memory_estimate, run_segment  # noqa: F401


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def plain_run_seconds(prob: Problem) -> float:
    _sync(prob.device)
    t = time.perf_counter()
    run_segment(prob, prob.optimizer.init(prob.init_theta()), 0, prob.num_steps, keep=False)
    _sync(prob.device)
    return time.perf_counter() - t


def _best(fn, n, device):
    ts = []
    for _ in range(n):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        ts.append(time.perf_counter() - t)
    return min(ts)


def measure_operator(recipe: Recipe, *, blocks=(1, 8, 32, 128), repeats: int = 2, log=print) -> dict:
    """R; one JVP; one VJP (with and without the trajectory pass); per-vector block costs."""
    prob = Problem(recipe)
    dev = prob.device
    check_fits(prob, checkpoint="all", block=max(blocks))
    plain_run_seconds(prob)  # warm-up
    R = min(plain_run_seconds(prob) for _ in range(repeats))
    P = prob.num_params
    gen = torch.Generator().manual_seed(0)
    traj = _best(lambda: TrainingJacobian(prob), repeats, dev)
    op = TrainingJacobian(prob)
    v = torch.randn(P, 1, generator=gen, dtype=torch.float64).to(dev, prob.dtype)
    w = torch.randn(P, 1, generator=gen, dtype=torch.float64).to(dev, prob.dtype)
    jv, jtw = op.matmat(v), op.rmatmat(w)
    adj = float(abs((jv * w).sum() - (v * jtw).sum()) / (jv.norm() * w.norm()))
    jvp = _best(lambda: op.matmat(v), repeats, dev)
    vjp = _best(lambda: op.rmatmat(w), repeats, dev)
    out = {"recipe": recipe.to_dict(), "P": P, "T": prob.num_steps, "device": str(dev),
           "R_seconds": R, "adjoint_rel_error": adj, "trajectory_pass_R": traj / R,
           "jvp_R": jvp / R, "vjp_R": vjp / R, "vjp_with_trajectory_R": (vjp + traj) / R,
           "jvp_per_second": 1 / jvp, "vjp_per_second": 1 / vjp, "block": {}}
    log(f"P={P} T={prob.num_steps} R={R:.3f}s: JVP {jvp / R:.2f} R, VJP {vjp / R:.2f} R, "
        f"VJP + trajectory {(vjp + traj) / R:.2f} R, adjoint error {adj:.1e}")
    for k in blocks:
        V = torch.randn(P, k, generator=gen, dtype=torch.float64).to(dev, prob.dtype)
        op.block_size = k
        tj = _best(lambda: op.matmat(V), 1, dev)
        tv = _best(lambda: op.rmatmat(V), 1, dev)
        out["block"][str(k)] = {"jvp_per_vector_R": tj / k / R, "vjp_per_vector_R": tv / k / R,
                                "jvp_vectors_per_second": k / tj, "vjp_vectors_per_second": k / tv}
        log(f"  block {k:4d}: JVP {tj / k / R:.3f} R/vector ({k / tj:.1f}/s), "
            f"VJP {tv / k / R:.3f} R/vector ({k / tv:.1f}/s)")
    return out


def memory_by_policy(recipe: Recipe, policies=("all", "sqrt")) -> dict:
    """Peak RSS of one VJP per checkpoint policy, each in a fresh subprocess."""
    out = {}
    for policy in policies:
        p = subprocess.run([sys.executable, "-m", "tjac.bench", recipe.to_json(), str(policy)],
                           capture_output=True, text=True, check=True)
        out[str(policy)] = json.loads(p.stdout.strip().splitlines()[-1])
    return out


def _memory_child(recipe_json: str, policy: str):
    recipe = Recipe.from_json(recipe_json)
    policy = int(policy) if policy.isdigit() else policy
    op = TrainingJacobian(recipe, checkpoint=policy)
    op.rmatmat(torch.randn(op.shape[0], 1, dtype=torch.float64).to(op.device, op.dtype))
    state_bytes = op.shape[0] * op.theta0.element_size() * len(op.problem.optimizer.state_names)
    print(json.dumps({"peak_rss_mib": _peak_rss_mib(),
                      "stored_states": op.trajectory.stored_states,
                      "stored_state_mib": op.trajectory.stored_states * state_bytes / 2**20,
                      "T": op.num_steps}))


def _peak_rss_mib() -> float:
    """VmHWM of this process (ru_maxrss would carry the parent's peak across exec on Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:  # pragma: no cover (not Linux)
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def autotune_block(prob: Problem, candidates=(8, 16, 32, 64, 128), steps: int = 10) -> dict:
    """Per-vector cost of ``steps`` JVP steps at each block size; returns the fastest and the table.

    Short (a few steps per candidate), so it is cheap next to a solve; the result goes into the
    run's provenance."""
    P = prob.num_params
    theta = prob.init_theta()
    opt = prob.optimizer
    table = {}
    for k in candidates:
        V = torch.zeros(k, P, dtype=prob.dtype, device=prob.device)
        state, ds = opt.init(theta), (V,) + (torch.zeros_like(V),) * (len(opt.state_names) - 1)
        _sync(prob.device)
        t = time.perf_counter()
        with torch.no_grad():
            for s in range(min(steps, prob.num_steps)):
                g, hv = prob.grad_hvp(state[0], ds[0], s)
                state, ds = opt.jvp(state, g, ds, hv, s)
        _sync(prob.device)
        table[k] = (time.perf_counter() - t) / k
    best = min(table, key=table.get)
    return {"block": best, "seconds_per_vector_step": {str(k): v / max(1, min(steps, prob.num_steps))
                                                        for k, v in table.items()}}


if __name__ == "__main__":
    _memory_child(*sys.argv[1:3])
