"""How the interval-count bracket narrows with Lanczos steps on the paper's net (one probe set).

Forms J once (training replays), takes its exact singular values (values only), then runs one
quadrature of ``--probes`` Rademacher probes on the formed J (the same map as the replays: see
bench_density.py --operator formed) and records, every ``--check`` steps, the quadrature gap and
the 95% bracket of bulk(eps) against the exact count (and, side by side, the same rules' looser
Gauss bracket), until the Gauss-Radau width (with ``--gauss`` both widths) is below ``--rtol`` of
the count or ``--max-steps``. ``--reorth full,none`` runs the same probes through the fully
reorthogonalized recurrence and the plain one side by side (each step of each timed apart).

    python benchmarks/bench_density_steps.py [--width 64] [--eps 1e-2] [--probes 8]
                                             [--max-steps 3000] [--reorth full,none]
                                             [--gauss] [--out PATH]
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
from tjac.linalg.quadrature import _ProbeLanczos  # noqa: E402
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
    ap.add_argument("--reorth", default="full",
                    help="comma-separated from full, none: run side by side on the same probes")
    ap.add_argument("--gauss", action="store_true",
                    help="run until the Gauss bracket too is below --rtol (not only Gauss-Radau)")
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
    kinds = a.reorth.split(",")
    # the same probes through each recurrence, stepped in turn (timed apart, side by side)
    runs = {k: _ProbeLanczos(DenseOperator(J), Z, None, reorth=k) for k in kinds}
    spent = {k: 0.0 for k in kinds}
    done = set()
    rows = []
    m = 0
    # a basis spanning the space ends the full recurrence at P; the plain one goes on
    cap = {k: a.max_steps if k == "none" else min(a.max_steps, P) for k in kinds}
    while len(done) < len(kinds):
        m += 1
        for k in kinds:
            if k in done:
                continue
            t = time.perf_counter()
            runs[k].step()
            spent[k] += time.perf_counter() - t
        if m % a.check and m not in cap.values():
            continue
        for k in kinds:
            if k in done or (m % a.check and m != cap[k]):
                continue
            t = time.perf_counter()
            q = runs[k].quadrature(P, np.zeros(0), t)
            c = q.count(lo, hi)
            spent[k] += time.perf_counter() - t
            # the same rules' Gauss bracket (two node weights per end), side by side
            g = dataclasses.replace(q, jacobi=None).count(lo, hi)
            rows.append({"reorth": k, "steps": m, "estimate": c.estimate, "lower": c.lower,
                         "upper": c.upper, "resolution": c.resolution, "stderr": c.stderr,
                         "rel_width": (c.upper - c.lower) / exact,
                         "contains": c.lower <= exact <= c.upper,
                         "gauss": {"lower": g.lower, "upper": g.upper,
                                   "resolution": g.resolution,
                                   "rel_width": (g.upper - g.lower) / exact,
                                   "contains": g.lower <= exact <= g.upper},
                         "seconds": spent[k],
                         "basis_bytes": 0 if runs[k].basis is None else
                         (m + 1) * P * a.probes * 8})
            print(rows[-1], flush=True)
            if m >= cap[k] or rows[-1]["rel_width"] <= a.rtol and (
                    not a.gauss or rows[-1]["gauss"]["rel_width"] <= a.rtol):
                done.add(k)
        _env.write(out, {"width": a.width, "P": P, "eps": a.eps, "exact": exact,
                         "sigma_max": float(sig[0]), "probes": a.probes, "seed": a.seed,
                         "dense_seconds": dense_s, "operator": "formed J", "reorth": kinds,
                         "rows": rows,
                         "bracket": "gauss-radau (markov-krein); 'gauss': the same rules' "
                                    "gauss partial sums",
                         "environment": _env.environment()})
    print("wrote", out)


if __name__ == "__main__":
    main()
