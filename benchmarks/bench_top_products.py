"""Products to certify the top of the paper's net by Lanczos at narrow blocks against randomized
block Krylov: the measurement behind ``tjac.linalg.plan.LANCZOS_TOP_PRODUCTS`` (the share of
randomized's products that Lanczos at each block width needs), which ``auto`` uses to weigh
Lanczos against randomized for the top given the operator's measured costs per width.

The paper recipe (P = 4,810, float64), top-16 at tol 1e-6 (the CNN benchmark's tolerance), each
solve from seed 0 on the same operator (backend pinned: ``fused``), method named explicitly.
Product counts are deterministic for a given code and seed; the seconds are only indicative.

    python benchmarks/bench_top_products.py [--k 16] [--tol 1e-6] [--blocks 1,2,4,8] [--out PATH]

Writes ``benchmarks/results/top-products-paper.json``; ``tests/test_plan_constants.py`` checks that
the plan's shares are the ones this file's ``shares`` records.
"""
import argparse
import json
import os
import sys
import time

import torch

import tjac
from tjac._env import environment


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--tol", type=float, default=1e-6)
    ap.add_argument("--blocks", default="1,2,4,8")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "results", "top-products-paper.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    op = tjac.TrainingJacobian(tjac.Recipe.paper(), backend="fused")
    setup = time.perf_counter() - t0
    runs = {}
    for name, kw in [("randomized", dict(method="randomized"))] + [
            (f"lanczos_block{b}", dict(method="lanczos", block=b))
            for b in map(int, a.blocks.split(","))]:
        t = time.perf_counter()
        r = tjac.svd(op, a.k, which="top", tol=a.tol, rng=0, **kw)
        runs[name] = {"products": r.num_matvecs + r.num_rmatvecs, "matvecs": r.num_matvecs,
                      "rmatvecs": r.num_rmatvecs, "seconds": time.perf_counter() - t,
                      "block": kw.get("block") or r.plan.get("expected_block"),
                      "all_converged": bool(r.all_converged),
                      "max_certificate_rel": float((r.certificate / r.norm_estimate).max()),
                      "sigma": [float(s) for s in r.S]}
        print(name, {n: v for n, v in runs[name].items() if n != "sigma"}, file=sys.stderr,
              flush=True)
    ref = runs["randomized"]["products"]
    shares = {n.removeprefix("lanczos_block"): v["products"] / ref
              for n, v in runs.items() if n.startswith("lanczos")}
    ref_sigma = runs["randomized"]["sigma"]
    smax = max(abs(x - y) for v in runs.values() for x, y in zip(v["sigma"], ref_sigma))
    out = {"environment": environment(), "P": op.shape[0], "k": a.k, "tol": a.tol,
           "recipe": "tjac.Recipe.paper() (25 epochs, width 64), backend fused, rng 0",
           "threads": a.threads, "setup_seconds": setup, "runs": runs,
           "shares": shares, "max_sigma_difference_vs_randomized": smax,
           "note": "shares = Lanczos products at each block / randomized block Krylov's products "
                   "(block k + 8), same operator, tol and seed; tjac.linalg.plan."
                   "LANCZOS_TOP_PRODUCTS is these shares rounded up to 2 decimals"}
    with open(a.out, "w") as f:
        json.dump(out, f, indent=2, sort_keys=True)
    print("wrote", a.out, "shares", shares, file=sys.stderr)


if __name__ == "__main__":
    main()
