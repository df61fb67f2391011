"""``tjac bench`` (operator throughput) and ``tjac scale`` (a model family swept over sizes)."""

from __future__ import annotations

import json
import math
import os

from .parser import BACKENDS, BadInput, _float_list, _group, _int_list, _progress

def cmd_bench(a):
    from .. import bench
    from ..recipe import Recipe

    blocks = _int_list(a.blocks, "--blocks")
    backends = [s.strip() for s in a.backends.split(",") if s.strip()]
    if not backends or set(backends) - set(BACKENDS):
        raise BadInput(f"--backends must list {', '.join(BACKENDS)}, got {a.backends!r}")
    r = Recipe.paper(family=a.family, width=a.width, depth=a.depth, epochs=a.epochs,
                     optimizer=a.optimizer, dtype=a.dtype, device=a.device)
    out = bench.measure_operator(r, blocks=blocks, backends=backends,
                                 log=(lambda s: None) if a.quiet else print)
    if a.memory:
        out["vjp_memory"] = bench.memory_by_policy(r)
        if not a.quiet:
            for pol, m in out["vjp_memory"].items():
                print(f"  checkpoint={pol}: {m['stored_states']} states stored "
                      f"({m['stored_state_mib']:.1f} MiB), peak RSS {m['peak_rss_mib']:.0f} MiB")
    if a.json:
        from .._env import environment

        with open(a.json, "w") as f:
            json.dump({"results": out, "environment": environment()}, f, indent=2)
    return 0


def cmd_scale(a):
    from .. import scale

    widths, depths = _int_list(a.widths, "--widths"), _int_list(a.depths, "--depths")
    eps = _float_list(a.eps, "--eps")
    if max(eps) >= 1:
        raise BadInput(f"--eps values must be below 1 (the bulk is |sigma - 1| <= eps), got {a.eps!r}")
    if a.probes < 2:
        raise BadInput("--probes must be at least 2 (one probe has no error bar)")
    recipes = scale.sweep_recipes(a.family, widths, depths, seeds=tuple(range(a.seeds)),
                                  epochs=a.epochs)
    if not recipes:
        raise BadInput("the sweep is empty (a CNN has depth 1)")
    from .. import distributed

    group = _group(a)
    try:
        rows = scale.run_sweep(recipes, a.store, k_top=a.k_top, k_bottom=a.k_bottom, tol=a.tol,
                               progress=_progress(a.quiet or (group and not group.is_driver)),
                               epsilons=tuple(eps), probes=a.probes, density=not a.no_density,
                               reorth=a.reorth, group=group, backend=a.backend, block=a.block,
                               log=(lambda s: None) if (a.quiet or a.json) else print)
    finally:
        distributed.close(group)
    if group is not None and not group.is_driver:  # rank 0 stores, fits and reports
        return 0
    png = a.png or os.path.splitext(os.path.abspath(a.store))[0] + "-scaling.png"
    expo = scale.plot_scaling(rows, png, eps=eps[0])
    fitted = scale.fits(rows, eps[0])
    spread = scale.spread(rows, eps[0])
    if a.json:
        print(json.dumps({"rows": rows, "cost_exponent": expo, "fits": fitted, "spread": spread,
                          "png": png}, indent=2))
    elif not a.quiet:
        if a.seeds > 1:
            print(f"seed-to-seed spread ({a.seeds} seeds): mean ± sd at each P")
            sd = (lambda x: "n/a" if x is None else f"{x:.2g}")  # noqa: E731
            for n, pts in spread.items():
                if n != "seconds":
                    print(f"  {n}: " + "; ".join(f"P={x['P']} {x['mean']:.4g} ± {sd(x['sd'])}"
                                                 for x in pts))
        for n, f in fitted.items():
            err = f" ± {f['stderr']:.2f}" if math.isfinite(f["stderr"]) else ""
            if math.isfinite(f["exponent"]):
                print(f"{n} ~ P^{f['exponent']:.2f}{err}")
        print(f"figure {png}")
    return 0
