"""Matrix-free interval counts (stochastic Lanczos quadrature) against the exact dense counts.

For the paper recipe at each width: the exact singular values once (dense path), then one
quadrature of ``--seeds`` x ``--probes`` Rademacher probes (every step one replay for all of them)
split into ``--seeds`` independent probe sets: whether each set's bulk(eps) bracket contains the
exact count, its width relative to the count, the point estimate's error; the Lanczos steps,
products and seconds; the cost model steps * eps / sigma_max; and one set alone, with and without
deflating the exact top-``--deflate-k`` (how many steps deflation saves).

With ``--operator formed`` the all-sets quadrature (and the deflated set) apply the J that the
dense truth formed anyway instead of replaying training: the same linear map to round-off, so the
same Lanczos steps, brackets and coverage (checked in every run: one probe set goes through both,
``one_set.formed_J_same_probes``), at the cost of a GEMM per product. The seconds those sets would
take through replays are projected from the replayed set's seconds per product.

    python benchmarks/bench_density.py [--widths 8,16] [--eps 1e-1,3e-2] [--seeds 20]
                                       [--probes 8] [--rtol 0.04] [--operator formed] [--out PATH]
"""
import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import _env  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import tjac  # noqa: E402
from tjac.analysis.density import slq  # noqa: E402
from tjac.linalg import DenseOperator, dense_svd  # noqa: E402


def groups(q, n):
    """Split one quadrature over G*n probes into G quadratures of n probes (independent probe
    sets that shared their replays)."""
    out = []
    for g in range(len(q.nodes) // n):
        sl = slice(g * n, (g + 1) * n)
        out.append(dataclasses.replace(q, nodes=q.nodes[sl], weights=q.weights[sl],
                                       exact=q.exact[sl], probes=n,
                                       jacobi=None if q.jacobi is None else q.jacobi[sl]))
    return out


def _progress(label, every=100):
    """A slq callback printing the step count every ``every`` steps (long runs are not silent)."""
    t0 = time.perf_counter()

    def report(info):
        if info["step"] % every == 0:
            print(f"[{time.perf_counter() - t0:8.1f} s] {label}: step {info['step']}, "
                  f"{info['active']} probes active, {info['products']} products", flush=True)
    return report


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--widths", default="8,16")
    ap.add_argument("--eps", default="1e-1,3e-2")
    ap.add_argument("--seeds", type=int, default=20, help="independent probe sets")
    ap.add_argument("--probes", type=int, default=8, help="probes per set")
    ap.add_argument("--rtol", type=float, default=0.04)
    ap.add_argument("--max-steps", type=int, default=3000)
    ap.add_argument("--deflate-k", type=int, default=64)
    ap.add_argument("--operator", choices=("replay", "formed"), default="replay",
                    help="the all-sets quadrature through training replays, or through the formed "
                         "J of the dense truth (same map; one set still runs through replays)")
    ap.add_argument("--check", type=int, default=10, help="check the resolution every N steps")
    ap.add_argument("--skip-extra", action="store_true",
                    help="only the all-sets quadrature: no deflated set, no set through replays "
                         "(both measured before: same steps and counts as the formed J)")
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
        # --operator formed: the J just formed as the quadrature's operator (module docstring)
        qop = DenseOperator(J) if a.operator == "formed" else op
        if a.operator == "replay":
            del J
        sig = S.numpy()
        for eps in [float(x) for x in a.eps.split(",")]:
            exact = int((np.abs(sig - 1) <= eps).sum())
            target = (1 - eps, 1 + eps)
            t = time.perf_counter()
            q = slq(qop, probes=a.seeds * a.probes, steps=a.max_steps, seed=0, target=target,
                    rtol=a.rtol, method="slq", check_every=a.check, callback=_progress("all sets"))
            seconds = time.perf_counter() - t
            runs = []
            for g in groups(q, a.probes):
                c = g.count(*target)
                runs.append({"estimate": c.estimate, "lower": c.lower, "upper": c.upper,
                             "stderr": c.stderr, "resolution": c.resolution,
                             "contains": c.lower <= exact <= c.upper,
                             "rel_width": (c.upper - c.lower) / exact,
                             "rel_error": (c.estimate - exact) / exact})
            row = {
                "width": w, "P": P, "eps": eps, "exact": exact, "sigma_max": float(sig[0]),
                "dense_seconds": dense_s, "dense_products": P, "probes_per_set": a.probes,
                "sets": a.seeds, "rtol": a.rtol, "steps": q.steps,
                "steps_eps_over_sigma_max": q.steps * eps / float(sig[0]),
                "products_all_sets": q.products, "products_per_set": q.products // a.seeds,
                "seconds_all_sets": seconds, "bracket": "gauss-radau (markov-krein)",
                "contained": int(sum(r["contains"] for r in runs)),
                "max_rel_width": max(r["rel_width"] for r in runs),
                "median_rel_width": float(np.median([r["rel_width"] for r in runs])),
                "max_abs_rel_error": max(abs(r["rel_error"]) for r in runs),
                "pooled_estimate": q.count(*target).estimate, "runs": runs,
                "operator": a.operator}
            if not a.skip_extra:  # a deflated set, and one set through replays
                k = min(a.deflate_k, P // 4)
                t = time.perf_counter()
                qd = slq(qop, probes=a.probes, steps=a.max_steps, seed=1, target=target, rtol=a.rtol,
                         method="slq", check_every=10, deflate=(V[:, :k], S[:k]))
                cd = qd.count(*target)
                q1 = slq(op, probes=a.probes, steps=a.max_steps, seed=1, target=target, rtol=a.rtol,
                         method="slq", check_every=10, callback=_progress("one set, replays"))  # through the replays, always
                c1 = q1.count(*target)
                q1f = None
                if a.operator == "formed":  # the same probes through the formed J: same steps?
                    q1f = slq(qop, probes=a.probes, steps=a.max_steps, seed=1, target=target,
                              rtol=a.rtol, method="slq", check_every=10)
                row.update({
                    "one_set": {"steps": q1.steps, "products": q1.products,
                                "seconds": q1.seconds, "operator": "replay",
                                "seconds_per_product": q1.seconds / max(q1.products, 1),
                                "estimate": c1.estimate, "lower": c1.lower, "upper": c1.upper,
                                "contains": c1.lower <= exact <= c1.upper,
                                "formed_J_same_probes": None if q1f is None else {
                                    "steps": q1f.steps, "estimate": q1f.count(*target).estimate,
                                    "lower": q1f.count(*target).lower,
                                    "upper": q1f.count(*target).upper}},
                    "all_sets_projected_replay_seconds": q.products * q1.seconds / max(q1.products, 1),
                    "deflated_top": {"k": k, "sigma_k_plus_1": float(sig[k]), "steps": qd.steps,
                                     "products": qd.products, "seconds": qd.seconds,
                                     "estimate": cd.estimate, "lower": cd.lower, "upper": cd.upper,
                                     "contains": cd.lower <= exact <= cd.upper}})
            rows.append(row)
            print("summary", json.dumps({k2: v for k2, v in rows[-1].items() if k2 != "runs"}),
                  flush=True)
            _env.write(out, {"environment": _env.environment(), "rows": rows,
                             "torch_threads": torch.get_num_threads(),
                             "note": "one quadrature over sets x probes Rademacher probes (one "
                                     "replay per step), split into independent sets"})
    print("wrote", out)


if __name__ == "__main__":
    main()
