"""Top-16 of the paper's MLP family from P ~ 1e3 to 1e5: replays to certify, seconds, and cost in R.

Issue-5 targets: the number of replays to certify top-16 stays flat (within +-50%) from P = 1e3 to
1e5, and P ~ 1e5 certifies in < 15 min on this 2-core CPU. Each recipe is the paper's (digits, SGD,
cosine, 25 epochs) with a different width/depth; the backend and block are autotuned per recipe
(the tuning time is reported and included in the total).

    python benchmarks/bench_scale.py [--sizes 1e3,1e4,1e5] [--k 16] [--tol 1e-8] [--device cuda]

Writes benchmarks/results/scale-top16.json (with the environment).
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import _env  # noqa: E402

import tjac  # noqa: E402
from tjac.bench import autotune, plain_run_seconds  # noqa: E402
from tjac.trajectory import Problem  # noqa: E402

SIZES = {"1e3": dict(width=14), "1e4": dict(width=140), "1e5": dict(width=300, depth=2),
         # between the decades (P = 3,385 and 33,910): is the step from 1e3 to 1e4 a trend in P?
         "3e3": dict(width=45), "3e4": dict(width=150, depth=2),
         # the GPU target (P = 1,126,410; run it with --device cuda on a lent GPU)
         "1e6": dict(width=1024, depth=2)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1e3,1e4,1e5")
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--tol", type=float, default=1e-8)
    ap.add_argument("--epochs", type=int, default=25)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                  "scale-top16.json"))
    a = ap.parse_args()
    rows = []
    for name in a.sizes.split(","):
        recipe = tjac.Recipe.paper(epochs=a.epochs, device=a.device, **SIZES[name])
        t0 = time.perf_counter()
        prob = Problem(recipe)
        R = plain_run_seconds(prob)
        t1 = time.perf_counter()
        tuned = autotune(prob)
        t2 = time.perf_counter()
        op = tjac.TrainingJacobian(prob, backend=tuned["backend"], block_size=tuned["block"])
        r = tjac.svd(op, a.k, which="top", tol=a.tol)
        t3 = time.perf_counter()
        row = {"size": name, "device": a.device, "P": prob.num_params, "T": prob.num_steps,
               "R_seconds": R,
               "backend": tuned["backend"], "block": tuned["block"], "method": r.method,
               "replays": op.num_replays, "products": r.num_matvecs + r.num_rmatvecs,
               "certified": bool(r.all_converged), "max_certificate": float(r.certificate.max()),
               "sigma_max": float(r.S[0]), "sigma_k": float(r.S[-1]),
               "autotune_s": t2 - t1, "solve_s": t3 - t2, "total_s": t3 - t0,
               "solve_R": (t3 - t2) / R}
        rows.append(row)
        print(row, flush=True)
        reps = [r["replays"] for r in rows]
        out = {"k": a.k, "tol": a.tol, "rows": rows,
               "replays_max_over_min": max(reps) / min(reps)}
        _env.write(a.out, {"results": out})  # after every size: a run cut short keeps its rows
    print(f"replays {reps}: max/min = {out['replays_max_over_min']:.2f}", flush=True)


if __name__ == "__main__":
    main()
