"""How the interval-count bracket narrows with Lanczos steps on the paper's net (one probe set).

Forms J once (training replays), takes its exact singular values (values only), then runs one
quadrature of ``--probes`` Rademacher probes on the formed J (the same map as the replays: see
bench_density.py --operator formed) and records, every ``--check`` steps, the quadrature gap and
the 95% bracket of bulk(eps) against the exact count (and, side by side, the same rules' looser
Gauss bracket), until both widths are below ``--rtol`` of the count or ``--max-steps``.

    python benchmarks/bench_density_steps.py [--width 64] [--eps 1e-2] [--probes 8]
                                             [--max-steps 3000] [--out PATH]
"""
import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import _env  # noqa: E402

import numpy as np  # noqa: E402

import tjac  # noqa: E402
from tjac.analysis.density import _ProbeLanczos  # noqa: E402
from tjac.linalg import DenseOperator, materialize  # noqa: E402
from tjac.linalg.dense import dense_values  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--eps", type=float, default=1e-2)
    ap.add_argument("--probes", type=int, default=8)
    ap.add_argument("--max-steps", type=int, default=3000)
    ap.add_argument("--check", type=int, default=100)
    ap.add_argument("--rtol", type=float, default=0.10, help="stop at this bracket width / count")
    ap.add_argument("--seed", type=int, default=2)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    import torch

    out = a.out or os.path.join(os.path.dirname(__file__), "results",
                                f"density-steps-w{a.width}.json")
    op = tjac.TrainingJacobian(tjac.Recipe.paper(width=a.width))
    op.autotune()
    P = op.shape[0]
    t = time.perf_counter()
    J = materialize(op)
    sig = dense_values(J.numpy())
    dense_s = time.perf_counter() - t
    lo, hi = 1 - a.eps, 1 + a.eps
    exact = int(((sig >= lo) & (sig <= hi)).sum())
    gen = torch.Generator().manual_seed(a.seed)
    Z = (torch.randint(0, 2, (P, a.probes), generator=gen, dtype=torch.float64) * 2 - 1)
    run = _ProbeLanczos(DenseOperator(J), Z, None)
    rows, t0 = [], time.perf_counter()
    while run.m < min(a.max_steps, P):
        run.step()
        if run.m % a.check == 0 or run.m == a.max_steps:
            q = run.quadrature(P, np.zeros(0), t0)
            c = q.count(lo, hi)
            # the same rules' Gauss bracket (two node weights per end), side by side
            g = dataclasses.replace(q, jacobi=None).count(lo, hi)
            rows.append({"steps": run.m, "estimate": c.estimate, "lower": c.lower,
                         "upper": c.upper, "resolution": c.resolution, "stderr": c.stderr,
                         "rel_width": (c.upper - c.lower) / exact,
                         "contains": c.lower <= exact <= c.upper,
                         "gauss": {"lower": g.lower, "upper": g.upper,
                                   "resolution": g.resolution,
                                   "rel_width": (g.upper - g.lower) / exact,
                                   "contains": g.lower <= exact <= g.upper},
                         "seconds": time.perf_counter() - t0})
            print(rows[-1], flush=True)
            _env.write(out, {"width": a.width, "P": P, "eps": a.eps, "exact": exact,
                             "sigma_max": float(sig[0]), "probes": a.probes, "seed": a.seed,
                             "dense_seconds": dense_s, "operator": "formed J", "rows": rows,
                             "bracket": "gauss-radau (markov-krein); 'gauss': the same rules' "
                                        "gauss partial sums",
                             "environment": _env.environment()})
            if max(rows[-1]["rel_width"], rows[-1]["gauss"]["rel_width"]) <= a.rtol:
                break
    print("wrote", out)


if __name__ == "__main__":
    main()
