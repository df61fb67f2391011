"""Recipes: everything that makes training a deterministic function theta_0 -> theta_T.

A :class:`Recipe` is a frozen, JSON-serialisable description of one training run: model, data,
optimizer, schedule, batch size, number of epochs, seed, dtype and device. Its :meth:`Recipe.hash`
is stable across processes and versions of Python (canonical JSON, SHA-256), so stored results can
be matched to the run that produced them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
from dataclasses import dataclass, field
from typing import Any

from . import _checks

SCHEMA = 1

MODEL_FAMILIES = ("mlp", "cnn", "transformer", "module")
ACTIVATIONS = ("gelu_tanh", "tanh", "relu")
DATASETS = ("digits", "iris", "wine", "breast_cancer")  # sklearn's bundled sets; else a path
PREPROCESS = ("default", "none", "scale01", "standardize")
LOSSES = ("cross_entropy", "mse")  # or "package.module:function"
DATA_VARIANTS = ("clean", "shuffled_labels", "white_noise")
SHUFFLES = ("none", "seeded", "unseeded")
OPTIMIZERS = ("sgd", "adam", "adamw", "custom")
# Recipe.paper overrides that describe the built-in optimizers only (a user optimizer's own
# settings go in its kwargs)
BUILTIN_OPTIM_OVERRIDES = frozenset({"lr", "momentum", "nesterov", "weight_decay", "schedule",
                                     "warmup_steps"})
SCHEDULES = ("cosine", "constant")
DTYPES = ("float64", "float32")


class _LiveMissing:
    """Stands for a live module or arrays in a recipe read back from JSON: the recipe can be shown
    and queried, but building its model or data asks for the object again."""

    def __repr__(self):
        return "<live object not available in this process>"


LIVE_MISSING = _LiveMissing()


def _json_kwargs(what: str, kwargs) -> dict:
    """A JSON object, normalised (keys sorted) so equal kwargs give equal recipes and hashes."""
    if kwargs is None:
        return {}
    if isinstance(kwargs, str):
        try:
            kwargs = json.loads(kwargs)
        except json.JSONDecodeError as e:
            raise ValueError(f"`{what}` must be a JSON object: {e}") from None
    if not isinstance(kwargs, dict):
        raise ValueError(f"`{what}` must be a JSON object (a dict), got {type(kwargs).__name__}")
    try:
        return json.loads(json.dumps(kwargs, sort_keys=True, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ValueError(f"`{what}` must hold only JSON values (numbers, strings, lists, dicts): "
                         f"{e}") from None


def _same_json(value, default) -> bool:
    """Whether the JSON value ``value`` is the Python default ``default`` (as JSON: 64 is not 64.0,
    1 is not True; a tuple is its list)."""
    try:
        return json.dumps(value, sort_keys=True) == json.dumps(default, sort_keys=True)
    except (TypeError, ValueError):  # a default that is not JSON (an object): never dropped
        return False


def canonical_kwargs(what: str, path: str, kwargs: dict) -> dict:
    """``kwargs`` of the factory at import path ``path`` without those given at the factory's own
    default value (``inspect.signature``), so passing a default explicitly makes the same recipe
    (and the same hash and run id) as leaving it out. A name the factory does not take (and no
    ``**kwargs`` to take it) is refused. Factories whose signature cannot be read, and arguments
    that reach a ``**kwargs``, are kept as given."""
    if not kwargs:
        return kwargs
    from ._imports import resolve

    obj = resolve(path, what=what)
    if not callable(obj):
        return kwargs
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):  # some builtins and C extensions
        return kwargs
    named = {n: p for n, p in params.items()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    out = {}
    for k, v in kwargs.items():
        p = named.get(k)
        if p is None and not takes_any:
            raise ValueError(f"{what} {path!r} takes no argument {k!r}; its keyword arguments are "
                             f"{', '.join(named) or 'none'}")
        if p is not None and p.default is not p.empty and _same_json(v, p.default):
            continue
        out[k] = v
    return out


def _import_path(what: str, path) -> None:
    if not isinstance(path, str) or path.count(":") != 1 or not all(path.split(":")):
        raise ValueError(f"`{what}` must be an import path 'package.module:attribute', got {path!r}")


def _omit_defaults(obj, d: dict) -> dict:
    """Drop the fields added after schema 1 while they hold their defaults, so adding a field never
    changes the JSON (hence the hash) of a recipe written before it existed."""
    for f in dataclasses.fields(obj):
        if f.name in getattr(obj, "_ADDED", ()) and getattr(obj, f.name) == (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default):
            d.pop(f.name, None)
    return d


@dataclass(frozen=True)
class ModelSpec:
    """The network. ``hidden`` lists hidden-layer widths (the paper: ``(64,)``).

    Weights are LeCun-normal (``weight_init="lecun_normal"``: JAX/Flax's truncated normal with
    variance 1/fan_in; ``"normal"``: untruncated); biases are N(0, 1/fan_in), which for the paper's
    64-64-10 net is the paper's N(0, 1/width) for every bias, the output bias included.
    ``dropout`` > 0 draws masks from a per-step seed (recipe.seed, step): the same masks in training
    and in every replay.

    ``family="module"``: any ``torch.nn.Module`` built by ``factory`` (an import path
    ``"package.module:function"``) called with the JSON object ``kwargs``; ``hidden``, ``activation``
    and ``weight_init`` do not apply. A live module or factory (``Recipe.paper(model=obj)``) is held
    in ``live`` and named ``"live:<qualname>"``: such a recipe runs, but cannot be rebuilt from its
    JSON.
    """

    _ADDED = ("factory", "kwargs")

    family: str = "mlp"
    hidden: tuple[int, ...] = (64,)
    activation: str = "gelu_tanh"
    dropout: float = 0.0
    weight_init: str = "lecun_normal"
    factory: str | None = None
    kwargs: dict = field(default_factory=dict)
    live: Any = field(default=None, compare=False, repr=False)

    def __hash__(self):
        return hash(json.dumps(_omit_defaults(self, _asdict(self)), sort_keys=True))

    def __post_init__(self):
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        object.__setattr__(self, "kwargs", _json_kwargs("model kwargs", self.kwargs))
        _checks.one_of("model family", self.family, MODEL_FAMILIES)
        if self.family == "module":
            if self.factory is None:
                raise ValueError("a model of family 'module' needs `factory` "
                                 "('package.module:function')")
            if not self.factory.startswith("live:"):
                _import_path("model", self.factory)
            elif self.live is None:
                raise ValueError(f"recipe names the live model {self.factory[5:]!r}, which "
                                 f"exists only in the process that made it: pass the module or "
                                 f"factory again (Recipe.paper(model=...))")
        elif self.factory is not None or self.kwargs:
            raise ValueError(f"`factory`/`kwargs` apply to family 'module', not {self.family!r}")
        _checks.one_of("weight_init", self.weight_init, ("lecun_normal", "normal"))
        _checks.one_of("activation", self.activation, ACTIVATIONS)
        if len(self.hidden) == 0:
            raise ValueError("`hidden` must list at least one hidden width")
        for h in self.hidden:
            _checks.positive_int("hidden width", h)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"`dropout` must satisfy 0 <= dropout < 1, got {self.dropout}")


@dataclass(frozen=True)
class DataSpec:
    """The data set and the batch order.

    ``digits``: sklearn's bundled 8x8 digits, X/16, ``train_test_split(test_size=197, random_state=0)``.
    Variants: ``shuffled_labels`` (train labels permuted with ``variant_seed``), ``white_noise``
    (inputs replaced by N(0, 1) noise drawn with ``variant_seed``). ``n_train`` keeps only the first
    ``n_train`` training examples (tiny test recipes). ``shuffle``: ``none`` (the paper: consecutive
    batches in the same order every epoch), ``seeded`` (a new permutation per epoch from
    ``shuffle_seed``) or ``unseeded`` (torch's global RNG: not deterministic, refused by ``check()``).

    ``name``: one of sklearn's bundled sets (``digits``, ``iris``, ``wine``, ``breast_cancer``) or a
    path: an ``.npz`` (or a folder of ``.npy`` files) with ``X_train, y_train, X_test, y_test``, a
    folder of MNIST/Fashion-MNIST IDX files, or a folder of CIFAR-10/100 binary batches. Arrays held
    in memory (``Recipe.paper(dataset=(X_train, y_train, X_test, y_test))``) live in ``live`` and
    are named ``"arrays:<sha256 prefix>"``. ``preprocess``: ``default`` (the source's convention:
    digits X/16, 8-bit images X/255, else none), ``none``, ``scale01`` (the training set's range
    onto [0, 1]) or ``standardize`` (per feature, training-set mean and std; constant features
    become 0). ``test_size``/``split_seed`` apply to sklearn's sets only. ``drop_last``: when the
    batch size does not divide the number of training examples, drop the last ``n_train mod
    batch_size`` examples of each epoch (True, the paper's loop; logged as a warning) or train on
    them as a smaller last batch (False).
    """

    _ADDED = ("preprocess", "drop_last")

    name: str = "digits"
    variant: str = "clean"
    test_size: int = 197
    split_seed: int = 0
    variant_seed: int = 0
    n_train: int | None = None
    shuffle: str = "none"
    shuffle_seed: int = 0
    preprocess: str = "default"
    drop_last: bool = True
    live: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if not isinstance(self.drop_last, bool):
            raise TypeError(f"`drop_last` must be true or false, got {self.drop_last!r}")
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"`dataset` must be a name ({', '.join(DATASETS)}) or a path, "
                             f"got {self.name!r}")
        if self.name.startswith("arrays:") and self.live is None:
            raise ValueError(f"recipe names in-memory arrays ({self.name!r}) that exist only in "
                             f"the process that made it: pass them again "
                             f"(Recipe.paper(dataset=...))")
        _checks.one_of("preprocess", self.preprocess, PREPROCESS)
        _checks.one_of("data variant", self.variant, DATA_VARIANTS)
        _checks.one_of("shuffle", self.shuffle, SHUFFLES)
        _checks.positive_int("test_size", self.test_size)
        if self.n_train is not None:
            _checks.positive_int("n_train", self.n_train)


@dataclass(frozen=True)
class OptimSpec:
    """Optimizer and learning-rate schedule.

    ``sgd``: m <- g + momentum*m; theta <- theta - lr_t * m (``nesterov``: - lr_t*(g + momentum*m));
    ``weight_decay`` adds wd*theta to g. ``adam``/``adamw``: bias-corrected moments,
    theta <- theta - lr_t * m_hat / (sqrt(v_hat + eps_root) + eps) (optax's form; torch's Adam is the
    case eps_root = 0); ``adam`` adds wd*theta to g, ``adamw`` decays theta by lr_t*wd.
    Schedules over steps t = 0..T-1: ``cosine`` lr*(1 + cos(pi t / T))/2, or ``constant``; a linear
    warm-up over the first ``warmup_steps`` multiplies either by (t+1)/warmup_steps.
    ``clip_norm``: the gradient is scaled by min(1, clip_norm/||g||) (global norm) before the
    optimizer sees it. ``custom``: ``factory`` (``"package.module:function"``, called with the JSON
    ``kwargs``) returns an optax-style pair of pure functions ``init(params) -> state`` and
    ``update(grads, state, params, step) -> (updates, state)`` over flat tensors; the lr, schedule
    and moment fields do not apply.
    """

    _ADDED = ("clip_norm", "factory", "kwargs")

    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    eps_root: float = 1e-8
    schedule: str = "cosine"
    warmup_steps: int = 0
    clip_norm: float | None = None
    factory: str | None = None
    kwargs: dict = field(default_factory=dict)

    def __hash__(self):
        return hash(json.dumps(_omit_defaults(self, _asdict(self)), sort_keys=True))

    def __post_init__(self):
        object.__setattr__(self, "kwargs", _json_kwargs("optimizer kwargs", self.kwargs))
        _checks.one_of("optimizer", self.name, OPTIMIZERS)
        if self.name == "custom":
            _import_path("optimizer", self.factory)
        elif self.factory is not None or self.kwargs:
            raise ValueError(f"`factory`/`kwargs` apply to the 'custom' optimizer, not {self.name!r}")
        if self.clip_norm is not None:
            _checks.positive_float("clip_norm", self.clip_norm)
        _checks.one_of("schedule", self.schedule, SCHEDULES)
        _checks.positive_float("lr", self.lr)
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"`momentum` must satisfy 0 <= momentum < 1, got {self.momentum}")
        if self.nesterov and self.momentum == 0:
            raise ValueError("`nesterov` needs momentum > 0")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"`{name}` must satisfy 0 <= {name} < 1")
        for name in ("weight_decay", "eps", "eps_root"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0")
        if self.warmup_steps < 0:
            raise ValueError("`warmup_steps` must be >= 0")


@dataclass(frozen=True)
class Recipe:
    """One deterministic training run. ``Recipe.paper()`` is Belrose & Scherlis (2024).

    ``loss``: ``cross_entropy`` (integer labels), ``mse`` (mean of the squared error over all
    elements, as ``F.mse_loss``) or ``"package.module:function"`` called as ``loss(outputs, targets)`` and
    returning the batch mean. ``param_filter``: names or glob patterns of parameters (``"layers.0.*"``);
    J is then the block d theta_T[S] / d theta_0[S] of those parameters, the others starting from
    theta_0 and training as usual.
    """

    _ADDED = ("loss", "param_filter")

    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    optim: OptimSpec = field(default_factory=OptimSpec)
    batch_size: int = 64
    epochs: int = 25
    seed: int = 0
    dtype: str = "float64"
    device: str = "cpu"
    loss: str = "cross_entropy"
    param_filter: tuple[str, ...] = ()

    def __post_init__(self):
        if isinstance(self.param_filter, str):
            object.__setattr__(self, "param_filter", (self.param_filter,))
        object.__setattr__(self, "param_filter", tuple(self.param_filter))
        if not all(isinstance(p, str) and p for p in self.param_filter):
            raise ValueError(f"`param_filter` must be parameter names or glob patterns, got "
                             f"{self.param_filter!r}")
        if self.loss not in LOSSES:
            if not isinstance(self.loss, str) or self.loss.count(":") != 1:
                raise ValueError(f"unknown loss {self.loss!r}; expected one of "
                                 f"{', '.join(map(repr, LOSSES))} or 'package.module:function'")
            _import_path("loss", self.loss)
        _checks.positive_int("batch_size", self.batch_size)
        _checks.positive_int("epochs", self.epochs)
        _checks.one_of("dtype", self.dtype, DTYPES)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise TypeError(f"`seed` must be an integer, got {self.seed!r}")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise ValueError(f"`device` must be 'cpu' or 'cuda[:N]', got {self.device!r}")

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def paper(cls, **overrides: Any) -> "Recipe":
        """The paper's recipe with optional overrides.

        Overrides: ``family`` (``mlp``, ``cnn``: ``width`` = channels, ``transformer``: ``width``
        = model width, ``depth`` = blocks), ``width`` (every hidden layer), ``depth`` (number of
        hidden layers), ``model`` (an import path ``"package.module:factory"``, or a live
        ``nn.Module`` / factory) with ``model_kwargs``, ``hidden``
        (explicit tuple), ``activation``, ``dropout``, ``epochs``, ``batch_size``, ``optimizer``
        (``sgd``; ``adam``/``adamw`` switch to lr 3e-3 unless ``lr`` is given), ``lr``,
        ``momentum``, ``weight_decay``, ``schedule``, ``warmup_steps``, ``clip_norm``, ``optimizer_factory``
        (``optimizer="custom"``) with ``optimizer_kwargs`` (``lr``, ``momentum``, ``nesterov``,
        ``weight_decay``, ``schedule`` and ``warmup_steps`` are refused with it), ``data`` (a variant name), ``dataset`` (a
        name, a path, or arrays ``(X_train, y_train, X_test, y_test)`` / a dict with those keys),
        ``preprocess``, ``n_train``, ``shuffle``, ``drop_last``, ``loss``, ``param_filter``, ``seed``, ``dtype``,
        ``device``. ``model_kwargs``/``optimizer_kwargs`` of an import path are canonical
        (:func:`canonical_kwargs`): an argument at the factory's default value is dropped.
        """
        known = {"family", "width", "depth", "hidden", "activation", "dropout", "weight_init", "epochs",
                 "batch_size",
                 "optimizer", "lr", "momentum", "nesterov", "weight_decay", "schedule",
                 "warmup_steps", "data", "variant_seed", "n_train", "shuffle", "shuffle_seed",
                 "seed", "dtype", "device", "model", "model_kwargs", "dataset", "preprocess",
                 "loss", "param_filter", "clip_norm", "optimizer_factory", "optimizer_kwargs",
                 "drop_last"}
        unknown = set(overrides) - known
        if unknown:
            raise TypeError(f"unknown override(s) {sorted(unknown)}; known: {sorted(known)}")
        o = dict(overrides)
        width = o.pop("width", 64)
        depth = o.pop("depth", 1)
        _checks.positive_int("width", width)
        _checks.positive_int("depth", depth)
        hidden = tuple(o.pop("hidden", (width,) * depth))
        user = o.pop("model", None)
        user_kwargs = o.pop("model_kwargs", None)
        if user is None:
            if user_kwargs:
                raise TypeError("`model_kwargs` needs `model` (an import path or a live module)")
            model = ModelSpec(family=o.pop("family", "mlp"), hidden=hidden,
                              activation=o.pop("activation", "gelu_tanh"),
                              dropout=o.pop("dropout", 0.0),
                              weight_init=o.pop("weight_init", "lecun_normal"))
        else:
            clash = {"family", "width", "depth", "hidden", "activation", "weight_init",
                     "dropout"} & set(overrides)
            if clash:
                raise TypeError(f"{sorted(clash)} describe the built-in families; a user `model` "
                                f"takes `model_kwargs` instead")
            if isinstance(user, str):
                _import_path("model", user)
                model = ModelSpec(family="module", factory=user,
                                  kwargs=canonical_kwargs("model", user,
                                                          _json_kwargs("model kwargs", user_kwargs)))
            elif callable(user):
                if user_kwargs:
                    raise TypeError("`model_kwargs` apply to an import path; call a live factory "
                                    "yourself (functools.partial)")
                name = _live_name(user, o.get("seed", 0), o.get("dtype", "float64"))
                model = ModelSpec(family="module", factory=name, live=user)
            else:
                raise TypeError(f"`model` must be an import path, an nn.Module or a factory, got "
                                f"{type(user).__name__}")
        dataset = o.pop("dataset", "digits")
        live_data = None
        if not isinstance(dataset, str):
            live_data = data_arrays(dataset)
            dataset = arrays_name(live_data)
        data = DataSpec(name=dataset, variant=o.pop("data", "clean"),
                        variant_seed=o.pop("variant_seed", 0),
                        n_train=o.pop("n_train", None), shuffle=o.pop("shuffle", "none"),
                        shuffle_seed=o.pop("shuffle_seed", 0),
                        preprocess=o.pop("preprocess", "default"),
                        drop_last=o.pop("drop_last", True), live=live_data)
        name = o.pop("optimizer", "sgd")
        lr = o.pop("lr", 3e-3 if name in ("adam", "adamw") else 0.1)
        factory = o.pop("optimizer_factory", None)
        if factory is not None and name == "sgd" and "optimizer" not in overrides:
            name = "custom"
        opt_kwargs = o.pop("optimizer_kwargs", None) or {}
        if name == "custom":
            builtin_only = sorted(BUILTIN_OPTIM_OVERRIDES & set(overrides))
            if builtin_only:
                raise TypeError(f"{', '.join(map(repr, builtin_only))} appl"
                                f"{'ies' if len(builtin_only) == 1 else 'y'} to the built-in "
                                f"optimizers (sgd, adam, adamw), not to the user optimizer "
                                f"{factory!r}; pass {'it' if len(builtin_only) == 1 else 'them'} "
                                f"in `optimizer_kwargs` (--optimizer-kwargs)")
            if isinstance(factory, str):
                _import_path("optimizer", factory)
                opt_kwargs = canonical_kwargs("optimizer", factory,
                                              _json_kwargs("optimizer kwargs", opt_kwargs))
        optim = OptimSpec(name=name, lr=lr, momentum=o.pop("momentum", 0.9),
                          nesterov=o.pop("nesterov", False),
                          weight_decay=o.pop("weight_decay", 0.0),
                          schedule=o.pop("schedule", "cosine"),
                          warmup_steps=o.pop("warmup_steps", 0),
                          clip_norm=o.pop("clip_norm", None), factory=factory, kwargs=opt_kwargs)
        if "param_filter" in o and o["param_filter"] is None:
            o["param_filter"] = ()
        return cls(model=model, data=data, optim=optim, **o)

    def with_canonical_kwargs(self) -> "Recipe":
        """This recipe with the kwargs of its model and optimizer factories (import paths) stripped
        of arguments given at the factory's default (:func:`canonical_kwargs`): the form
        :meth:`paper` builds. Not applied when reading a stored recipe (its hash stays as stored)."""
        m, o = self.model, self.optim
        if m.family == "module" and m.live is None and m.kwargs:
            m = dataclasses.replace(m, kwargs=canonical_kwargs("model", m.factory, m.kwargs))
        if o.name == "custom" and o.kwargs:
            o = dataclasses.replace(o, kwargs=canonical_kwargs("optimizer", o.factory, o.kwargs))
        return dataclasses.replace(self, model=m, optim=o)

    def describe(self) -> str:
        """A short label of the model and data, e.g. ``MLP[64] on digits``."""
        m = self.model
        if m.family == "module":
            what = m.factory + (f"({json.dumps(m.kwargs, sort_keys=True)})" if m.kwargs else "")
        else:
            what = {"mlp": "MLP", "cnn": "CNN", "transformer": "transformer"}[m.family] + \
                str(list(m.hidden))
        name = self.data.name if len(self.data.name) <= 40 else "..." + self.data.name[-37:]
        return f"{what} on {name}" + (f" [{', '.join(self.param_filter)}]" if self.param_filter else "")

    @property
    def is_live(self) -> bool:
        """Whether the recipe holds a live module or arrays (runs, but cannot be rebuilt from JSON)."""
        return self.model.live is not None or self.data.live is not None

    def replace(self, **changes: Any) -> "Recipe":
        return dataclasses.replace(self, **changes)

    # -- serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Canonical JSON-ready form (fields added after schema 1 appear only when set)."""
        d = _omit_defaults(self, _asdict(self))
        for name in ("model", "data", "optim"):
            d[name] = _omit_defaults(getattr(self, name), d[name])
        d["model"]["hidden"] = list(self.model.hidden)
        if "param_filter" in d:
            d["param_filter"] = list(self.param_filter)
        d["schema"] = SCHEMA
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        d = dict(d)
        schema = d.pop("schema", SCHEMA)
        if schema != SCHEMA:
            raise ValueError(f"recipe schema {schema} is not supported (this tjac reads {SCHEMA})")
        for name in ("model", "data", "optim"):
            if "live" in d.get(name, {}):
                raise ValueError(f"invalid recipe: unknown key 'live' in [{name}]")
        m, dat = dict(d.get("model", {})), dict(d.get("data", {}))
        if str(m.get("factory") or "").startswith("live:"):
            d["model"] = {**m, "live": LIVE_MISSING}
        if str(dat.get("name") or "").startswith("arrays:"):
            d["data"] = {**dat, "live": LIVE_MISSING}
        try:
            return cls(model=ModelSpec(**d.pop("model", {})), data=DataSpec(**d.pop("data", {})),
                       optim=OptimSpec(**d.pop("optim", {})), **d)
        except TypeError as e:  # unknown keys
            raise ValueError(f"invalid recipe: {e}") from None

    @classmethod
    def from_json(cls, text: str) -> "Recipe":
        return cls.from_dict(json.loads(text))

    def hash(self) -> str:
        """SHA-256 of the canonical JSON, device excluded (the same math on any device)."""
        d = self.to_dict()
        d.pop("device")
        blob = json.dumps(d, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _asdict(obj) -> dict:
    """dataclasses.asdict without the live objects (modules and arrays are not recipe data)."""
    out = {}
    for f in dataclasses.fields(obj):
        if f.name == "live" or f.name.startswith("_"):
            continue
        v = getattr(obj, f.name)
        out[f.name] = _asdict(v) if dataclasses.is_dataclass(v) else (
            dict(v) if isinstance(v, dict) else v)
    return out


ARRAY_KEYS = ("X_train", "y_train", "X_test", "y_test")


def data_arrays(data) -> dict:
    """``(X_train, y_train, X_test, y_test)`` or a dict with those keys -> {key: numpy array}."""
    import numpy as np

    if data is LIVE_MISSING:
        raise ValueError("the recipe names in-memory arrays that exist only in the process that "
                         "made it: pass them again (Recipe.paper(dataset=...))")
    if isinstance(data, dict):
        missing = [k for k in ARRAY_KEYS if k not in data]
        if missing:
            raise ValueError(f"in-memory data must have the keys {', '.join(ARRAY_KEYS)}; missing "
                             f"{', '.join(missing)}")
        items = [data[k] for k in ARRAY_KEYS]
    elif isinstance(data, (tuple, list)) and len(data) == 4:
        items = list(data)
    else:
        raise TypeError("`dataset` must be a name, a path, a dict with keys "
                        f"{', '.join(ARRAY_KEYS)} or a 4-tuple of arrays, got {type(data).__name__}")
    out = {}
    for k, a in zip(ARRAY_KEYS, items):
        if hasattr(a, "detach"):  # torch tensor
            a = a.detach().cpu().numpy()
        a = np.asarray(a)
        if a.dtype == object:
            raise TypeError(f"`{k}` must be a numeric array, got dtype object")
        out[k] = a
    return out


def arrays_name(data) -> str:
    """``"arrays:<sha256 prefix>"`` of in-memory data (dtype, shape and bytes of each array)."""
    import numpy as np

    h = hashlib.sha256()
    for k, a in data_arrays(data).items():
        h.update(f"{k}:{a.dtype.str}:{a.shape};".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return "arrays:" + h.hexdigest()[:16]


def _live_name(obj, seed: int, dtype: str) -> str:
    """``live:<qualname>@<digest>`` of a live module or factory: the SHA-256 prefix of the class and
    of theta_0 (the module's state as given, or what the factory builds under ``seed``), so two
    different live models never share a recipe hash (or a run id)."""
    if _is_module(obj):
        module, qual = obj, type(obj).__qualname__
    else:
        func = getattr(obj, "func", obj)  # functools.partial
        qual = getattr(func, "__qualname__", None) or type(obj).__qualname__
        with _checks.seeded_construction(seed, dtype):  # as tjac builds it for a run
            try:
                module = obj()
            except Exception as e:  # noqa: BLE001 - the user's factory failed
                raise ValueError(f"model {qual!r} raised {type(e).__name__}: {e}") from None
        if not _is_module(module):
            raise ValueError(f"model {qual!r} returned a {type(module).__name__}, not a "
                             f"torch.nn.Module")
    h = hashlib.sha256(f"{type(module).__module__}.{type(module).__qualname__}".encode())
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return f"live:{qual}@{h.hexdigest()[:12]}"


def _is_module(obj) -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return False
    return isinstance(obj, torch.nn.Module)
