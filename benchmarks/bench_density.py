"""Matrix-free interval counts (stochastic Lanczos quadrature) against the exact dense counts.

For the paper recipe at each width: the exact singular values once (dense path), then
``bulk_size(op, eps)`` for ``--seeds`` independent probe sets (``--probes`` Rademacher probes each,
all in one replay block): whether each bracket contains the exact count, its width relative to
the count, the point estimate's error, Lanczos steps, products and seconds. Also the cost model:
steps * eps / sigma_max at each eps, and one run deflating the computed top-``--deflate-k``
(how many steps it saves).

    python benchmarks/bench_density.py [--widths 16,64] [--eps 1e-1,1e-2] [--seeds 20]
                                       [--probes 16] [--rtol 0.04] [--out PATH]
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import _env  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import tjac  # noqa: E402
from tjac.analysis.density import ResolutionError, bulk_size  # noqa: E402
from tjac.linalg import dense_svd  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--widths", default="16,64")
    ap.add_argument("--eps", default="1e-1,1e-2")
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--probes", type=int, default=16)
    ap.add_argument("--rtol", type=float, default=0.04)
    ap.add_argument("--max-steps", type=int, default=3000)
    ap.add_argument("--deflate-k", type=int, default=64)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    rows = []
    out = a.out or os.path.join(os.path.dirname(__file__), "results", "density.json")
    for w in [int(x) for x in a.widths.split(",")]:
        op = tjac.TrainingJacobian(tjac.Recipe.paper(width=w))
        op.autotune()
        P = op.shape[0]
        t = time.perf_counter()
        J, U, S, V = dense_svd(op)
        dense_s = time.perf_counter() - t
        del J
        sig = S.numpy()
        for eps in [float(x) for x in a.eps.split(",")]:
            exact = int((np.abs(sig - 1) <= eps).sum())
            runs = []
            for seed in range(a.seeds):
                t = time.perf_counter()
                try:
                    c = bulk_size(op, eps, probes=a.probes, seed=seed, rtol=a.rtol,
                                  max_steps=a.max_steps, method="slq")
                except ResolutionError as e:
                    c = e.result
                d = c.as_dict()
                d.update(seconds=time.perf_counter() - t, contains=c.lower <= exact <= c.upper,
                         rel_width=(c.upper - c.lower) / exact, rel_error=(c.estimate - exact) / exact,
                         steps_eps_over_sigma_max=c.steps * eps / float(sig[0]))
                runs.append(d)
                print(json.dumps({"width": w, "eps": eps, "seed": seed, "exact": exact,
                                  **{k: d[k] for k in ("estimate", "lower", "upper", "steps",
                                                      "products", "seconds", "contains")}}),
                      flush=True)
            k = min(a.deflate_k, P // 4)
            t = time.perf_counter()
            try:
                cd = bulk_size(op, eps, probes=a.probes, seed=0, rtol=a.rtol, max_steps=a.max_steps,
                               method="slq", deflate=(V[:, :k], S[:k]))
            except ResolutionError as e:
                cd = e.result
            dd = cd.as_dict()
            dd.update(seconds=time.perf_counter() - t, k=k, contains=cd.lower <= exact <= cd.upper,
                      sigma_k_plus_1=float(sig[k]))
            rows.append({"width": w, "P": P, "eps": eps, "exact": exact, "sigma_max": float(sig[0]),
                         "dense_seconds": dense_s, "probes": a.probes, "rtol": a.rtol,
                         "contained": int(sum(r["contains"] for r in runs)), "seeds": a.seeds,
                         "max_rel_width": max(r["rel_width"] for r in runs),
                         "max_abs_rel_error": max(abs(r["rel_error"]) for r in runs),
                         "mean_steps": float(np.mean([r["steps"] for r in runs])),
                         "mean_products": float(np.mean([r["products"] for r in runs])),
                         "mean_seconds": float(np.mean([r["seconds"] for r in runs])),
                         "runs": runs, "deflated_top": dd})
            print("summary", json.dumps({k2: v for k2, v in rows[-1].items() if k2 != "runs"}),
                  flush=True)
            _env.write(out, {"environment": _env.environment(), "rows": rows,
                             "torch_threads": torch.get_num_threads()})
    print("wrote", out)


if __name__ == "__main__":
    main()
