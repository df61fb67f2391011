"""``tjac analyze STORE --run ID --what ...``: the paper's experiments on a stored run.

Each analysis is stored in the run's ``analyses/`` group (:mod:`tjac.analyze_store`) and its key
numbers are printed, one line each. Bad input (an unknown analysis, a run without the solve an
analysis needs, eps <= 0, ...) is one line on stderr and exit 2, as everywhere in ``tjac``; the
whole ``--what`` list is checked before any analysis runs, and a run whose data, recipe or
retrained theta_T are no longer the stored ones is refused (:mod:`tjac.rebuild`): nothing is
written then.
"""

from __future__ import annotations

import argparse
import json
import os

from .parser import _positive_float

WHAT = ("movement", "overlap", "perturbation", "restricted", "ood", "jacobian-null", "bulk",
        "density")
# tjac.analyze_store.WHAT, kept literal: no torch at parse time (a test holds them equal)


def _positive_int(s):
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    return v


def _list(cast, flag):
    def parse(s):
        try:
            vals = [cast(x) for x in s.split(",") if x.strip()]
        except (ValueError, argparse.ArgumentTypeError):
            raise argparse.ArgumentTypeError(f"{flag} must be a comma-separated list of positive "
                                             f"numbers, got {s!r}") from None
        if not vals:
            raise argparse.ArgumentTypeError(f"{flag} is empty")
        return vals
    return parse


def _what(s):
    names = [w.strip() for w in s.split(",") if w.strip()]
    bad = [w for w in names if w not in WHAT]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown analysis {', '.join(map(repr, bad)) or '(none)'}; "
                                         f"expected one of {', '.join(WHAT)}")
    return names


def add_parser(subparsers, parents):
    """Register ``analyze`` on ``subparsers`` (tjac.cli's) with the ``parents`` (-v/-q)."""
    p = subparsers.add_parser("analyze", parents=parents,
                              help="the paper's experiments on a stored run (stored in the run)")
    p.add_argument("store")
    p.add_argument("--run", help="run id (optional when the store holds one run)")
    p.add_argument("--what", type=_what, default=None,
                   help=f"comma-separated, from {','.join(WHAT)} (default: all that apply)")
    p.add_argument("--other", metavar="RUN", help="second run for 'overlap' (another seed, "
                   "shuffled labels)")
    p.add_argument("--eps", type=_positive_float, default=1e-3, help="bulk half-width |sigma-1|")
    p.add_argument("--dense", action="store_true",
                   help="form J through products and take all its singular vectors (small P)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random baselines and inputs")
    p.add_argument("--ks", type=_list(_positive_int, "--ks"), default=[1, 2, 4, 8, 16, 32],
                   help="subspace dimensions for 'restricted'")
    p.add_argument("--eps-grid", type=_list(_positive_float, "--eps-grid"), default=None,
                   help="perturbation sizes (default 1e-3,...,1e3)")
    p.add_argument("--k-ood", type=_positive_int, default=8,
                   help="directions per region for 'ood'")
    p.add_argument("--plot", metavar="DIR", help="also write one PNG per analysis into DIR")
    p.add_argument("--json", action="store_true", help="print the attributes as JSON")
    return p


def cmd_analyze(a) -> int:
    from ..analyze_store import analyze, key_numbers
    from ..query import open as open_store

    res = open_store(a.store)
    run_id = a.run
    if run_id is None:
        runs = res.runs()
        if len(runs) != 1:
            raise ValueError(f"the store holds {len(runs)} runs; choose one with --run "
                             f"({', '.join(runs) or 'none'})")
        run_id = runs[0]
    res.run(run_id)  # an unknown run is refused before any work
    if a.other is not None:
        if a.other == run_id:
            raise ValueError("--other must name a different run")
        res.run(a.other)
    if a.plot:
        os.makedirs(a.plot, exist_ok=True)
        if not os.access(a.plot, os.W_OK):
            raise ValueError(f"cannot write figures into {a.plot!r}")
    quiet = getattr(a, "quiet", False)
    out = analyze(a.store, run_id, a.what, other=a.other, eps=a.eps, dense=a.dense, rng=a.seed,
                  eps_grid=a.eps_grid, ks=a.ks, k_ood=a.k_ood)
    if a.plot:
        from ..analysis.plots import analysis_figure

        run = open_store(a.store).run(run_id)
        for name in out:
            analysis_figure(run, name, os.path.join(a.plot, f"{run_id}-{name}.png"))
    if a.json:
        print(json.dumps({n: r.attrs for n, r in out.items()}, indent=2, default=str))
    elif not quiet:
        for r in out.values():
            print(f"{key_numbers(r)}   [{r.attrs['seconds']:.1f} s]")
        print(f"stored in {a.store} runs/{run_id}/analyses/: {', '.join(out)}")
    return 0
