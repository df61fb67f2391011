"""From stored arrays to tensors: validation, ``n_train``, preprocessing, variants, the memory
check, and :class:`Dataset`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .._checks import available_bytes
from ..recipe import ARRAY_KEYS
from . import sources
from ._common import DataError, Raw

MEMORY_FRACTION = 0.5  # the data may take at most this share of the device's available memory


@dataclass(frozen=True, eq=False)
class Dataset:
    """Train/test tensors on the recipe's device. Inputs have the recipe's dtype and shape
    (N, *input_shape); labels are int64 (N,) for classification, targets the recipe's dtype
    (N,) or (N, d) for regression (``n_classes`` None). ``sources`` is ``{label: sha256}`` of
    everything read (file paths as given, ``sklearn:<name>`` or ``arrays``)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int | None
    sources: dict = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def n_features(self) -> int:
        return math.prod(self.input_shape)

    @property
    def task(self) -> str:
        return "regression" if self.n_classes is None else "classification"


def load(spec, *, dtype: torch.dtype, device: torch.device) -> Dataset:
    """The data set ``spec`` (a :class:`tjac.recipe.DataSpec`) names, on ``device`` in ``dtype``.

    Steps, in order: read (``sources.read``), validate (finite, matching lengths and shapes, labels
    >= 0), keep the first ``n_train`` training examples, refuse data larger than half the device's
    available memory, preprocess in float64 with statistics of the kept training examples
    (:func:`preprocess`), apply the variant (``np.random.default_rng(variant_seed)``:
    ``shuffled_labels`` permutes the training labels, ``white_noise`` draws X_train then X_test
    from N(0, 1)), cast to ``dtype`` (labels to int64).

    Parameters
    ----------
    spec : DataSpec
        ``name`` (a sklearn set, a path, or ``"arrays:<sha>"`` with the arrays in ``live``),
        ``variant``, ``n_train``, ``preprocess``, ``test_size``/``split_seed`` (sklearn sets).
    dtype, device
        The recipe's; the data lives once on ``device``.

    Raises
    ------
    DataError
        Missing, malformed, non-finite, pickled or too large data (a one-line message naming the
        file, or ``in-memory arrays``, and the array).
    """
    device = torch.device(device)
    raw = sources.read(spec)
    n_classes = validate(raw)
    a = dict(raw.arrays)
    if spec.n_train is not None:
        n = len(a["X_train"])
        if spec.n_train > n:
            raise DataError(f"`n_train` must be at most {n}, got {spec.n_train}")
        a["X_train"], a["y_train"] = a["X_train"][: spec.n_train], a["y_train"][: spec.n_train]
    check_fits(spec.name, a, regression=n_classes is None, dtype=dtype, device=device)
    x_tr, x_te = preprocess(spec.preprocess, a["X_train"], a["X_test"], scale=raw.scale)
    y_tr, y_te = a["y_train"], a["y_test"]
    rng = np.random.default_rng(spec.variant_seed)
    if spec.variant == "shuffled_labels":
        y_tr = rng.permutation(y_tr)
    elif spec.variant == "white_noise":
        x_tr = rng.standard_normal(x_tr.shape)
        x_te = rng.standard_normal(x_te.shape)

    def t(arr, dt):
        return torch.as_tensor(np.ascontiguousarray(arr), dtype=dt, device=device)

    ydt = dtype if n_classes is None else torch.int64
    return Dataset(t(x_tr, dtype), t(y_tr, ydt), t(x_te, dtype), t(y_te, ydt), n_classes,
                   dict(raw.sources))


def validate(raw: Raw) -> int | None:
    """Check the stored arrays; return the number of classes (None: float targets, regression).

    Integer (or bool) labels mean classification: shape (N,), values >= 0, classes = the largest
    label + 1 over train and test (at least what the format implies: MNIST 10, CIFAR-100 100).
    Float targets mean regression: (N,) or (N, d), the same d for train and test."""
    arr, where = raw.arrays, raw.where
    for k in ARRAY_KEYS:
        a = arr[k]
        if a.dtype.kind not in "biuf":
            raise DataError(f"{where[k]}: {k} has dtype {a.dtype}; expected real numbers")
        if a.ndim == 0 or len(a) == 0:
            raise DataError(f"{where[k]}: {k} is empty (shape {a.shape}); expected one row per "
                            f"example")
        if a.dtype.kind == "f":
            bad = ~np.isfinite(a)
            if bad.any():
                first = tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), a.shape))
                raise DataError(f"{where[k]}: {k} has {int(bad.sum())} NaN/inf value(s), the "
                                f"first at index {first}")
    for s in ("train", "test"):
        x, y = arr[f"X_{s}"], arr[f"y_{s}"]
        if len(x) != len(y):
            other = "" if where[f"y_{s}"] == where[f"X_{s}"] else f" ({where[f'y_{s}']})"
            raise DataError(f"{where[f'X_{s}']}: X_{s} has {len(x)} examples but y_{s}{other} "
                            f"has {len(y)}")
    x_tr, x_te, y_tr, y_te = (arr[k] for k in ("X_train", "X_test", "y_train", "y_test"))
    if x_tr.ndim < 2 or x_tr.shape[1:] != x_te.shape[1:]:
        raise DataError(f"{where['X_train']}: X_train {x_tr.shape} and X_test {x_te.shape} must be "
                        f"(N, *input_shape) with the same input shape")
    integral = [y.dtype.kind in "biu" for y in (y_tr, y_te)]
    if integral[0] != integral[1]:
        raise DataError(f"{where['y_train']}: y_train is {y_tr.dtype} but y_test is {y_te.dtype}; "
                        f"both must be integers (classification) or both floats (regression)")
    if not integral[0]:
        if y_tr.ndim > 2 or y_tr.shape[1:] != y_te.shape[1:]:
            raise DataError(f"{where['y_train']}: regression targets y_train {y_tr.shape} and "
                            f"y_test {y_te.shape} must be (N,) or (N, d) with the same d")
        return None
    for k, y in (("y_train", y_tr), ("y_test", y_te)):
        if y.ndim != 1:
            raise DataError(f"{where[k]}: integer {k} must be class labels of shape (N,), got "
                            f"{y.shape} (store regression targets as floats)")
        if y.min() < 0:
            raise DataError(f"{where[k]}: {k} holds the negative label {y.min()}; class labels "
                            f"are 0, 1, ..., C-1")
    return max(raw.min_classes, int(max(y_tr.max(), y_te.max())) + 1)


def preprocess(how: str, x_train: np.ndarray, x_test: np.ndarray, *,
               scale: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Float64 inputs, both sets transformed with statistics of the training set.

    ``none``; ``scale01``: (x - min) / (max - min), scalar min and max over X_train (8-bit data:
    x / 255; a constant training set: x - min); ``standardize``: (x - mean_j) / std_j per feature j,
    features constant over X_train become exactly 0 (an always-zero pixel stays 0);
    ``default``: the source's divisor ``scale`` (digits: 16), else x / 255 for uint8 data, else none.
    Nothing is modified in place (the arrays may be the caller's)."""
    eight_bit = x_train.dtype == np.uint8
    tr, te = np.asarray(x_train, np.float64), np.asarray(x_test, np.float64)
    if how == "default":
        divisor = scale if scale is not None else 255.0 if eight_bit else None
        return (tr, te) if divisor is None else (tr / divisor, te / divisor)
    if how == "scale01":
        if eight_bit:
            return tr / 255.0, te / 255.0
        lo, hi = tr.min(), tr.max()
        span = hi - lo if hi > lo else 1.0
        return (tr - lo) / span, (te - lo) / span
    if how == "standardize":
        mean, std = tr.mean(axis=0), tr.std(axis=0)
        varies = (tr.max(axis=0) != tr.min(axis=0)) & (std > 0)  # exact: no ulp-sized std
        return tuple(np.divide(x - mean, std, out=np.zeros_like(x), where=varies)
                     for x in (tr, te))
    return tr, te


def check_fits(name: str, arrays: dict, *, regression: bool, dtype: torch.dtype,
               device: torch.device) -> None:
    """Refuse data whose tensors would take more than MEMORY_FRACTION of ``device``'s available
    memory (the data lives there once, beside the model, the trajectory and the solver)."""
    item = torch.empty((), dtype=dtype).element_size()
    x_tr, x_te = arrays["X_train"], arrays["X_test"]
    n = len(x_tr) + len(x_te)
    need = n * math.prod(x_tr.shape[1:]) * item
    ys = arrays["y_train"], arrays["y_test"]
    need += sum(y.size for y in ys) * item if regression else n * 8
    have = available_bytes(device)
    if have is not None and need > MEMORY_FRACTION * have:
        dt = str(dtype).removeprefix("torch.")
        raise DataError(f"{name}: the data needs {_size(need)} on {device} as {dt} ({len(x_tr)} "
                        f"train + {len(x_te)} test examples of shape {tuple(x_tr.shape[1:])}), "
                        f"more than half of the {_size(have)} available; "
                        f"use a smaller `n_train`, float32 or a device with more memory")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
