"""``tjac scale``: sweep a model family over sizes, analyse each into one store, and report how the
spectrum and the cost grow with P (with the fitted exponent of cost ~ P^a on a log-log plot)."""

from __future__ import annotations

import numpy as np

from . import runner
from .recipe import Recipe


def sweep_recipes(family: str, widths, depths, **overrides) -> list[tuple[str, Recipe]]:
    out = []
    for d in depths:
        for w in widths:
            kw = dict(overrides)
            if family == "cnn":
                if d != 1:
                    continue  # one conv layer: depth does not apply
                kw.update(family="cnn", width=w)
            else:
                kw.update(family=family, width=w, depth=d)
            out.append((f"{family}-w{w}-d{d}", Recipe.paper(**kw)))
    return out


def run_sweep(recipes, store_path, *, k_top=16, k_bottom=16, tol=1e-8, method="auto",
              resume=True, progress=None, log=print) -> list[dict]:
    rows = []
    for run_id, recipe in recipes:
        out = runner.run_analysis(recipe, store_path, k_top=k_top, k_bottom=k_bottom, tol=tol,
                                  method=method, run_id=run_id, resume=resume, progress=progress)
        s = out.summary
        sp = s["spectrum"]
        reg = {r["eps"]: r for r in sp["regions"]}
        row = {"run": run_id, "P": s["P"], "sigma_max": sp["sigma_max"],
               "sigma_min": sp["sigma_min"], "chaotic_1e-3": reg[1e-3]["chaotic"],
               "bulk_1e-3": reg[1e-3]["bulk"], "stable_1e-3": reg[1e-3]["stable"],
               "complete": sp["complete"], "exact_one": sp["numerically_one"],
               "exact_one_predicted": sp["structural"]["n_exact_singular"],
               "products": s.get("products_total"), "replays": s.get("replays"),
               "backend": s.get("backend"), "seconds": s["seconds"],
               "top_method": s.get("top", {}).get("method"),
               "bottom_method": s.get("bottom", {}).get("method")}
        rows.append(row)
        log(format_row(row))
    return rows


def format_row(r):
    return (f"{r['run']:>18s} P={r['P']:<8d} sigma_max {r['sigma_max']:9.4g}  regions@1e-3 "
            f"{r['chaotic_1e-3']}/{r['bulk_1e-3']}/{r['stable_1e-3']}{'' if r['complete'] else '*'}  "
            f"exact-1 {r['exact_one']} (predicted {r['exact_one_predicted']})  "
            f"{r['replays'] if r.get('replays') is not None else '?'} replays ({r.get('backend')}), "
            f"{r['seconds']:.1f}s")


def fit_exponent(P, cost) -> float:
    """Least-squares slope of log(cost) against log(P)."""
    P, cost = np.asarray(P, float), np.asarray(cost, float)
    if len(P) < 2 or np.ptp(np.log(P)) == 0:
        return float("nan")
    return float(np.polyfit(np.log(P), np.log(cost), 1)[0])


def plot_scaling(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    P = np.array([r["P"] for r in rows], float)
    sec = np.array([r["seconds"] for r in rows], float)
    a = fit_exponent(P, sec)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].loglog(P, sec, "o-")
    if np.isfinite(a):
        c = np.exp(np.mean(np.log(sec) - a * np.log(P)))
        axes[0].loglog(P, c * P ** a, "--", label=f"fit: seconds ~ P^{a:.2f}")
        axes[0].legend()
    axes[0].set(xlabel="P (parameters)", ylabel="seconds (train + solves)", title="cost vs size")
    reps = [r.get("replays") for r in rows]
    if all(x is not None for x in reps):
        ax2 = axes[0].twinx()
        ax2.semilogx(P, reps, "s:", color="gray")
        ax2.set_ylabel("replays (passes over training)", color="gray")
    axes[1].semilogx(P, [r["sigma_max"] for r in rows], "o-", label=r"$\sigma_{max}$")
    axes[1].semilogx(P, [r["exact_one"] for r in rows], "s-", label="exactly 1")
    axes[1].set(xlabel="P", title="spectrum vs size")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return a
