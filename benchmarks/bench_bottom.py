"""The bottom of a real training Jacobian above the old dense limit: dense path vs long-basis Lanczos,
side by side, each in its own process (so each end-to-end peak RSS is its own), against the solve
plan.

The paper recipe at width W (64 -> W -> 10, digits, SGD momentum, 25 epochs; W = 128: P = 9,610;
W = 256: P = 19,210), float64. Methods: ``dense``, ``lanczos`` (in RAM when it fits, else its basis
spills to disk: tjac.linalg.spill), ``lanczos-spill`` (the spilled path forced by a memory budget,
``--spill-memory``, default 2 GiB, for a side-by-side with the in-RAM one); a path the plan refuses is recorded with the
plan's estimate. For each method: bottom-k (default 16) at tol 1e-8 through
``tjac.svd``: products, seconds, end-to-end peak RSS above the operator's own, the certificate of
every triplet (max hypot(||J v - s u||, ||J^T u - s v||) / s_max), how many are bound-only, and the plan's
expected products and bytes next to the measured ones. The sigma of the two methods are compared.

Memory keys: ``end_to_end_peak_rss_mib`` is the peak RSS of the whole process that trained the
operator and ran the solve (getrusage), ``end_to_end_peak_rss_above_operator_mib`` the same minus
the RSS once the operator was trained and tuned. ``--solver-peak P`` measures something else: the
bottom-only dense path's factorization and iteration alone on a Gaussian J, recorded as
``solver_only_peak_rss_mib`` and ``solver_only_peak_above_J_mib`` (no training, no products).

    python benchmarks/bench_bottom.py [--width 128] [--k 16] [--methods dense,lanczos] [--out PATH]
    python benchmarks/bench_bottom.py --solver-peak 19210    # the QR path's own peak memory only

Progress lines (tjac.linalg.Progress) go to stderr every 60 s.
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


def one(width: int, k: int, method: str, block: int | None, spill_memory: int = 2 * 2**30) -> dict:
    import torch

    import tjac
    from tjac.linalg import Progress, svd

    t0 = time.perf_counter()
    op = tjac.TrainingJacobian(tjac.Recipe.paper(width=width))
    tuned = op.autotune()
    setup_s = time.perf_counter() - t0
    base = _rss_mib()
    label = method
    kw = dict(block=block) if method.startswith("lanczos") and block else {}
    if method == "lanczos-spill":
        method, kw["max_memory"] = "lanczos", spill_memory
    if method != "dense":
        kw["callback"] = Progress(f"bottom-{k} {label}", k=k, interval=60,
                                  emit=lambda line: print(line, file=sys.stderr, flush=True))
    if method == "lanczos":
        kw["spill_dir"] = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    t = time.perf_counter()
    try:
        r = svd(op, k, which="bottom", method=method, tol=1e-8, raise_on_failure=False, **kw)
    except MemoryError as e:  # refused by the plan, before any product
        return {"P": op.shape[0], "method": label, "k": k, "refused": str(e),
                "seconds_to_refuse": time.perf_counter() - t,
                "end_to_end_peak_rss_mib": _rss_mib()}
    seconds = time.perf_counter() - t
    cert = r.certificate / r.norm_estimate
    last = r.history[-1] if r.history else {}
    return {"P": op.shape[0], "method": label, "k": k, "seconds": seconds,
            "spilled": bool(r.plan.get("spill")), "dropped_rel": last.get("dropped"),
            "basis": last.get("basis"),
            "setup_seconds": setup_s, "backend": tuned.get("backend"), "block": op.block_size,
            "products": r.num_matvecs + r.num_rmatvecs, "matvecs": r.num_matvecs,
            "rmatvecs": r.num_rmatvecs, "end_to_end_peak_rss_mib": _rss_mib(),
            "end_to_end_peak_rss_above_operator_mib": _rss_mib() - base,
            "all_converged": r.all_converged, "n_bound_only": int(r.bound_only.sum()),
            "max_certificate_rel": float(cert.max()), "sigma": [float(s) for s in r.S],
            "sigma_max": r.norm_estimate, "plan": r.plan,
            "seconds_per_product": seconds / max(r.num_matvecs + r.num_rmatvecs, 1),
            "torch_threads": torch.get_num_threads(),
            **({"dense_bottom": last} if r.plan.get("bottom_only") else {})}


def solver_peak(P: int, k: int) -> dict:
    """Peak memory of the bottom-only dense path's factorization and iteration alone
    (tjac.linalg.dense.dense_bottom) on a Gaussian J of size P, in a fresh process: peak RSS minus
    the RSS once J is held (what the plan's ``DENSE_BOTTOM_FACTOR`` P^2 + blocks should bound)."""
    import numpy as np

    from tjac.linalg.dense import dense_bottom

    J = np.empty((P, P), order="F")
    rng = np.random.default_rng(0)
    for i in range(0, P, 512):
        J[:, i:i + 512] = rng.standard_normal((P, min(512, P - i)))
    held = _current_rss_mib()
    t = time.perf_counter()
    S, U, V, smax, info = dense_bottom(J, k, tol=1e-8)
    return {"P": P, "k": k, "measures": "solver only: dense_bottom on a Gaussian J (no training, "
            "no products); not an end-to-end peak", "J_mib": P * P * 8 / 2**20,
            "rss_with_J_mib": held, "solver_only_peak_rss_mib": _rss_mib(),
            "solver_only_peak_above_J_mib": _rss_mib() - held,
            "seconds": time.perf_counter() - t, "info": info}


def _current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--methods", default="dense,lanczos")
    ap.add_argument("--block", type=int, default=None, help="Lanczos block (default: svd's)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--spill-memory", type=int, default=2 * 2**30,
                    help="memory budget (bytes) that forces lanczos-spill to spill")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--solver-peak", type=int, default=0, metavar="P",
                    help="only measure dense_bottom's peak memory on a Gaussian P x P J; print JSON")
    a = ap.parse_args()
    if a.child == "solver-peak":
        print(json.dumps(solver_peak(a.solver_peak, a.k)))
        return
    if a.child:
        print(json.dumps(one(a.width, a.k, a.child, a.block, a.spill_memory)))
        return
    if a.solver_peak:
        p = subprocess.run([sys.executable, __file__, "--child", "solver-peak", "--k", str(a.k),
                            "--solver-peak", str(a.solver_peak)], stdout=subprocess.PIPE, text=True)
        print(p.stdout.strip().splitlines()[-1])
        return
    results = {}
    for m in a.methods.split(","):
        cmd = [sys.executable, __file__, "--width", str(a.width), "--k", str(a.k), "--child", m,
               "--spill-memory", str(a.spill_memory)]
        if a.block:
            cmd += ["--block", str(a.block)]
        p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # stderr: progress, live
        if p.returncode:
            results[m] = {"error": f"exit status {p.returncode} (see stderr)"}
        else:
            results[m] = json.loads(p.stdout.strip().splitlines()[-1])
        print(m, json.dumps({n: v for n, v in results[m].items() if n not in ("sigma", "plan")}),
              flush=True)
    have = [m for m in results if "sigma" in results[m]]
    for i, a_ in enumerate(have):
        for b_ in have[i + 1:]:
            d, l = results[a_]["sigma"], results[b_]["sigma"]
            results[f"max_sigma_difference_rel_{a_}_vs_{b_}"] = max(
                abs(x - y) for x, y in zip(d, l)) / results[a_]["sigma_max"]
    out = a.out or os.path.join(os.path.dirname(__file__), "results",
                                f"bottom-width{a.width}.json")
    _env.write(out, {"environment": _env.environment(), "width": a.width, "k": a.k,
                     "results": results, "spill_memory": a.spill_memory,
                     "note": "each method in its own process; end_to_end_peak_rss_mib: the "
                             "process's peak RSS (getrusage), training and solve together"})
    print("wrote", out)


if __name__ == "__main__":
    main()
