"""``tjac run`` (train, solve, store, summarize) and ``tjac verify`` (the operator against a dense
oracle), with the recipe both build from their options."""

from __future__ import annotations

import json
import math
import os
import sys

from .parser import EXIT_FAILED, BadInput, _group, _progress

def _recipe_from_args(a, *, tiny: bool = False):
    """The recipe of the options :func:`_recipe_args` defines. ``tiny`` (``tjac verify``): what a
    flag or an overrides config leaves unset is small enough for a dense oracle (1 epoch, batch 32,
    the built-in MLP at width 4, 128 digits); a full-table config is taken as it is."""
    import tomllib

    from ..recipe import BUILTIN_OPTIM_OVERRIDES, Recipe

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


def cmd_run(a):
    from .. import runner
    from ..query import open as open_store

    recipe = _recipe_from_args(a)
    if a.k_top == 0 and a.k_bottom == 0:
        raise BadInput("--k-top and --k-bottom are both 0: nothing to compute")
    if a.resume and a.overwrite:
        raise BadInput("--resume and --overwrite exclude each other")
    from .. import distributed

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
        from ..plotting import spectrum_figure

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
    from ..analysis.regions import format_count

    s = out.summary
    sp = s["spectrum"]
    lines = [f"run {out.run_id} in {out.store}: P = {s['P']}, T = {s['T']} steps, "
             f"{s['seconds']:.1f} s, train acc {s['train']['train_acc']:.3f}, "
             f"test acc {s['train']['test_acc']:.3f}"]
    b = s.get("batches")
    if b and b.get("dropped_per_epoch"):
        from ..problem import dropped_note

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
