"""Operator cost in units of R = one plain training run of the same recipe, measured side by side.

For each recipe: R; one JVP; one VJP including the trajectory pass (construction + reverse sweep);
per-vector cost of block JVP/VJP at block sizes 1, 8, 32, 128; peak RSS of the VJP per checkpoint
policy (each policy in a fresh subprocess). Accuracy first: the adjoint identity is checked on the
vectors that are timed.

    python benchmarks/bench_operator.py [--quick] [--out benchmarks/results/operator.json]
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import _env  # noqa: E402

import tjac  # noqa: E402
from tjac.trajectory import Problem, run_segment  # noqa: E402

RECIPES = {
    "paper": dict(),
    "mlp_1e5": dict(width=300, depth=2),
}


def plain_run(prob):
    t = time.perf_counter()
    run_segment(prob, prob.optimizer.init(prob.init_theta()), 0, prob.num_steps, keep=False)
    return time.perf_counter() - t


def best_of(fn, n=2):
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)


def measure(name, kw, blocks, repeats):
    r = tjac.Recipe.paper(**kw)
    prob = Problem(r)
    R = min(plain_run(prob) for _ in range(repeats))
    P = prob.num_params
    gen = torch.Generator().manual_seed(0)
    t = time.perf_counter()
    op = tjac.TrainingJacobian(prob)
    traj = time.perf_counter() - t
    v = torch.randn(P, 1, generator=gen, dtype=torch.float64)
    w = torch.randn(P, 1, generator=gen, dtype=torch.float64)
    jv, jtw = op.matmat(v), op.rmatmat(w)
    adj = float(abs((jv * w).sum() - (v * jtw).sum()) / (jv.norm() * w.norm()))
    jvp = best_of(lambda: op.matmat(v), repeats)
    vjp = best_of(lambda: op.rmatmat(w), repeats)
    out = {"recipe": r.to_dict(), "P": P, "T": prob.num_steps, "R_seconds": R,
           "adjoint_rel_error": adj, "trajectory_pass_R": traj / R, "jvp_R": jvp / R,
           "vjp_R": vjp / R, "vjp_with_trajectory_R": (vjp + traj) / R, "block": {}}
    for k in blocks:
        V = torch.randn(P, k, generator=gen, dtype=torch.float64)
        op.block_size = k
        tj = best_of(lambda: op.matmat(V), 1)
        tv = best_of(lambda: op.rmatmat(V), 1)
        out["block"][str(k)] = {"jvp_per_vector_R": tj / k / R, "vjp_per_vector_R": tv / k / R}
        print(f"  {name} k={k}: JVP {tj / k / R:.3f} R/vec, VJP {tv / k / R:.3f} R/vec", flush=True)
    print(f"{name}: P={P} R={R:.3f}s JVP={jvp / R:.2f}R VJP={vjp / R:.2f}R "
          f"VJP+traj={(vjp + traj) / R:.2f}R adjoint={adj:.1e}", flush=True)
    return out


def memory_child(name, policy):
    kw = RECIPES[name]
    r = tjac.Recipe.paper(**kw)
    policy = int(policy) if policy.isdigit() else policy
    op = tjac.TrainingJacobian(r, checkpoint=policy)
    op.rmatmat(torch.randn(op.shape[0], 1, dtype=torch.float64))
    state_bytes = op.shape[0] * 8 * len(op.problem.optimizer.state_names)
    print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "stored_states": op.trajectory.stored_states,
                      "stored_state_mib": op.trajectory.stored_states * state_bytes / 2**20,
                      "T": op.num_steps}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="paper recipe only, blocks 1 and 8")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "operator.json"))
    ap.add_argument("--_memory", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._memory:
        return memory_child(*a._memory)
    names = ["paper"] if a.quick else list(RECIPES)
    blocks = [1, 8] if a.quick else [1, 8, 32, 128]
    res = {"unit": "R = one plain training run of the same recipe, same process", "results": {}}
    for name in names:
        res["results"][name] = measure(name, RECIPES[name], blocks, 1 if a.quick else 2)
        mem = {}
        for policy in ["all", "sqrt"]:
            p = subprocess.run([sys.executable, __file__, "--_memory", name, policy],
                               capture_output=True, text=True, check=True)
            mem[policy] = json.loads(p.stdout.strip().splitlines()[-1])
            print(f"  {name} checkpoint={policy}: {mem[policy]}", flush=True)
        res["results"][name]["vjp_memory"] = mem
    _env.write(a.out, res)


if __name__ == "__main__":
    main()
