"""``tjac`` command line: run / info / query / plot / verify / bench / scale / analyze.

Exit codes: 0 success; 1 the computation failed (e.g. a verification disagreed); 2 bad input (one
line on stderr, no traceback). Progress bars appear only on a terminal.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
VERIFY_MAX_PARAMS = 2000  # tjac verify's dense oracle: P reverse passes through training, P x P
BACKENDS = ("auto", "eager", "fused", "compiled", "double-backward")  # tjac.replay's, kept literal: no torch at parse time


class BadInput(Exception):
    pass


_NEGATIVE_NUMBER = re.compile(r"^-(\.?\d|inf|nan)", re.IGNORECASE)


class _Parser(argparse.ArgumentParser):
    """One-line errors; a value that starts like a negative number (``-1e-3``, ``-.5``, ``-inf``,
    ``-1,2``) is an option's argument, so its own type states the rule (argparse's stock test
    takes only ``-1`` and ``-0.5``, and answered ``--tol -1e-3`` with "expected one argument").
    No tjac option looks like a number, so nothing is shadowed."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = _NEGATIVE_NUMBER

    def error(self, message):  # one line, exit 2 (argparse prints usage too)
        raise BadInput(message)


def _int_at_least(low):
    """argparse type: an integer >= ``low`` (the message states the rule)."""
    def parse(s):
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {s!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {v}")
        return v
    return parse


_positive_int = _int_at_least(1)
_nonneg_int = _int_at_least(0)


from .cli_analyze import _positive_float  # noqa: E402 (one definition, also used there)


def _distributed_args(p) -> None:
    d = p.add_argument_group("several processes (torchrun)")
    d.add_argument("--distributed", action="store_true",
                   help="require a process group (launched by torchrun); without the flag one "
                   "is joined whenever torchrun's RANK/WORLD_SIZE are set")
    d.add_argument("--dist-backend", choices=["auto", "gloo", "nccl"], default="auto",
                   help="process-group backend (auto: nccl when every rank of the node has a GPU "
                   "of its own, else gloo)")
    d.add_argument("--dist-timeout", type=_positive_float, default=1800.0, metavar="SECONDS",
                   help="how long to wait for the rendezvous (default 1800; once joined, a "
                   "message waits as long as the work before it)")


def _group(a):
    """The process group of this job (torchrun's environment, or --distributed), else None."""
    from . import distributed

    if not a.distributed and not distributed.launched():
        return None
    return distributed.init(a.dist_backend, timeout_s=a.dist_timeout, required=a.distributed)


def _recipe_args(p) -> None:
    """The options that make a recipe: one definition for `run` and `verify`."""
    g = p.add_argument_group("the recipe (model, data, optimizer)")
    g.add_argument("--config", help="TOML recipe: Recipe.paper overrides, or [model]/[data]/[optim] tables")
    g.add_argument("--width", type=_positive_int)
    g.add_argument("--depth", type=_positive_int)
    g.add_argument("--epochs", type=_positive_int)
    g.add_argument("--batch-size", type=_positive_int)
    g.add_argument("--n-train", type=_positive_int)
    g.add_argument("--optimizer", help="sgd, adam, adamw, or an import path "
                   "'package.module:factory' of an optax-style (init, update) pair")
    g.add_argument("--optimizer-kwargs", help="JSON object passed to the optimizer factory")
    g.add_argument("--clip-norm", type=_positive_float, help="clip gradients to this global norm")
    g.add_argument("--lr", type=_positive_float)
    g.add_argument("--data", choices=["clean", "shuffled_labels", "white_noise"])
    g.add_argument("--model", help="your model: import path 'package.module:factory' of an "
                   "nn.Module factory (the working directory is importable)")
    g.add_argument("--model-kwargs", help="JSON object passed to the model factory")
    g.add_argument("--dataset", help="digits (default), iris, wine, breast_cancer, or a path: "
                   ".npz / folder of .npy (X_train, y_train, X_test, y_test), MNIST IDX folder, "
                   "CIFAR-10/100 binary folder")
    g.add_argument("--preprocess", choices=["default", "none", "scale01", "standardize"])
    g.add_argument("--loss", help="cross_entropy (default), mse, or 'package.module:function'")
    g.add_argument("--param-filter", action="append", metavar="PATTERN",
                   help="restrict J to parameters matching this name or glob (repeatable; "
                   "comma-separated lists too)")
    g.add_argument("--seed", type=int)
    g.add_argument("--dtype", choices=["float64", "float32"], default=None)
    g.add_argument("--device", default="cpu", help="cpu, cuda[:N] or auto (default cpu)")
    g.add_argument("--no-drop-last", dest="drop_last", action="store_false", default=None,
                   help="train on a partial last batch of each epoch (default: when the batch "
                   "size does not divide the training examples, the rest are dropped, with a "
                   "warning)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tjac", description="Spectrum of the training Jacobian d(theta_T)/d(theta_0).")
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.add_argument("-q", "--quiet", action="store_true")
    common = _Parser(add_help=False)  # -v/-q also after the subcommand
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS)
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    r = sub.add_parser("run", parents=[common], help="train, solve top and bottom, store everything (paper default)")
    _recipe_args(r)
    r.add_argument("--k-top", type=_nonneg_int, default=32)
    r.add_argument("--k-bottom", type=_nonneg_int, default=32)
    r.add_argument("--tol", type=_positive_float, default=None,
                   help="certificate tolerance relative to sigma_max (default: by the dtype, "
                   "1e-8 in float64, 1.2e-5 in float32)")
    r.add_argument("--method", choices=["auto", "lanczos", "randomized", "dense"], default="auto")
    r.add_argument("--block", type=_positive_int,
                   help="solver block width, also the replay width (vectors per replay)")
    r.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="how blocks are replayed (auto: the default unless another is measured "
                        "20%% cheaper, once per run; nothing timed for tiny runs)")
    r.add_argument("--checkpoint", default="all", help="all, sqrt or an interval in steps")
    r.add_argument("--store", default="results.zarr")
    r.add_argument("--run-id")
    r.add_argument("--resume", action="store_true", help="continue an interrupted run")
    r.add_argument("--overwrite", action="store_true", help="recompute a run that exists")
    r.add_argument("--png", help="figure path (default: <store>-<run>.png); 'none' to skip")
    _distributed_args(r)

    i = sub.add_parser("info", parents=[common], help="list the runs of a store")
    i.add_argument("store")
    i.add_argument("--json", action="store_true")

    q = sub.add_parser("query", parents=[common], help="singular values, residuals or region counts of a run")
    q.add_argument("store")
    q.add_argument("--run", required=False)
    g = q.add_mutually_exclusive_group(required=True)
    g.add_argument("--top", type=_positive_int)
    g.add_argument("--bottom", type=_positive_int)
    g.add_argument("--regions", type=_positive_float, metavar="EPS")
    g.add_argument("--density", action="store_true",
                   help="the matrix-free region counts (with brackets) and density stored by "
                        "`tjac analyze --what density`")
    q.add_argument("--json", action="store_true")

    pl = sub.add_parser("plot", parents=[common], help="the paper's figures for a run")
    pl.add_argument("store")
    pl.add_argument("--run")
    pl.add_argument("-o", "--output", required=True)
    pl.add_argument("--analysis", metavar="NAME",
                    help="draw a stored analysis (tjac analyze) instead of the spectrum")
    pl.add_argument("--density", action="store_true",
                    help="the stored density and region counts (tjac analyze --what density)")

    b = sub.add_parser("bench", parents=[common], help="JVP/VJP throughput in units of one training run")
    b.add_argument("--width", type=_positive_int, default=64)
    b.add_argument("--depth", type=_positive_int, default=1)
    b.add_argument("--family", choices=["mlp", "cnn", "transformer"], default="mlp")
    b.add_argument("--epochs", type=_positive_int, default=25)
    b.add_argument("--optimizer", choices=["sgd", "adam", "adamw"], default="sgd")
    b.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    b.add_argument("--device", default="cpu")
    b.add_argument("--blocks", default="1,8,32,128", help="comma-separated block sizes")
    b.add_argument("--backends", default="auto",
                   help="comma-separated replay backends to measure (eager,fused,compiled,"
                        "double-backward) or auto")
    b.add_argument("--memory", action="store_true", help="also peak memory per checkpoint policy")
    b.add_argument("--json", help="write the results (with the environment) to this file")

    sc = sub.add_parser("scale", parents=[common], help="sweep a model family over sizes into one store")
    sc.add_argument("--family", choices=["mlp", "cnn", "transformer"], default="mlp")
    sc.add_argument("--widths", default="16,32,64,128")
    sc.add_argument("--depths", default="1")
    sc.add_argument("--epochs", type=_positive_int, default=25)
    sc.add_argument("--k-top", type=_nonneg_int, default=16)
    sc.add_argument("--k-bottom", type=_nonneg_int, default=16)
    sc.add_argument("--tol", type=_positive_float, default=None,
                    help="default: 1e-8 in float64, 100 eps in float32")
    sc.add_argument("--seeds", type=_positive_int, default=1,
                    help="seeds per size (0..N-1) for the seed-to-seed spread")
    sc.add_argument("--eps", default="1e-2,1e-3",
                    help="region half-widths counted at every size (comma-separated)")
    sc.add_argument("--probes", type=_positive_int, default=16,
                    help="probes of the matrix-free counts (tjac.analysis.slq)")
    sc.add_argument("--reorth", choices=["full", "none", "auto"], default="full",
                    help="reorthogonalization of the counts' Lanczos vectors: full (every vector "
                         "kept), none (a few per probe; wider brackets for the steps), auto (full "
                         "while it fits in memory)")
    sc.add_argument("--no-density", action="store_true",
                    help="skip the matrix-free counts and density (exact counts only where dense)")
    sc.add_argument("--block", type=_positive_int,
                    help="solver block width, also the replay width, for every run (default: tuned)")
    sc.add_argument("--backend", choices=BACKENDS, default="auto",
                    help="how blocks are replayed in every run (auto: the default unless another "
                         "is measured 20%% cheaper; nothing timed for tiny runs)")
    sc.add_argument("--store", default="scale.zarr")
    sc.add_argument("--png", help="log-log plots against P (default: <store>-scaling.png)")
    sc.add_argument("--json", action="store_true")
    _distributed_args(sc)

    from . import cli_analyze

    cli_analyze.add_parser(sub, [common])

    v = sub.add_parser("verify", parents=[common],
                       help="dense oracle vs matrix-free operator on a tiny recipe or your own model")
    _recipe_args(v)
    v.add_argument("--rtol", type=_positive_float, default=None,
                   help="largest error allowed relative to max |J| (default 1e-10 in float64, "
                   "1e-4 in float32)")
    v.add_argument("--max-params", type=_positive_int, default=VERIFY_MAX_PARAMS, metavar="P",
                   help=f"refuse models with more parameters than this (default "
                   f"{VERIFY_MAX_PARAMS}: the oracle is P reverse passes through training and a "
                   f"P x P matrix)")
    return p


def _recipe_from_args(a, *, tiny: bool = False):
    """The recipe of the options :func:`_recipe_args` defines. ``tiny`` (``tjac verify``): what a
    flag or an overrides config leaves unset is small enough for a dense oracle (1 epoch, batch 32,
    the built-in MLP at width 4, 128 digits); a full-table config is taken as it is."""
    import tomllib

    from .recipe import BUILTIN_OPTIM_OVERRIDES, Recipe

    over = {}
    if a.config:
        if not os.path.isfile(a.config):
            raise BadInput(f"config file {a.config!r} does not exist")
        try:
            with open(a.config, "rb") as f:
                cfg = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise BadInput(f"config {a.config!r} is not valid TOML: {e}") from None
        if any(key in cfg for key in ("model", "data", "optim")) and isinstance(cfg.get("model", {}), dict) \
                and isinstance(cfg.get("data", {}), dict):
            optim = cfg.get("optim", {})
            builtin_only = sorted(BUILTIN_OPTIM_OVERRIDES & set(optim)) if isinstance(optim, dict) \
                and optim.get("name") == "custom" else []
            if builtin_only:
                raise BadInput(f"config {a.config!r}: [optim] {', '.join(builtin_only)} appl"
                               f"{'ies' if len(builtin_only) == 1 else 'y'} to the built-in "
                               f"optimizers (sgd, adam, adamw), not to the user optimizer "
                               f"{optim.get('factory')!r}; put it in [optim.kwargs]")
            over_base = Recipe.from_dict(cfg).with_canonical_kwargs()
        else:
            over_base, over = None, dict(cfg)
    else:
        over_base = None
    for name in ("width", "depth", "epochs", "batch_size", "n_train", "lr", "data",
                 "seed", "dtype", "model", "dataset", "preprocess", "loss", "clip_norm",
                 "drop_last"):
        val = getattr(a, name, None)
        if val is not None:
            over[name] = val
    for flag, name in (("--model-kwargs", "model_kwargs"), ("--optimizer-kwargs", "optimizer_kwargs")):
        text = getattr(a, name, None)
        if text is not None:
            try:
                over[name] = json.loads(text)
            except json.JSONDecodeError as e:
                raise BadInput(f"{flag} must be a JSON object: {e}") from None
            if not isinstance(over[name], dict):
                raise BadInput(f"{flag} must be a JSON object, got {text!r}")
    opt = getattr(a, "optimizer", None)
    if opt is not None:
        if ":" in opt:
            over["optimizer"], over["optimizer_factory"] = "custom", opt
        else:
            if opt not in ("sgd", "adam", "adamw"):
                raise BadInput(f"--optimizer must be sgd, adam, adamw or an import path "
                               f"'package.module:factory', got {opt!r}")
            over["optimizer"] = opt
    if getattr(a, "param_filter", None):
        over["param_filter"] = tuple(p.strip() for arg in a.param_filter for p in arg.split(",")
                                     if p.strip())
    if a.device == "auto":
        import torch

        over["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    elif a.device != "cpu":
        over["device"] = a.device
    if over_base is not None:
        if over:
            raise BadInput("a full recipe config ([model]/[data]/[optim]) cannot be combined with "
                           "recipe flags; edit the config instead")
        return over_base
    if tiny:
        over.setdefault("epochs", 1)
        over.setdefault("batch_size", 32)
        if "model" not in over and not {"width", "hidden"} & set(over):
            over["width"] = 4
        if over.get("dataset", "digits") == "digits":
            over.setdefault("n_train", 128)
    return Recipe.paper(**over)


def _checkpoint(s):
    if s in ("all", "sqrt"):
        return s
    try:
        v = int(s)
    except ValueError:
        raise BadInput(f"--checkpoint must be 'all', 'sqrt' or a positive integer, got {s!r}") from None
    if v < 1:
        raise BadInput(f"--checkpoint must be 'all', 'sqrt' or a positive integer, got {s!r}")
    return v


def _progress(quiet):
    if quiet or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return lambda **kw: tqdm(leave=False, **kw)


def cmd_run(a):
    from . import runner
    from .query import open as open_store

    recipe = _recipe_from_args(a)
    if a.k_top == 0 and a.k_bottom == 0:
        raise BadInput("--k-top and --k-bottom are both 0: nothing to compute")
    if a.resume and a.overwrite:
        raise BadInput("--resume and --overwrite exclude each other")
    from . import distributed

    group = _group(a)
    try:
        out = runner.run_analysis(recipe, a.store, k_top=a.k_top, k_bottom=a.k_bottom, tol=a.tol,
                                  method=a.method, run_id=a.run_id, resume=a.resume,
                                  overwrite=a.overwrite, checkpoint=_checkpoint(a.checkpoint),
                                  argv=["tjac"] + sys.argv[1:],
                                  progress=_progress(a.quiet or (group and not group.is_driver)),
                                  block=a.block, backend=a.backend, group=group)
    finally:
        distributed.close(group)
    if out is None:  # another rank of a process group: rank 0 stores and reports
        return 0
    run = open_store(a.store).run(out.run_id)
    png = None
    if (a.png or "").lower() != "none":
        from .plotting import spectrum_figure

        png = spectrum_figure(run, a.png or runner.default_png(a.store, out.run_id))
    if not a.quiet:
        print(_summary_table(out, png))
    return 0


def _certified(w: dict) -> str:
    """``certified 30/32`` + what the others are: upper bounds only (r >= 0.1 sigma), unconverged."""
    k = w["k"]
    text = f"certified {w['n_certified']}/{k}"
    extra = []
    if w.get("n_bound_only"):
        extra.append(f"{w['n_bound_only']} upper bound{'s' if w['n_bound_only'] > 1 else ''} only "
                     f"(r >= 0.1 sigma)")
    unconv = w.get("n_unconverged", k - w["n_certified"] - w.get("n_bound_only", 0))
    if unconv:
        extra.append(f"{unconv} unconverged")
    return ", ".join([text] + extra)


def _summary_table(out, png):
    from .analysis.regions import format_count

    s = out.summary
    sp = s["spectrum"]
    lines = [f"run {out.run_id} in {out.store}: P = {s['P']}, T = {s['T']} steps, "
             f"{s['seconds']:.1f} s, train acc {s['train']['train_acc']:.3f}, "
             f"test acc {s['train']['test_acc']:.3f}"]
    b = s.get("batches")
    if b and b.get("dropped_per_epoch"):
        from .problem import dropped_note

        lines.append(f"  note: {dropped_note(b['n_train'], b['batch_size'], b['dropped_per_epoch'])}")
    for which in ("top", "bottom"):
        if which in s:
            w = s[which]
            lines.append(f"  {which:6s} k={w['k']:<4d} {w['method']:9s} sigma {w['sigma_first']:.6g} .. "
                         f"{w['sigma_last']:.6g}   {_certified(w)}   "
                         f"max residual {w['max_residual_rel']:.1e} * sigma_max")
    partial = "" if sp["complete"] else (f" (partial: top and bottom only; the other "
                                         f"{sp['P'] - sp['n_sigma']} are unknown)")
    cert = sp.get("certificate_max")
    lines.append(f"  regions over {sp['n_sigma']} of {sp['P']} sigma{partial}"
                 + (f", each certified to r <= {cert:.1e}" if cert is not None else "") + ":")
    lines.append(f"    {'eps':>8s} {'chaotic':>12s} {'bulk':>12s} {'stable':>12s} {'ambiguous':>10s}")
    for r in sp["regions"]:
        lines.append(f"    {r['eps']:8.0e} " + " ".join(f"{format_count(r, n):>12s}" for n in
                                                        ("chaotic", "bulk", "stable"))
                     + f" {r.get('ambiguous', 0):10d}")
    st = sp.get("structural", {})
    if "numerically_one_min" in sp:
        one = {"one": sp["numerically_one"], "one_min": sp["numerically_one_min"],
               "one_max": sp["numerically_one_max"]}
        found = format_count(one, "one", sep=" ")
        found = (f"{found} found" if found != "unknown"
                 else f"unknown ({sp['numerically_one_min']} among the {sp['n_sigma']} known)")
        if sp.get("numerically_one_ambiguous"):
            found += f", {sp['numerically_one_ambiguous']} ambiguous"
    else:  # a summary written before the certificates were counted
        found = f"{sp['numerically_one']} found"
    lines.append(f"  sigma = 1 to 1e-12: {found}; structural prediction "
                 f"{st.get('n_exact_singular')} ({st.get('n_zero_input')} zero-input weights on "
                 f"features {st.get('zero_features')}, {st.get('n_softmax_shift')} softmax-shift "
                 f"directions{'' if st.get('shift_is_singular') else ': eigenvectors only under Adam'})")
    if sp.get("n_bound_only"):
        lines.append(f"  {sp['n_bound_only']} sigma are upper bounds only (r >= 0.1 sigma; sigma_min "
                     f"{sp['sigma_min']:.2g}"
                     f"{' is one' if sp.get('sigma_min_bound_only') else ''})")
    lines.append(f"  adjoint check {s['adjoint_rel_error']:.1e}" + (f"; figure {png}" if png else ""))
    lines.extend(f"  warning: {w}" for w in s.get("warnings", []))
    return "\n".join(lines)


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
    from .query import open as open_store

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
    from .query import open as open_store

    run = _pick_run(open_store(a.store), a.run)
    if a.density:
        return _query_density(run, a.json)
    if a.regions is not None:
        out = run.regions(a.regions)
        if a.json:
            print(json.dumps(out))
            return 0
        from .analysis.regions import format_count

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


def cli_analyze_cmd(a):
    from .cli_analyze import cmd_analyze

    return cmd_analyze(a)


def cmd_plot(a):
    from .plotting import density_figure, spectrum_figure
    from .query import open as open_store

    run = _pick_run(open_store(a.store), a.run)
    if a.analysis:
        from .analysis.plots import analysis_figure

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


def cmd_verify(a):
    """The operator's JVPs and VJPs (every column and row of J) against a dense oracle: jacrev of
    the whole training run through torch.func (derivatives of the model, loss and optimizer taken
    by torch, not hand-derived), on the recipe the options describe (tiny by default)."""
    import torch
    from torch.func import grad, jacrev

    import tjac
    from tjac.linalg import materialize

    recipe = _recipe_from_args(a, tiny=True)
    prob = tjac.Problem(recipe)
    P = prob.num_params if prob.selection is None else int(prob.selection.numel())
    if P > a.max_params:
        raise BadInput(f"P = {P:,} parameters is too many for the dense oracle (at most "
                       f"{a.max_params:,}, --max-params: it takes P reverse passes through "
                       f"training and a P x P matrix); use a smaller model or --param-filter")
    if recipe.data.shuffle == "unseeded":
        raise BadInput("shuffle 'unseeded' draws a new batch order on every pass: no dense "
                       "oracle to compare with")
    op = tjac.TrainingJacobian(prob)
    ref = tjac.Problem(recipe, model_backend="func")  # torch.func derivatives, not hand-derived
    base, sel = op.trajectory.theta0.detach(), prob.selection

    def train(x):
        theta = x if sel is None else torch.index_put(base, (sel,), x)
        state = ref.optimizer.init(theta)
        for t in range(ref.num_steps):
            state = ref.optimizer.update(state, grad(ref.loss)(state[0], t), t)
        return state[0] if sel is None else state[0][sel]

    J = jacrev(train)(op.theta0)
    Jf = materialize(op)
    I = torch.eye(P, dtype=op.dtype, device=op.device)
    Jr = op.rmatmat(I).T
    scale = float(J.abs().max())
    if not math.isfinite(scale) or scale == 0:
        print(f"P={P}: the dense oracle is {'zero' if scale == 0 else 'not finite'}: nothing to "
              f"compare", file=sys.stderr)
        return EXIT_FAILED
    rtol = a.rtol if a.rtol is not None else (1e-10 if op.dtype == torch.float64 else 1e-4)
    ef, er = float((Jf - J).abs().max()) / scale, float((Jr - J).abs().max()) / scale
    ok = ef <= rtol and er <= rtol
    print(f"{recipe.describe()}, P={P}, T={op.num_steps}: JVP vs dense oracle {ef:.2e}, VJP vs "
          f"dense oracle {er:.2e} (rtol {rtol:g}): {'OK' if ok else 'DISAGREE'}")
    return 0 if ok else EXIT_FAILED


def _int_list(s, flag):
    try:
        vals = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise BadInput(f"{flag} must be a comma-separated list of positive integers, got {s!r}") from None
    if not vals or min(vals) < 1:
        raise BadInput(f"{flag} must be a comma-separated list of positive integers, got {s!r}")
    return vals


def cmd_bench(a):
    from . import bench
    from .recipe import Recipe

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
        from ._env import environment

        with open(a.json, "w") as f:
            json.dump({"results": out, "environment": environment()}, f, indent=2)
    return 0


def cmd_scale(a):
    from . import scale

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
    from . import distributed

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


def _float_list(s, flag):
    try:
        vals = [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise BadInput(f"{flag} must be a comma-separated list of positive numbers, got {s!r}") from None
    if not vals or min(vals) <= 0 or not all(math.isfinite(v) for v in vals):
        raise BadInput(f"{flag} must be a comma-separated list of positive numbers, got {s!r}")
    return vals


def _computation_errors() -> tuple:
    """Failures of the computation itself (exit 1): a failed adjoint identity, replays that
    disagree, training that diverged."""
    from .distributed import RankFailedError, RanksDisagreeError
    from .runner import ComputationError
    from .trajectory import NondeterminismError, TrainingDivergedError

    return (ComputationError, NondeterminismError, TrainingDivergedError, RankFailedError,
            RanksDisagreeError)


class _PipeGuard:
    """``sys.stdout`` / ``sys.stderr`` while a command runs: once the reader is gone (``tjac ... |
    head``), the rest of the output goes to ``os.devnull`` (the stream's descriptor is pointed
    there, so Python's final flush is quiet too) and the command carries on, so a store it is
    writing is completed and the exit code is the command's own, not a BrokenPipeError
    traceback."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._to_devnull()
            return len(text)

    def flush(self):
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._to_devnull()

    def _to_devnull(self):
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, self._stream.fileno())
        finally:
            os.close(devnull)

    def __getattr__(self, name):  # isatty, fileno, encoding, ...
        return getattr(self._stream, name)


def main(argv=None) -> int:
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _PipeGuard(streams[0]), _PipeGuard(streams[1])
    try:
        return _main(argv)
    finally:
        sys.stdout.flush()  # output still buffered meets a closed pipe here, not at exit
        sys.stderr.flush()
        sys.stdout, sys.stderr = streams


def _main(argv) -> int:
    parser = build_parser()
    try:
        a = parser.parse_args(argv)
    except BadInput as e:
        print(f"tjac: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    level = logging.WARNING if a.quiet else (logging.DEBUG if a.verbose > 1 else
                                             logging.INFO if a.verbose else logging.WARNING)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    from .store import StoreError

    try:
        return {"run": cmd_run, "info": cmd_info, "query": cmd_query, "plot": cmd_plot,
                "verify": cmd_verify, "bench": cmd_bench, "scale": cmd_scale,
                "analyze": cli_analyze_cmd}[a.cmd](a)
    except _computation_errors() as e:  # before ValueError: a failed check is not bad input
        print(f"tjac: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except (BadInput, StoreError, ValueError, TypeError, KeyError, IndexError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"tjac: error: {msg}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except MemoryError as e:
        print(f"tjac: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("tjac: interrupted (resume with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
