"""Operator cost in units of R = one plain training run of the same recipe, measured side by side.

For each recipe and each replay backend (eager, fused, compiled): R (and a torch.optim loop of the
same recipe); one JVP; one VJP including the trajectory pass; per-vector cost of block JVP/VJP at
block sizes 1, 8, 32, 64, 128, 256; the arithmetic floor (tangent flops at the measured GEMM rate);
peak RSS and stored-state size of the VJP per checkpoint
policy (each in a fresh subprocess). Accuracy first: the adjoint identity on the timed vectors.

    python benchmarks/bench_operator.py [--quick] [--device cpu|cuda] [--backends eager,fused] [--out PATH]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import _env  # noqa: E402

import tjac  # noqa: E402
from tjac.bench import measure_operator, memory_by_policy  # noqa: E402

# the 1e5 model runs 5 epochs (125 steps): costs in units of R do not depend on T
RECIPES = {"paper": dict(), "mlp_1e5": dict(width=300, depth=2, epochs=5)}
BLOCKS = {"paper": (1, 8, 32, 64, 128, 256), "mlp_1e5": (1, 8, 32, 64)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="paper recipe only, blocks 1 and 8")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    ap.add_argument("--backends", default="eager,fused,compiled",
                    help="comma-separated replay backends to measure")
    ap.add_argument("--memory-only", action="store_true",
                    help="re-measure only the memory per checkpoint policy into the existing JSON")
    a = ap.parse_args()
    out = a.out or os.path.join(os.path.dirname(__file__), "results",
                                "operator.json" if a.device == "cpu" else f"operator-{a.device}.json")
    names = ["paper"] if a.quick else list(RECIPES)
    backends = ("auto",) if a.quick else tuple(b for b in a.backends.split(",") if b)
    if a.memory_only:
        import json
        with open(out) as f:
            res = json.load(f)
        for name in names:
            r = tjac.Recipe.paper(device=a.device, **RECIPES[name])
            res["results"][name]["vjp_memory"] = mem = memory_by_policy(r)
            print(name, mem, flush=True)
        _env.write(out, res)
        return
    res = {"unit": "R = one plain training run of the same recipe, same process", "results": {}}
    for name in names:
        r = tjac.Recipe.paper(device=a.device, **RECIPES[name])
        print(name, flush=True)
        blocks = (1, 8) if a.quick else BLOCKS[name]
        res["results"][name] = measure_operator(r, blocks=blocks, backends=backends,
                                                repeats=1 if a.quick else 2,
                                                log=lambda s: print("  " + s, flush=True))
        res["results"][name]["vjp_memory"] = mem = memory_by_policy(r)
        print(f"  memory: {mem}", flush=True)
    _env.write(out, res)


if __name__ == "__main__":
    main()
