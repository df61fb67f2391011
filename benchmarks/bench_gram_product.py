"""Seconds per JᵀJ product (one JVP replay and one VJP sweep per block) at the interval counts'
probe blocks, for projecting the quadrature's cost at sizes where it cannot be run here.

For each width of the paper's recipe: train once, autotune the replay, then time
``op.rmatmat(op.matmat(X))`` for X of ``--blocks`` columns (``--repeats`` times, the fastest kept);
seconds per product = time / (2 x columns).

    python benchmarks/bench_gram_product.py [--widths 64,1333] [--blocks 4,8] [--out PATH]
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import _env  # noqa: E402

import torch  # noqa: E402

import tjac  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--widths", default="64,1333")
    ap.add_argument("--blocks", default="4,8")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    out = a.out or os.path.join(os.path.dirname(__file__), "results", "gram-product.json")
    rows = []
    for w in [int(x) for x in a.widths.split(",")]:
        t = time.perf_counter()
        op = tjac.TrainingJacobian(tjac.Recipe.paper(width=w))
        train_s = time.perf_counter() - t
        t = time.perf_counter()
        tuned = op.autotune()
        tune_s = time.perf_counter() - t
        P = op.shape[0]
        gen = torch.Generator().manual_seed(0)
        for b in [int(x) for x in a.blocks.split(",")]:
            X = torch.randn(P, b, generator=gen, dtype=torch.float64)
            best = float("inf")
            for _ in range(a.repeats):
                t = time.perf_counter()
                op.rmatmat(op.matmat(X))
                best = min(best, time.perf_counter() - t)
            rows.append({"width": w, "P": P, "block": b, "seconds_gram_block": best,
                         "seconds_per_product": best / (2 * b), "train_seconds": train_s,
                         "autotune_seconds": tune_s,
                         "backend": tuned.get("backend")})
            print(rows[-1], flush=True)
            _env.write(out, {"rows": rows, "torch_threads": torch.get_num_threads(),
                             "environment": _env.environment()})
    print("wrote", out)


if __name__ == "__main__":
    main()
