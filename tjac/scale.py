"""``tjac scale``: sweep a model family over sizes (and seeds), analyse each into one store, and
report how the spectrum grows with P.

For each size and seed: the certified top σ₁…σ_k, the matrix-free region counts with their
brackets at each ε (:func:`tjac.analyze_store.analyze_density`, stored in the run's
``analyses/counts`` and ``analyses/density``), the structural σ = 1 count, and, where the dense
path ran (the whole spectrum is known), the exact counts beside the estimates. Every quantity is
fitted against P on a log-log scale (least squares; the exponent's standard error from the fit,
over every seed's point), and plotted.
"""

from __future__ import annotations

import math
import os
import shutil

import numpy as np

from . import runner
from .analysis.regions import COUNT_EPSILONS
from .recipe import Recipe


def sweep_recipes(family: str, widths, depths, seeds=(0,), **overrides) -> list[tuple[str, Recipe]]:
    out = []
    for d in depths:
        for w in widths:
            for s in seeds:
                kw = dict(overrides)
                if family == "cnn":
                    if d != 1:
                        continue  # one conv layer: depth does not apply
                    kw.update(family="cnn", width=w)
                else:
                    kw.update(family=family, width=w, depth=d)
                if len(seeds) > 1 or s != 0:
                    kw["seed"] = s
                sfx = f"-s{s}" if (len(seeds) > 1 or s != 0) else ""
                out.append((f"{family}-w{w}-d{d}{sfx}", Recipe.paper(**kw)))
    return out


def run_sweep(recipes, store_path, *, k_top=16, k_bottom=16, tol=None, method="auto",
              resume=True, progress=None, log=print, epsilons=COUNT_EPSILONS, probes: int = 16,
              density: bool = True, max_steps: int = 2000, rtol: float = 0.05,
              reorth: str = "full", group=None, backend: str = "auto",
              block: int | None = None) -> list[dict]:
    """Analyse every (run id, recipe) into ``store_path`` and return one row per run (a table's
    line: certified top, region estimates with brackets, exact counts where the dense path ran,
    the structural σ = 1 count, cost). ``backend`` and ``block`` go to every run
    (:func:`tjac.runner.run_analysis`: a replay backend by name pins it, a block width is the
    solver's and the replays' width).

    Under a process group (``group``, a :class:`tjac.distributed.Group` that every rank passes
    with the same arguments) whole runs go to ranks: the runs not yet complete in the store are
    dealt round-robin; rank 0 computes its share into the store, every other rank into a
    temporary store of its own, and sends each run to rank 0 as soon as it is complete (its
    arrays and attributes, no pickles; :class:`tjac.distributed.Collector`). Rank 0 receives it
    at once into ``<store>.incoming`` (one store per run) and moves it into the store by the
    store's commit protocol between its own runs, and before it stops on any failure (after
    every worker's current run is in). Only rank 0 writes the store and returns the rows (in the
    order of ``recipes``); the others return []. A failure anywhere loses no finished run: a
    rerun with ``resume`` (which first moves in what ``<store>.incoming`` holds, should rank 0
    have been killed) recomputes only the runs the store lacks; a worker's unfinished run is not
    resumable (its temporary store is dropped)."""
    opts = dict(k_top=k_top, k_bottom=k_bottom, tol=tol, method=method, resume=resume,
                progress=progress, epsilons=tuple(epsilons), probes=probes, density=density,
                max_steps=max_steps, rtol=rtol, reorth=reorth, backend=backend, block=block)
    if group is not None and group.world_size > 1:
        return _sweep_distributed(recipes, store_path, group, log, opts)
    if resume:
        import_incoming(store_path, recipes)
    rows = []
    for run_id, recipe in recipes:
        rows.append(_sweep_one(run_id, recipe, store_path, **opts))
        log(format_row(rows[-1], epsilons[0]))
    return rows


def _sweep_distributed(recipes, store_path, group, log, opts) -> list[dict]:
    from . import distributed, store

    same = {k: v for k, v in opts.items() if k != "progress"}
    group.agree({"recipes": [[rid, r.to_json()] for rid, r in recipes], **same},
                "sweep arguments")
    if not group.is_driver:
        _sweep_worker(recipes, store_path, group, opts)
        return []
    eps = opts["epsilons"][0]
    incoming = _incoming(store_path)
    try:
        if opts["resume"]:
            import_incoming(store_path, recipes)
        try:
            root = store.open_read(store_path)
            done = set(store.list_runs(root))
        except store.StoreError:
            done = set()
        complete = set()
        if opts["resume"] and done:
            complete = {rid for rid in done if root["runs"][rid].attrs.get("status") == "complete"}
        todo = [i for i, (rid, _) in enumerate(recipes) if rid not in complete]
        share = {r: todo[r::group.world_size] for r in range(group.world_size)}
        share[0] = sorted(share[0] + [i for i in range(len(recipes)) if i not in todo])
    except BaseException as e:
        group.fail(e)
        raise

    def keep(piece):  # in the receiving thread: durable on arrival, in a store of its own
        run_id = recipes[piece.index][0]
        path = os.path.join(incoming, f"{run_id}.zarr")
        os.makedirs(incoming, exist_ok=True)
        shutil.rmtree(path, ignore_errors=True)  # (debris of an earlier, killed, arrival)
        with store.Writer(path) as w:
            w.import_run(run_id, piece.meta["manifest"], list(piece.arrays))

    rows = {}

    def absorb():  # the runs kept so far, into the store (rank 0 writes nothing else meanwhile)
        for piece in coll.take():
            _move_in(store_path, incoming, recipes[piece.index][0])
            rows[piece.index] = piece.meta["row"]
            log(format_row(rows[piece.index], eps))

    coll = distributed.Collector(group, {r: share[r] for r in range(1, group.world_size)}, keep)
    try:
        coll.start()
        for i in share[0]:
            if coll.failure is not None:
                break
            absorb()
            rows[i] = _sweep_one(*recipes[i], store_path, **opts)
            log(format_row(rows[i], eps))
        while coll.failure is None and coll.wait():
            absorb()
    except BaseException as e:  # noqa: BLE001 - raised below, once every finished run is in
        coll.fail(e)
    coll.join()  # every worker's current run is in (before any rank is released)
    try:
        absorb()
    except BaseException as e:  # noqa: BLE001
        coll.fail(e)
    coll.close()
    if coll.failure is not None:
        raise coll.failure
    return [rows[i] for i in range(len(recipes))]


def _sweep_worker(recipes, store_path, group, opts) -> None:
    """A worker's share: each run into a temporary store of its own, sent to rank 0 as soon as
    it is complete (:func:`tjac.distributed.deliver`), then dropped here."""
    import tempfile

    from . import distributed, store

    mine = distributed.assignment(group)
    if mine is None:
        return
    here = os.path.dirname(os.path.abspath(store_path))  # beside the store where this node has
    # its folder (room like the store's), else the temporary directory
    tmp = tempfile.mkdtemp(prefix=f"tjac-sweep-rank{group.rank}-",
                           dir=here if os.access(here, os.W_OK) else None)
    try:
        for i in mine:
            run_id, recipe = recipes[i]
            path = os.path.join(tmp, f"{run_id}.zarr")
            try:
                row = _sweep_one(run_id, recipe, path, **dict(opts, resume=False, progress=None))
                manifest, data = store.export_run(store.open_read(path), run_id)
            except Exception as e:  # noqa: BLE001 - reported to rank 0, which stops the job
                distributed.report_failure(group, i, f"run {run_id}: {type(e).__name__}: {e}"[:500])
                break
            distributed.deliver(group, i, {"row": row, "manifest": manifest}, data)
            shutil.rmtree(path, ignore_errors=True)
        distributed.released(group)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _incoming(store_path: str) -> str:
    """Where rank 0 keeps the runs workers sent until they are in the store: ``<store>.incoming``
    beside it, one store per run (a run there is complete: it survives rank 0 being killed, and
    the next sweep with ``resume`` moves it in)."""
    return os.path.normpath(os.path.abspath(store_path)) + ".incoming"


def _move_in(store_path: str, incoming: str, run_id: str) -> None:
    from . import store

    path = os.path.join(incoming, f"{run_id}.zarr")
    manifest, data = store.export_run(store.open_read(path), run_id)
    with store.Writer(store_path) as w:
        w.import_run(run_id, manifest, data)
    shutil.rmtree(path, ignore_errors=True)
    try:
        os.rmdir(incoming)  # (only once empty)
    except OSError:
        pass


def import_incoming(store_path: str, recipes) -> list[str]:
    """Move into the store the runs that workers of an earlier distributed sweep delivered but
    rank 0 had not moved in when it stopped (``<store>.incoming``): those of ``recipes`` whose
    recipe matches (its hash), complete, and not complete in the store already. Returns their
    ids; others are left where they are (logged)."""
    import logging

    from . import store

    incoming = _incoming(store_path)
    if not os.path.isdir(incoming):
        return []
    want = {rid: r.hash() for rid, r in recipes}
    try:
        root = store.open_read(store_path)
        have = {rid for rid in store.list_runs(root)
                if root["runs"][rid].attrs.get("status") == "complete"}
    except store.StoreError:
        have = set()
    moved = []
    for name in sorted(os.listdir(incoming)):
        rid = name[:-len(".zarr")] if name.endswith(".zarr") else None
        try:
            run = store.open_read(os.path.join(incoming, name))["runs"][rid]
            ok = (rid in want and run.attrs.get("status") == "complete"
                  and run.attrs.get("recipe_hash") == want[rid])
        except (store.StoreError, KeyError, TypeError, ValueError):
            ok = False
        if ok and rid in have:
            shutil.rmtree(os.path.join(incoming, name), ignore_errors=True)
        elif ok:
            _move_in(store_path, incoming, rid)
            moved.append(rid)
        else:
            logging.getLogger(__name__).warning(
                "%s: not a complete run of this sweep; left alone", os.path.join(incoming, name))
    try:
        os.rmdir(incoming)
    except OSError:
        pass
    return moved


def _sweep_one(run_id, recipe, store_path, *, k_top, k_bottom, tol, method, resume, progress,
               epsilons, probes, density, max_steps, rtol, reorth, backend="auto",
               block=None) -> dict:
    from .analyze_store import analyze_density
    from .query import open as open_store

    out = runner.run_analysis(recipe, store_path, k_top=k_top, k_bottom=k_bottom, tol=tol,
                              method=method, run_id=run_id, resume=resume, progress=progress,
                              group=None, backend=backend, block=block)
    s = out.summary
    sp = s["spectrum"]
    run = open_store(store_path).run(run_id)
    top = run.top() if k_top else None
    row = {"run": run_id, "P": s["P"], "seed": recipe.seed, "sigma_max": sp["sigma_max"],
           "sigma_top": [] if top is None else [float(x) for x in top.sigma],
           "top_certified": 0 if top is None else int(top.certified.sum()),
           "complete": sp["complete"], "exact_one": sp["numerically_one"],
           "exact_one_predicted": sp["structural"]["n_exact_singular"],
           "products": s.get("products_total"), "replays": s.get("replays"),
           "backend": s.get("backend"), "seconds": s["seconds"],
           "top_method": s.get("top", {}).get("method"),
           "bottom_method": s.get("bottom", {}).get("method"), "counts": {}}
    exact = {}
    if sp["complete"]:
        sig = run.sigma("all")
        for e in epsilons:
            exact[e] = {"chaotic": int((sig > 1 + e).sum()),
                        "bulk": int((np.abs(sig - 1) <= e).sum()),
                        "stable": int((sig < 1 - e).sum())}
    if density:
        got = analyze_density(store_path, run_id, eps=epsilons, probes=probes,
                              seed=recipe.seed, method="auto", max_steps=max_steps,
                              rtol=rtol, reorth=reorth)
        row["density_method"], row["density_products"] = got["method"], got["products"]
        row["density_seconds"], row["density_steps"] = got["seconds"], got["steps"]
        for e in epsilons:
            row["counts"][repr(e)] = {
                r: {"estimate": c["estimate"], "lower": c["lower"], "upper": c["upper"],
                    "exact": exact.get(e, {}).get(r)}
                for r, c in got["counts"][e].items()}
    else:
        for e in epsilons:
            if e in exact:
                row["counts"][repr(e)] = {r: {"estimate": float(v), "lower": float(v),
                                              "upper": float(v), "exact": v}
                                          for r, v in exact[e].items()}
    return row


def format_row(r, eps=COUNT_EPSILONS[0]):
    c = r["counts"].get(repr(eps))
    if c is None:
        reg = "regions unknown"
    else:
        def one(name):
            x = c[name]
            ex = "" if x["exact"] is None else f" [exact {x['exact']}]"
            return f"{name} {x['estimate']:.0f} ({x['lower']:.0f}-{x['upper']:.0f}){ex}"
        reg = f"@{eps:g}: " + ", ".join(one(n) for n in ("chaotic", "bulk", "stable"))
    return (f"{r['run']:>18s} P={r['P']:<8d} sigma_max {r['sigma_max']:9.4g}  {reg}  "
            f"exact-1 {r['exact_one']} (predicted {r['exact_one_predicted']})  "
            f"{r['replays'] if r.get('replays') is not None else '?'} replays, "
            f"{r['seconds']:.1f}s")


def fit_exponent(P, y) -> float:
    """Least-squares slope of log(y) against log(P)."""
    return fit_power(P, y)[0]


def fit_power(P, y) -> tuple[float, float]:
    """(slope, its standard error) of log(y) against log(P) by least squares over all points
    with y > 0 (several seeds per P give several points); the error is nan with < 3 points."""
    P, y = np.asarray(P, float), np.asarray(y, float)
    ok = (y > 0) & np.isfinite(y) & (P > 0)
    P, y = P[ok], y[ok]
    if len(P) < 2 or np.ptp(np.log(P)) == 0:
        return float("nan"), float("nan")
    if len(P) < 3:
        return float(np.polyfit(np.log(P), np.log(y), 1)[0]), float("nan")
    coef, cov = np.polyfit(np.log(P), np.log(y), 1, cov=True)
    return float(coef[0]), float(math.sqrt(max(cov[0, 0], 0.0)))


def quantities(rows, eps=COUNT_EPSILONS[0]) -> dict:
    """name -> (P, values) of every swept quantity, one point per run."""
    out = {"seconds": ([r["P"] for r in rows], [r["seconds"] for r in rows]),
           "sigma_max": ([r["P"] for r in rows], [r["sigma_max"] for r in rows]),
           "exact_one": ([r["P"] for r in rows], [r["exact_one"] for r in rows])}
    key = repr(eps)
    for name in ("chaotic", "bulk", "stable"):
        pts = [(r["P"], r["counts"][key][name]["estimate"]) for r in rows if key in r["counts"]]
        if pts:
            out[f"{name}_{eps:g}"] = ([p for p, _ in pts], [v for _, v in pts])
            out[f"{name}_fraction_{eps:g}"] = ([p for p, _ in pts], [v / p for p, v in pts])
    return out


def spread(rows, eps=COUNT_EPSILONS[0]) -> dict:
    """name -> one entry per P: the seed-to-seed ``mean``, standard deviation ``sd`` (ddof 1; None
    with one seed), relative ``cv`` = sd / mean and the number of seeds ``n``."""
    out = {}
    for name, (P, y) in quantities(rows, eps).items():
        by = {}
        for p, v in zip(P, y):
            if v is not None and np.isfinite(v):
                by.setdefault(int(p), []).append(float(v))
        out[name] = []
        for p in sorted(by):
            v = np.array(by[p])
            sd = float(v.std(ddof=1)) if len(v) > 1 else None   # None: strict JSON
            mean = float(v.mean())
            out[name].append({"P": p, "n": len(v), "mean": mean, "sd": sd,
                              "cv": sd / abs(mean) if (sd is not None and mean) else None})
    return out


def fits(rows, eps=COUNT_EPSILONS[0]) -> dict:
    return {n: dict(zip(("exponent", "stderr"), fit_power(P, y)))
            for n, (P, y) in quantities(rows, eps).items()}


def plot_scaling(rows, path, eps=COUNT_EPSILONS[0]):
    """Log-log plots of each quantity against P with its fitted exponent; returns the cost
    exponent (seconds ~ P^a)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    q = quantities(rows, eps)
    names = [n for n in q if not n.startswith("chaotic_fraction")]
    cols = min(3, len(names))
    nrow = -(-len(names) // cols)
    fig, axes = plt.subplots(nrow, cols, figsize=(4.2 * cols, 3.4 * nrow), squeeze=False)
    key = repr(eps)
    for ax, n in zip(axes.flat, names):
        P, y = (np.asarray(v, float) for v in q[n])
        ax.loglog(P, np.where(y > 0, y, np.nan), "o", ms=4)
        region = n.split("_")[0]
        if region in ("chaotic", "bulk", "stable"):
            frac = "fraction" in n
            lo = np.array([r["counts"][key][region]["lower"] for r in rows if key in r["counts"]])
            hi = np.array([r["counts"][key][region]["upper"] for r in rows if key in r["counts"]])
            if frac:
                lo, hi = lo / P, hi / P
            ax.vlines(P, np.maximum(lo, 1e-300), hi, color="C0", alpha=0.5)
            ex = [r["counts"][key][region]["exact"] for r in rows if key in r["counts"]]
            if any(x is not None for x in ex):
                e = np.array([np.nan if x is None else x for x in ex], float)
                ax.loglog(P, e / P if frac else e, "x", color="k", label="exact (dense)")
                ax.legend(fontsize=7)
        a, se = fit_power(P, y)
        if np.isfinite(a):
            ok = y > 0
            c = np.exp(np.mean(np.log(y[ok]) - a * np.log(P[ok])))
            xs = np.array([P.min(), P.max()])
            ax.loglog(xs, c * xs ** a, "--", color="C1")
            err = f" ± {se:.2f}" if np.isfinite(se) else ""
            ax.set_title(f"{n}: P^{a:.2f}{err}", fontsize=9)
        else:
            ax.set_title(n, fontsize=9)
        ax.set_xlabel("P")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fit_exponent(*q["seconds"])
