"""Hand-derived block HVPs (tjac.models.graph) against torch.func's, side by side in one process.

For each user model, two problems of the same recipe: ``Problem(r)`` (a traced module gets the
hand-derived rules: GraphModel) and ``Problem(r, model_backend="func")`` (torch.func's
forward-over-reverse, the generic path before). Per-vector seconds of a block JVP and VJP at
several block widths for: hand (eager replay), func (eager replay), double-backward (autograd's
reverse-over-reverse); in units of R (one plain training run of the same recipe; training uses
torch.func's gradient in both, so R and theta_T are the same). Measurements alternate between the
backends and keep the best of ``--repeats``; products are checked against func's first (1e-10).

Targets: ``cnn`` the BatchNorm CNN of bench_user.py (1.06e5 parameters, MNIST-shaped, batch 128);
``resnet`` a ResNet-style CNN with BatchNorm (_models.ResNet, widths 16-32-64-128, CIFAR-shaped,
batch 32); ``transformer`` a causal transformer LM (_models.TinyLM, d 64, 2 blocks, vocab 256,
32 tokens, batch 32); ``resnet-1e6`` and ``lm-1e6`` bench_million.py's models at 1e6 parameters
(_models.ResNet 32-64-128-256, P = 1.37e6, and _models.TinyLM d 128, 5 blocks, vocab 512,
P = 1.13e6; batch 16). Target: <= 2.5 R per vector (issue: CNN 4.5 R through torch.func).

    python benchmarks/bench_hand.py [--targets cnn,resnet,transformer,resnet-1e6,lm-1e6] [--steps 8]
        [--blocks 1,4,16] [--repeats 2] [--out PATH]
"""
import argparse
import functools
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import _models
import bench_user

import tjac
from tjac.bench import plain_run_seconds

TARGETS = ("cnn", "resnet", "transformer", "resnet-1e6", "lm-1e6")


def recipe(target, steps):
    if target == "resnet-1e6":
        return tjac.Recipe.paper(model=_models.resnet, dataset=_models.cifar_like(16 * steps, 64),
                                 batch_size=16, epochs=1)
    if target == "lm-1e6":
        return tjac.Recipe.paper(model=_models.tiny_lm, dataset=_models.tokens_like(16 * steps, 64),
                                 batch_size=16, epochs=1, lr=0.03)
    if target == "cnn":
        data = bench_user.mnist_like(128 * steps, 256)
        return tjac.Recipe.paper(model=bench_user.bn_cnn, dataset=data, batch_size=128, epochs=1)
    if target == "resnet":
        data = _models.cifar_like(32 * steps, 64)
        return tjac.Recipe.paper(model=functools.partial(_models.resnet, widths=(16, 32, 64, 128)),
                                 dataset=data, batch_size=32, epochs=1)
    data = _models.tokens_like(32 * steps, 64, vocab=256)
    return tjac.Recipe.paper(model=functools.partial(_models.tiny_lm, vocab=256, d=64,
                                                         depth=2, heads=4),
                             dataset=data, batch_size=32, epochs=1, lr=0.03)


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def run_target(target, *, steps, blocks, repeats, log):
    r = recipe(target, steps)
    hand = tjac.TrainingJacobian(tjac.Problem(r), backend="eager")
    func = tjac.TrainingJacobian(tjac.Problem(r, model_backend="func"), backend="eager")
    model = type(hand.problem.model).__name__
    if model != "GraphModel":
        raise RuntimeError(f"{target}: the module was not recognised ({model})")
    if not torch.equal(hand.thetaT, func.thetaT):
        raise RuntimeError(f"{target}: training differs between the two problems")
    R = min(min(plain_run_seconds(op.problem) for _ in range(2)) for op in (hand, func))
    P, T = hand.shape[0], hand.num_steps
    log(f"{target}: P={P} T={T} R={R:.3f}s")
    gen = torch.Generator().manual_seed(0)
    V = torch.randn(P, max(blocks), generator=gen, dtype=torch.float64)
    W = torch.randn(P, max(blocks), generator=gen, dtype=torch.float64)
    # accuracy first: one block of 2 through every backend against func's
    ref = (func.matmat(V[:, :2]), func.rmatmat(W[:, :2]))
    acc = {}
    for name, op, backend in (("hand", hand, "eager"), ("double-backward", func, "double-backward")):
        op.backend = backend
        acc[name] = {"jvp_rel_error_vs_func": _rel(op.matmat(V[:, :2]), ref[0]),
                     "vjp_rel_error_vs_func": _rel(op.rmatmat(W[:, :2]), ref[1])}
        if max(acc[name].values()) > 1e-10:
            raise RuntimeError(f"{target} {name}: products disagree with func's: {acc[name]}")
    func.backend = "eager"
    rows = {}
    runs = (("hand", hand, "eager"), ("func", func, "eager"),
            ("double-backward", func, "double-backward"))
    for k in blocks:
        best = {}
        for _ in range(repeats):  # alternate, so drifts of the shared machine hit every backend
            for name, op, backend in runs:
                op.backend = backend
                for kind, fn, X in (("jvp", op.matmat, V), ("vjp", op.rmatmat, W)):
                    t = time.perf_counter()
                    fn(X[:, :k])
                    s = time.perf_counter() - t
                    key = (name, kind)
                    best[key] = min(best.get(key, s), s)
        for (name, kind), s in best.items():
            rows.setdefault(name, {}).setdefault(str(k), {})[f"{kind}_seconds_per_vector"] = s / k
            rows[name][str(k)][f"{kind}_R_per_vector"] = s / k / R
        log(f"  block {k}: " + ", ".join(
            f"{n} JVP {rows[n][str(k)]['jvp_R_per_vector']:.2f} R / VJP "
            f"{rows[n][str(k)]['vjp_R_per_vector']:.2f} R" for n, _, _ in runs))
    ratio = {str(k): {kind: rows["hand"][str(k)][f"{kind}_seconds_per_vector"]
                      / rows["func"][str(k)][f"{kind}_seconds_per_vector"]
                      for kind in ("jvp", "vjp")} for k in blocks}
    return {"P": P, "T": T, "R_seconds": R, "model": model, "recipe": r.to_dict(),
            "accuracy": acc, "per_vector": rows, "hand_over_func": ratio}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", default="cnn,resnet,transformer")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--blocks", default="1,4,16")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--merge", action="store_true", help="keep the other targets already in --out")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                  "hand-rules.json"))
    a = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    def log(s):
        print(s, flush=True)

    unknown = set(a.targets.split(",")) - set(TARGETS)
    if unknown:
        ap.error(f"unknown targets {sorted(unknown)} ({', '.join(TARGETS)})")
    blocks = [int(b) for b in a.blocks.split(",")]
    out = {"note": ("per-vector seconds of block JVPs/VJPs, hand-derived rules (GraphModel) vs "
                    "torch.func vs double backward, measured alternately in one process; "
                    "R = one plain training run of the same recipe"),
           "steps": a.steps, "blocks": blocks, "results": {}}
    if a.merge and os.path.exists(a.out):
        with open(a.out) as f:
            out["results"] = json.load(f)["results"]
    for target in a.targets.split(","):
        out["results"][target] = run_target(target, steps=a.steps, blocks=blocks,
                                            repeats=a.repeats, log=log)
        bench_user._write(a.out, out)
    log(f"wrote {a.out}")


if __name__ == "__main__":
    main()
