"""The bottom of a real training Jacobian above the old dense limit: dense path vs long-basis Lanczos,
side by side, each in its own process (so each peak RSS is its own), against the solve plan.

The paper recipe at width W (64 -> W -> 10, digits, SGD momentum, 25 epochs; W = 128: P = 9,610;
W = 256: P = 19,210), float64. For each method: bottom-k (default 16) at tol 1e-8 through
``tjac.svd``: products, seconds, peak RSS above the operator's own, the certificate of every triplet
(max hypot(||J v - s u||, ||J^T u - s v||) / s_max), how many are bound-only, and the plan's
expected products and bytes next to the measured ones. The sigma of the two methods are compared.

    python benchmarks/bench_bottom.py [--width 128] [--k 16] [--methods dense,lanczos] [--out PATH]
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import _env  # noqa: E402


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one(width: int, k: int, method: str, block: int | None) -> dict:
    import torch

    import tjac
    from tjac.linalg import svd

    t0 = time.perf_counter()
    op = tjac.TrainingJacobian(tjac.Recipe.paper(width=width))
    tuned = op.autotune()
    setup_s = time.perf_counter() - t0
    base = _rss_mib()
    kw = dict(block=block) if method == "lanczos" and block else {}
    t = time.perf_counter()
    r = svd(op, k, which="bottom", method=method, tol=1e-8, raise_on_failure=False, **kw)
    seconds = time.perf_counter() - t
    cert = r.certificate / r.norm_estimate
    return {"P": op.shape[0], "method": method, "k": k, "seconds": seconds,
            "setup_seconds": setup_s, "backend": tuned.get("backend"), "block": op.block_size,
            "products": r.num_matvecs + r.num_rmatvecs, "matvecs": r.num_matvecs,
            "rmatvecs": r.num_rmatvecs, "peak_rss_mib": _rss_mib(),
            "peak_rss_above_operator_mib": _rss_mib() - base,
            "all_converged": r.all_converged, "n_bound_only": int(r.bound_only.sum()),
            "max_certificate_rel": float(cert.max()), "sigma": [float(s) for s in r.S],
            "sigma_max": r.norm_estimate, "plan": r.plan,
            "seconds_per_product": seconds / max(r.num_matvecs + r.num_rmatvecs, 1),
            "torch_threads": torch.get_num_threads()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--methods", default="dense,lanczos")
    ap.add_argument("--block", type=int, default=None, help="Lanczos block (default: svd's)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(one(a.width, a.k, a.child, a.block)))
        return
    results = {}
    for m in a.methods.split(","):
        cmd = [sys.executable, __file__, "--width", str(a.width), "--k", str(a.k), "--child", m]
        if a.block:
            cmd += ["--block", str(a.block)]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode:
            results[m] = {"error": p.stderr.strip().splitlines()[-1] if p.stderr else str(p.returncode)}
        else:
            results[m] = json.loads(p.stdout.strip().splitlines()[-1])
        print(m, json.dumps({n: v for n, v in results[m].items() if n not in ("sigma", "plan")}),
              flush=True)
    if all("sigma" in results.get(m, {}) for m in ("dense", "lanczos")):
        d, l = results["dense"]["sigma"], results["lanczos"]["sigma"]
        results["max_sigma_difference_rel"] = max(abs(x - y) for x, y in zip(d, l)) / \
            results["dense"]["sigma_max"]
    out = a.out or os.path.join(os.path.dirname(__file__), "results",
                                f"bottom-width{a.width}.json")
    _env.write(out, {"environment": _env.environment(), "width": a.width, "k": a.k,
                     "results": results,
                     "note": "each method in its own process; peak RSS from getrusage"})
    print("wrote", out)


if __name__ == "__main__":
    main()
