"""The ``tjac`` argument parser: one-line errors (:class:`BadInput`, exit 2), the option types
and option groups the subcommands share, and :func:`build_parser`.

Nothing here imports torch: ``tjac --help`` and a parse error stay fast.
"""

from __future__ import annotations

import argparse
import math
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


def _positive_float(s):
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {s}")
    return v


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
    from .. import distributed

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

    from . import analyze

    analyze.add_parser(sub, [common])

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


def _int_list(s, flag):
    try:
        vals = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise BadInput(f"{flag} must be a comma-separated list of positive integers, got {s!r}") from None
    if not vals or min(vals) < 1:
        raise BadInput(f"{flag} must be a comma-separated list of positive integers, got {s!r}")
    return vals


def _float_list(s, flag):
    try:
        vals = [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise BadInput(f"{flag} must be a comma-separated list of positive numbers, got {s!r}") from None
    if not vals or min(vals) <= 0 or not all(math.isfinite(v) for v in vals):
        raise BadInput(f"{flag} must be a comma-separated list of positive numbers, got {s!r}")
    return vals


def _progress(quiet):
    if quiet or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return lambda **kw: tqdm(leave=False, **kw)
