"""Recipes: everything that makes training a deterministic function theta_0 -> theta_T.

A :class:`Recipe` is a frozen, JSON-serialisable description of one training run: model, data,
optimizer, schedule, batch size, number of epochs, seed, dtype and device. Its :meth:`Recipe.hash`
is stable across processes and versions of Python (canonical JSON, SHA-256), so stored results can
be matched to the run that produced them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from . import _checks

SCHEMA = 1

MODEL_FAMILIES = ("mlp", "cnn", "transformer")
ACTIVATIONS = ("gelu_tanh", "tanh", "relu")
DATASETS = ("digits",)
DATA_VARIANTS = ("clean", "shuffled_labels", "white_noise")
SHUFFLES = ("none", "seeded", "unseeded")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "constant")
DTYPES = ("float64", "float32")


@dataclass(frozen=True)
class ModelSpec:
    """The network. ``hidden`` lists hidden-layer widths (the paper: ``(64,)``).

    Weights are LeCun-normal (``weight_init="lecun_normal"``: JAX/Flax's truncated normal with
    variance 1/fan_in; ``"normal"``: untruncated); biases are N(0, 1/fan_in), which for the paper's
    64-64-10 net is the paper's N(0, 1/width) for every bias, the output bias included.
    ``dropout`` > 0 makes training stochastic; :meth:`tjac.TrainingJacobian.check` refuses it.
    """

    family: str = "mlp"
    hidden: tuple[int, ...] = (64,)
    activation: str = "gelu_tanh"
    dropout: float = 0.0
    weight_init: str = "lecun_normal"

    def __post_init__(self):
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        _checks.one_of("model family", self.family, MODEL_FAMILIES)
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
    """

    name: str = "digits"
    variant: str = "clean"
    test_size: int = 197
    split_seed: int = 0
    variant_seed: int = 0
    n_train: int | None = None
    shuffle: str = "none"
    shuffle_seed: int = 0

    def __post_init__(self):
        _checks.one_of("data set", self.name, DATASETS)
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
    """

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

    def __post_init__(self):
        _checks.one_of("optimizer", self.name, OPTIMIZERS)
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
    """One deterministic training run. ``Recipe.paper()`` is Belrose & Scherlis (2024)."""

    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    optim: OptimSpec = field(default_factory=OptimSpec)
    batch_size: int = 64
    epochs: int = 25
    seed: int = 0
    dtype: str = "float64"
    device: str = "cpu"

    def __post_init__(self):
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
        hidden layers), ``hidden``
        (explicit tuple), ``activation``, ``dropout``, ``epochs``, ``batch_size``, ``optimizer``
        (``sgd``; ``adam``/``adamw`` switch to lr 3e-3 unless ``lr`` is given), ``lr``,
        ``momentum``, ``weight_decay``, ``schedule``, ``warmup_steps``, ``data`` (a variant name),
        ``n_train``, ``shuffle``, ``seed``, ``dtype``, ``device``.
        """
        known = {"family", "width", "depth", "hidden", "activation", "dropout", "weight_init", "epochs",
                 "batch_size",
                 "optimizer", "lr", "momentum", "nesterov", "weight_decay", "schedule",
                 "warmup_steps", "data", "variant_seed", "n_train", "shuffle", "shuffle_seed",
                 "seed", "dtype", "device"}
        unknown = set(overrides) - known
        if unknown:
            raise TypeError(f"unknown override(s) {sorted(unknown)}; known: {sorted(known)}")
        o = dict(overrides)
        width = o.pop("width", 64)
        depth = o.pop("depth", 1)
        _checks.positive_int("width", width)
        _checks.positive_int("depth", depth)
        hidden = tuple(o.pop("hidden", (width,) * depth))
        model = ModelSpec(family=o.pop("family", "mlp"), hidden=hidden,
                          activation=o.pop("activation", "gelu_tanh"),
                          dropout=o.pop("dropout", 0.0),
                          weight_init=o.pop("weight_init", "lecun_normal"))
        data = DataSpec(variant=o.pop("data", "clean"), variant_seed=o.pop("variant_seed", 0),
                        n_train=o.pop("n_train", None), shuffle=o.pop("shuffle", "none"),
                        shuffle_seed=o.pop("shuffle_seed", 0))
        name = o.pop("optimizer", "sgd")
        lr = o.pop("lr", 3e-3 if name in ("adam", "adamw") else 0.1)
        optim = OptimSpec(name=name, lr=lr, momentum=o.pop("momentum", 0.9),
                          nesterov=o.pop("nesterov", False),
                          weight_decay=o.pop("weight_decay", 0.0),
                          schedule=o.pop("schedule", "cosine"),
                          warmup_steps=o.pop("warmup_steps", 0))
        return cls(model=model, data=data, optim=optim, **o)

    def replace(self, **changes: Any) -> "Recipe":
        return dataclasses.replace(self, **changes)

    # -- serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["model"]["hidden"] = list(self.model.hidden)
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
