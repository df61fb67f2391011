"""Reproduce the experiments of Belrose & Scherlis (2024) with tjac, one store, one command.

    python examples/reproduce_paper.py --out paper-out              # the paper recipe (width 64)
    python examples/reproduce_paper.py --out small --width 16 --epochs 5   # a quick look

1. Five runs of the recipe (``tjac.runner.run_analysis``; Lanczos, no dense J unless ``--dense``):
   clean (seed 0), a second seed, shuffled labels, white-noise inputs, Adam. Every run solves for
   its top; only the runs in ``--bottom-runs`` (default: clean) also solve for the bottom, the
   costly end (at P = 4,810 about 1.5 P products against a few hundred for the top). The
   experiments on the other runs use their tops: the overlaps compare chaotic subspaces, and the
   side-by-side regions of a top-only run are brackets. A complete run already in the store is
   reused.
2. Every experiment of ``tjac.analyze_store.analyze`` on the clean run (overlap against the second
   seed), plus the top/bottom overlap of clean against shuffled labels.
3. Variants side by side (spectra, regions, |sigma - 1|) and the bulk prediction for every run.
4. The bulk prediction across widths (``--bulk-widths``): these runs use the dense path, because a
   measured bulk count needs all P singular values (top and bottom solves only bound it).

Writes one PNG per figure and ``results.md`` (the key numbers and the seconds each step took) into
``--out``; the store is ``<out>/paper.zarr``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import tjac
from tjac import runner, store
from tjac.analysis import overlap_runs, predict_bulk
from tjac.analyze_store import analyze, known_regions, spectra_side_by_side
from tjac.analysis.plots import analysis_figure, bulk_prediction_figure
from tjac.analyze_store import commit_result, key_numbers

VARIANTS = {"clean": {}, "seed1": {"seed": 1}, "shuffled": {"data": "shuffled_labels"},
            "noise": {"data": "white_noise"}, "adam": {"optimizer": "adam"}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="paper-out")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--epochs", type=int, default=25)
    p.add_argument("--k", type=int, default=32, help="top and bottom triplets per run")
    p.add_argument("--tol", type=float, default=1e-8)
    p.add_argument("--eps", type=float, default=1e-3)
    p.add_argument("--dense", action="store_true", help="form J (small P): all singular vectors")
    p.add_argument("--bulk-widths", default="4,8,16", help="widths of the bulk-prediction sweep "
                   "(dense, so keep them small); '' to skip")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--bottom-runs", default="clean", help="runs that also solve for the bottom "
                   "(comma-separated; 'all' for every run)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: "
                   "torch's, one per core; on a shared CPU use no more than the free cores: "
                   "oversubscribed, small products slow down by up to 100x)")
    a = p.parse_args(argv)
    import torch

    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    bottoms = set(variants) if a.bottom_runs.strip() == "all" else {
        v.strip() for v in a.bottom_runs.split(",") if v.strip()}
    bad = [v for v in [*variants, *bottoms] if v not in VARIANTS]
    if bad:
        p.error(f"unknown variant {bad[0]!r}; expected some of {', '.join(VARIANTS)}")
    if "clean" not in variants:
        p.error("--variants must include 'clean' (the run the experiments are made on)")
    if bottoms - set(variants):
        p.error(f"--bottom-runs names {sorted(bottoms - set(variants))[0]!r}, which is not among "
                f"--variants")
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, "paper.zarr")
    times: dict[str, float] = {}
    lines: list[str] = []

    def timed(label, fn):
        t = time.perf_counter()
        out = fn()
        times[label] = time.perf_counter() - t
        print(f"[{times[label]:7.1f} s] {label}", flush=True)
        return out

    method = "dense" if a.dense else "lanczos"
    for name in variants:
        r = tjac.Recipe.paper(width=a.width, epochs=a.epochs, **VARIANTS[name])
        kb = a.k if (a.dense or name in bottoms) else 0
        what = f"top/bottom {a.k}" if kb else f"top {a.k}"
        try:
            timed(f"run {name} (train + {what}, {method})",
                  lambda r=r, name=name, kb=kb: _run(r, path, name, a.k, kb, a.tol, method))
        except store.StoreError as e:  # e.g. another recipe under this run id in --out
            print(f"reproduce_paper.py: error: {e}", file=sys.stderr)
            return 2
    res = tjac.open(path)
    main_run = res.run("clean")
    other = "seed1" if "seed1" in variants else None
    out = timed("all experiments on 'clean'",
                lambda: analyze(path, "clean", other=other, eps=a.eps, dense=a.dense,
                                log_fn=lambda s: print("   ", s, flush=True)))
    for n, r in out.items():
        times[f"  {n}"] = r.attrs["seconds"]
        lines.append(f"| {n} | {key_numbers(r).split(': ', 1)[1]} | {r.attrs['seconds']:.1f} |")
    if "shuffled" in variants:
        both = (main_run, res.run("shuffled"))
        for which in [w for w in ("top", "bottom") if all(_has(r, w) for r in both)]:
            r = timed(f"overlap clean vs shuffled ({which})",
                      lambda which=which: overlap_runs(main_run, res.run("shuffled"), which,
                                                       name=f"overlap-shuffled-{which}"))
            commit_result(r, path, "clean")
            lines.append(f"| {r.name} | {key_numbers(r).split(': ', 1)[1]} | "
                         f"{times[f'overlap clean vs shuffled ({which})']:.1f} |")
    runs = {v: res.run(v) for v in variants if v != "seed1"}
    side = timed("variants side by side", lambda: spectra_side_by_side(runs, a.eps))
    commit_result(side, path, "clean")
    rows = []
    for v, run in runs.items():
        b = timed(f"predict_bulk {v}", lambda run=run: predict_bulk(run.recipe, a.eps,
                                                                    measured=known_regions(run, a.eps)))
        commit_result(b, path, v)
        rows.append(_bulk_row(f"{v} w{a.width}", b))
    for w in [int(x) for x in a.bulk_widths.split(",") if x.strip()]:
        for v in [v for v in ("clean", "noise", "adam") if v in variants]:
            r = tjac.Recipe.paper(width=w, epochs=a.epochs, **VARIANTS[v])
            rid = f"{v}-w{w}"
            timed(f"run {rid} (dense)", lambda r=r, rid=rid: _run(r, path, rid, 4, 4, a.tol, "dense"))
            run = tjac.open(path).run(rid)
            b = predict_bulk(r, a.eps, measured=run.regions(a.eps))
            commit_result(b, path, rid)
            rows.append(_bulk_row(rid, b))
    res = tjac.open(path)
    main_run = res.run("clean")
    figs = []
    t = time.perf_counter()
    for n in main_run.analyses():
        figs.append(analysis_figure(main_run, n, os.path.join(a.out, f"{n}.png")))
    figs.append(bulk_prediction_figure(rows, os.path.join(a.out, "bulk-prediction.png")))
    times["figures"] = time.perf_counter() - t
    _write_table(a, path, lines, side, rows, times, figs)
    print(f"wrote {len(figs)} figures and {os.path.join(a.out, 'results.md')}")
    return 0


def _run(recipe, path, run_id, k, k_bottom, tol, method):
    if os.path.exists(path):  # a complete run of the same recipe is reused whatever it solved for
        res = tjac.open(path)
        if run_id in res.runs():
            run = res.run(run_id)
            if run.status == "complete" and run.attrs.get("recipe_hash") == recipe.hash():
                return None  # (another recipe under this id: run_analysis refuses it, naming why)
    return runner.run_analysis(recipe, path, k_top=k, k_bottom=k_bottom, tol=tol, method=method,
                               run_id=run_id, resume=True)


def _has(run, which):
    try:
        run.sigma(which)
    except KeyError:
        return False
    return True


def _bulk_row(label, b):
    t = b.attrs
    return {"label": label, "predicted": t["predicted"], "measured": t.get("measured"),
            "measured_min": t.get("measured_min"), "measured_max": t.get("measured_max"),
            "zero_input": t["zero_input"], "low_variance_extra": t["low_variance_extra"],
            "softmax_shift": t["softmax_shift"], "optimizer": t["optimizer"]}


def _solves(a):
    return (f"Lanczos, top {a.k} for every run, bottom {a.k} for "
            f"{a.bottom_runs.strip() or 'none'} (a complete run in the store is reused as it is)")


def _write_table(a, path, lines, side, rows, times, figs):
    import torch

    md = [f"# tjac reproduction of Belrose & Scherlis (2024): width {a.width}, {a.epochs} epochs",
          "", f"Store `{path}`; solves: {'dense' if a.dense else _solves(a)}; "
          f"eps = {a.eps:g}; {torch.get_num_threads()} torch thread(s). Command: `{' '.join(sys.argv)}`", "",
          "## Experiments on the clean run", "", "| analysis | key numbers | seconds |",
          "|---|---|---|", *lines, "", "## Variants: regions at eps", "",
          "| run | P | chaotic | bulk | stable | complete |", "|---|---|---|---|---|---|"]
    for lab in side.attrs["labels"]:
        g = side.attrs["regions"][lab]
        cnt = {n: (g[n] if g.get(n) is not None else f"[{g.get(n + '_min')}, {g.get(n + '_max')}]")
               for n in ("chaotic", "bulk", "stable")}
        md.append(f"| {lab} | {side.attrs['P'][lab]} | {cnt['chaotic']} | {cnt['bulk']} | "
                  f"{cnt['stable']} | {side.attrs['complete'][lab]} |")
    md += ["", "## Bulk size: predicted from data and architecture vs measured", "",
           "Measured: the count where the run's spectrum is complete, else a bracket from the "
           "computed ends whose lower end is at least the structural sigma = 1 count (exact, and "
           "also part of the prediction).", "",
           "| run | optimizer | predicted | zero-input | low-variance | softmax shift | measured |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["measured"] if r["measured"] is not None else f"[{r['measured_min']}, {r['measured_max']}]"
        md.append(f"| {r['label']} | {r['optimizer']} | {r['predicted']} | {r['zero_input']} | "
                  f"{r['low_variance_extra']} | {r['softmax_shift']} | {m} |")
    md += ["", "## Seconds per step", "", "| step | seconds |", "|---|---|"]
    md += [f"| {k} | {v:.1f} |" for k, v in times.items()]
    md += [f"| total (runs, experiments, figures) | {sum(v for k, v in times.items() if not k.startswith('  ')):.1f} |",
           "", "## Figures", ""] + [f"- `{os.path.basename(f)}`" for f in figs]
    with open(os.path.join(a.out, "results.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    with open(os.path.join(a.out, "times.json"), "w") as f:
        json.dump(times, f, indent=2)


if __name__ == "__main__":
    raise SystemExit(main())
