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
from .replay import autotune  # noqa: F401 (tjac.bench.autotune: its first home)
from .replay.autotune import _sync
from .recipe import Recipe
from .problem import Problem, check_fits, memory_estimate  # noqa: F401
from .trajectory import run_segment  # noqa: F401


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


def torch_reference_seconds(prob: Problem) -> float | None:
    """One training run written the way users write it: ``nn.Sequential``, ``F.cross_entropy``,
    ``loss.backward()``, ``torch.optim`` (MLP family only; None otherwise). A second unit next to
    R: how fast a user's own plain loop trains the same recipe on the same device."""
    import torch.nn as nn
    import torch.nn.functional as F

    spec, o = prob.recipe.model, prob.recipe.optim
    if spec.family != "mlp" or spec.dropout:
        return None
    widths = prob.model.widths
    layers = []
    act = {"gelu_tanh": lambda: nn.GELU(approximate="tanh"), "tanh": nn.Tanh, "relu": nn.ReLU}
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(act[spec.activation]())
    net = nn.Sequential(*layers).to(device=prob.device, dtype=prob.dtype)
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(prob.init_theta(), net.parameters())
    if o.name == "sgd":
        opt = torch.optim.SGD(net.parameters(), lr=o.lr, momentum=o.momentum,
                              nesterov=o.nesterov, weight_decay=o.weight_decay)
    else:
        cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
        opt = cls(net.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                  weight_decay=o.weight_decay)
    from .optim import learning_rate

    _sync(prob.device)
    t0 = time.perf_counter()
    for t in range(prob.num_steps):
        for grp in opt.param_groups:
            grp["lr"] = learning_rate(o, t, prob.num_steps)
        x, y = prob.batch(t)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        opt.step()
    _sync(prob.device)
    return time.perf_counter() - t0


def tangent_flops_per_vector_step(prob: Problem) -> int | None:
    """Floating-point operations one tangent (or cotangent) costs per step in an MLP's block HVP:
    per layer the forward tangent dW a (+ W da) and the backward dDelta a (+ delta da), and for
    inner layers d(delta W) (2 products); 2 flops per multiply-add. None for other families."""
    if prob.recipe.model.family != "mlp":
        return None
    B = prob.recipe.batch_size
    w = prob.model.widths
    macs = sum((2 if i == 0 else 6) * B * a * b for i, (a, b) in enumerate(zip(w[:-1], w[1:])))
    return 2 * macs


def gemm_flops_per_second(prob: Problem, k: int = 64, repeats: int = 20) -> float:
    """This device's rate on the block HVP's dominant GEMM shape, (k*out, in) @ (in, B), in the
    recipe's dtype: the ceiling for any replay backend."""
    w, B = prob.model.widths, prob.recipe.batch_size
    a = torch.randn(k * w[1], w[0], dtype=prob.dtype, device=prob.device)
    b = torch.randn(w[0], B, dtype=prob.dtype, device=prob.device)
    out = torch.empty(k * w[1], B, dtype=prob.dtype, device=prob.device)
    torch.mm(a, b, out=out)
    best = _best(lambda: [torch.mm(a, b, out=out) for _ in range(repeats)], 3, prob.device)
    return 2 * k * w[1] * w[0] * B * repeats / best


def measure_operator(recipe: Recipe, *, blocks=(1, 8, 32, 128), backends=("auto",), repeats: int = 2,
                     log=print) -> dict:
    """R; one JVP; one VJP (with and without the trajectory pass); per-vector block costs; for each
    replay backend. The top-level figures are the first backend's; ``backends`` holds all."""
    from . import replay

    prob = Problem(recipe)
    dev = prob.device
    check_fits(prob, checkpoint="all", block=max(blocks))
    names = list(dict.fromkeys(replay.resolve(prob, b) for b in backends))
    plain_run_seconds(prob)  # warm-up
    R = min(plain_run_seconds(prob) for _ in range(repeats))
    ref = torch_reference_seconds(prob)
    ref = min(ref, torch_reference_seconds(prob)) if ref is not None else None
    P = prob.num_params
    gen = torch.Generator().manual_seed(0)
    traj = _best(lambda: TrainingJacobian(prob), repeats, dev)
    op = TrainingJacobian(prob, backend=names[0])
    out = {"recipe": recipe.to_dict(), "P": P, "T": prob.num_steps, "device": str(dev),
           "R_seconds": R, "R_torch_loop_seconds": ref, "trajectory_pass_R": traj / R,
           "backends": {}}
    log(f"P={P} T={prob.num_steps} R={R:.3f}s (torch.optim loop: "
        f"{'n/a' if ref is None else f'{ref:.3f}s'}), trajectory pass {traj / R:.2f} R")
    flops = tangent_flops_per_vector_step(prob)
    if flops is not None:  # the arithmetic floor of a JVP per vector, at this device's GEMM rate
        rate = gemm_flops_per_second(prob)
        out.update(tangent_flops_per_vector_step=flops, gemm_gflops=rate / 1e9,
                   floor_per_vector_R=flops * prob.num_steps / rate / R)
        log(f"GEMM {rate / 1e9:.0f} GFLOP/s; floor (tangent flops at that rate) "
            f"{out['floor_per_vector_R']:.3f} R per vector")
    v = torch.randn(P, 1, generator=gen, dtype=torch.float64).to(dev, prob.dtype)
    w = torch.randn(P, 1, generator=gen, dtype=torch.float64).to(dev, prob.dtype)
    Vs = {k: torch.randn(P, k, generator=gen, dtype=torch.float64).to(dev, prob.dtype) for k in blocks}
    for name in names:
        op.backend = name
        jv, jtw = op.matmat(v), op.rmatmat(w)  # (also compiles, for `compiled`)
        adj = float(abs((jv * w).sum() - (v * jtw).sum()) / (jv.norm() * w.norm()))
        jvp = _best(lambda: op.matmat(v), repeats, dev)
        vjp = _best(lambda: op.rmatmat(w), repeats, dev)
        res = {"adjoint_rel_error": adj, "jvp_R": jvp / R, "vjp_R": vjp / R,
               "vjp_with_trajectory_R": (vjp + traj) / R, "jvp_per_second": 1 / jvp,
               "vjp_per_second": 1 / vjp, "block": {}}
        log(f"[{name}] JVP {jvp / R:.2f} R, VJP {vjp / R:.2f} R, VJP + trajectory "
            f"{(vjp + traj) / R:.2f} R, adjoint error {adj:.1e}")
        for k in blocks:
            V = Vs[k]
            op.block_size = k
            if name == "compiled":
                op.matmat(V), op.rmatmat(V)  # compile for this width first
            tj = _best(lambda: op.matmat(V), 1, dev)
            tv = _best(lambda: op.rmatmat(V), 1, dev)
            row = {"jvp_per_vector_R": tj / k / R, "vjp_per_vector_R": tv / k / R,
                   "jvp_vectors_per_second": k / tj, "vjp_vectors_per_second": k / tv}
            if ref is not None:
                row["jvp_per_vector_R_torch_loop"] = tj / k / ref
            res["block"][str(k)] = row
            log(f"  block {k:4d}: JVP {tj / k / R:.3f} R/vector ({k / tj:.1f}/s), "
                f"VJP {tv / k / R:.3f} R/vector ({k / tv:.1f}/s)")
        op.block_size = 128
        out["backends"][name] = res
    out.update({key: val for key, val in out["backends"][names[0]].items()})
    out["backend"] = names[0]
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


if __name__ == "__main__":
    _memory_child(*sys.argv[1:3])
