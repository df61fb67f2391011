"""The read-only store commands: ``tjac info``, ``tjac query`` and ``tjac plot``."""

from __future__ import annotations

import json
import os

from .parser import BadInput

def _pick_run(res, run_id):
    runs = res.runs()
    if run_id is None:
        if len(runs) != 1:
            raise BadInput(f"the store holds {len(runs)} runs; choose one with --run "
                           f"({', '.join(runs) or 'none'})")
        run_id = runs[0]
    return res.run(run_id)


def _optim_text(recipe) -> str:
    """The optimizer as `tjac info` shows it: ``sgd lr 0.1 momentum 0.9 cosine``, or a user
    optimizer's import path with its kwargs; ``clip 1`` when gradients are clipped."""
    o = recipe.optim
    if o.name == "custom":
        text = o.factory + (f"({json.dumps(o.kwargs, sort_keys=True)})" if o.kwargs else "")
    else:
        text = f"{o.name} lr {o.lr:g}"
        if o.name == "sgd" and o.momentum:
            text += f" momentum {o.momentum:g}" + (" nesterov" if o.nesterov else "")
        if o.weight_decay:
            text += f" wd {o.weight_decay:g}"
        text += f" {o.schedule}" + (f" warmup {o.warmup_steps}" if o.warmup_steps else "")
    return text + (f" clip {o.clip_norm:g}" if o.clip_norm is not None else "")


def cmd_info(a):
    from ..query import open as open_store

    res = open_store(a.store)
    info = res.info()
    if a.json:
        for rid, r in info["runs"].items():
            r["recipe"] = res.run(rid).recipe.to_dict()
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['path']}: tjac schema {info['schema']}, written by tjac {info['tjac_version']}")
    for rid, r in info["runs"].items():
        run = res.run(rid)
        rec = run.recipe
        print(f"  {rid}  {r['status']:9s} P={r['P']:<8d} {rec.describe()} {_optim_text(rec)} "
              f"{rec.epochs} epochs batch {rec.batch_size} seed {rec.seed} {rec.dtype}")
        solves = []
        for which, sv in r.get("solves", {}).items():
            text = f"{which} {sv['certified']}/{sv['k']} certified"
            if sv["bound_only"]:
                text += f", {sv['bound_only']} upper bound{'s' if sv['bound_only'] > 1 else ''} only"
            if sv["unconverged"]:
                text += f", {sv['unconverged']} unconverged"
            solves.append(text)
        if solves:
            print(f"      {'; '.join(solves)}")
    return 0


def cmd_query(a):
    from ..query import open as open_store

    run = _pick_run(open_store(a.store), a.run)
    if a.density:
        return _query_density(run, a.json)
    if a.regions is not None:
        out = run.regions(a.regions)
        if a.json:
            print(json.dumps(out))
            return 0
        from ..analysis.regions import format_count

        counts = ", ".join(f"{n} {format_count(out, n, sep=' ')}" for n in ("chaotic", "bulk", "stable"))
        known = (f"all {out['P']} sigma" if out["complete"] else
                 f"{out['n']} of {out['P']} sigma known: top and bottom only")
        amb = f"; {out['ambiguous']} within their certificate of a boundary" if out["ambiguous"] else ""
        print(f"eps={out['eps']:g}: {counts} ({known}{amb})")
        return 0
    which, k = ("top", a.top) if a.top else ("bottom", a.bottom)
    t = run.top(k) if which == "top" else run.bottom(k)
    if a.json:
        nan_none = (lambda x: [None if v != v else v for v in x])  # noqa: E731 (strict JSON)
        print(json.dumps({"which": which, "sigma": t.sigma.tolist(),
                          "residuals": [nan_none(r) for r in t.residuals.tolist()],
                          "certificate": t.certificate.tolist(),
                          "converged": t.converged.tolist(), "bound_only": t.bound_only.tolist(),
                          "certified": t.certified.tolist(), "method": t.method,
                          "n_requested": t.n_requested, "n_available": t.n_available,
                          "n_vectors": t.n_vectors, "note": t.note or None}))
        return 0
    print(f"{'i':>4s} {'sigma':>22s} {'||Jv-su||':>10s} {'||J^Tu-sv||':>11s} certified")
    for i, (s, r, c, b) in enumerate(zip(t.sigma, t.residuals, t.converged, t.bound_only)):
        print(f"{i:4d} {s:22.15g} {r[0]:10.1e} {r[1]:11.1e} "
              f"{'no' if not c else 'bound' if b else 'yes'}")
    if (t.converged & t.bound_only).any():
        print("bound: r = hypot(residuals) >= 0.1 sigma: sigma is an upper bound on the singular "
              "value, not a measurement")
    if t.n_vectors < len(t.sigma):
        unmeasured = " (values only: nan residuals, certified to the round-off bound of the SVD, " \
                     "r = P eps sigma_max)" if (t.residuals != t.residuals).any() else ""
        print(f"rows {t.n_vectors}..{len(t.sigma) - 1}: from the full spectrum, without singular "
              f"vectors{unmeasured}")
    if t.note:
        print(f"note: {t.note}")
    return 0


def _query_density(run, as_json):
    if not {"counts", "density"} <= set(run.analyses()):
        raise BadInput(f"run {run.id!r} has no stored density: run `tjac analyze STORE --run "
                       f"{run.id} --what density` first")
    c = run.counts()
    d = run.density()
    info = c.pop("info")
    if as_json:
        print(json.dumps({"counts": {repr(e): v for e, v in c.items()}, "info": info,
                          "density": {"log10_sigma": d.log10_sigma.tolist(),
                                      "density": d.density.tolist(), "stderr": d.stderr.tolist(),
                                      "bandwidth": d.bandwidth}}))
        return 0
    print(f"{info['method']}: {info['probes']} probes, {info['steps']} steps, "
          f"{info['products']:,} products, top {info['deflated_top']} deflated; brackets at "
          f"{100 * info['confidence']:.0f}% (quadrature bounds + probe spread)")
    for e in sorted(c):
        row = ", ".join(f"{r} {c[e][r]['estimate']:.0f} [{c[e][r]['lower']:.0f}, "
                        f"{c[e][r]['upper']:.0f}]" for r in ("chaotic", "bulk", "stable"))
        print(f"eps={e:g}: {row}")
    return 0


def cmd_plot(a):
    from ..plotting import density_figure, spectrum_figure
    from ..query import open as open_store

    run = _pick_run(open_store(a.store), a.run)
    if a.analysis:
        from ..analysis.plots import analysis_figure

        parent = os.path.dirname(os.path.abspath(a.output))
        if not os.access(parent, os.W_OK):
            raise BadInput(f"cannot write {a.output!r}: {parent!r} is not a writable directory")
        print(analysis_figure(run, a.analysis, a.output))
        return 0
    if getattr(a, "density", False):
        if "density" not in run.analyses():
            raise BadInput(f"run {run.id!r} has no stored density: run `tjac analyze STORE "
                           f"--run {run.id} --what density` first")
        parent = os.path.dirname(os.path.abspath(a.output))
        if not os.access(parent, os.W_OK):
            raise BadInput(f"cannot write {a.output!r}: {parent!r} is not a writable directory")
        print(density_figure(run, a.output))
        return 0
    parent = os.path.dirname(os.path.abspath(a.output))
    if not os.access(parent, os.W_OK):
        raise BadInput(f"cannot write {a.output!r}: {parent!r} is not a writable directory")
    print(spectrum_figure(run, a.output))
    return 0
