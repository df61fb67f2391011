"""Where the arrays come from: sklearn's bundled sets, in-memory arrays, ``.npz`` / ``.npy`` files,
MNIST-style IDX folders and CIFAR binary folders.

:func:`locate` decides from ``DataSpec.name`` which reader applies and which files it reads;
:func:`read` returns the arrays as stored (:class:`Raw`), hashing the bytes it parsed;
:func:`digest` hashes the same files without parsing them. Nothing is unpickled: ``np.load`` runs
with ``allow_pickle=False`` and files that are pickles are refused by name and by content.
"""

from __future__ import annotations

import functools
import io
import os
import pathlib
import zipfile
from dataclasses import dataclass

import numpy as np

from ..recipe import ARRAY_KEYS, DATASETS, data_arrays
from . import images
from ._common import DataError, Raw, read_file, refuse_pickle, sha256_arrays, sha256_file

IN_MEMORY = "in-memory arrays"
LAYOUTS = ("an .npz with X_train, y_train, X_test, y_test; a folder of those four .npy files; "
           "a folder of MNIST-style IDX files (train-images-idx3-ubyte[.gz], ...); or a CIFAR-10/100 "
           "binary folder (data_batch_1.bin.., test_batch.bin / train.bin, test.bin) or its parent")


@dataclass(frozen=True)
class Located:
    """``kind``: sklearn | arrays | npz | npy | idx | cifar10 | cifar100; ``files``: label -> path
    in reading order (the label is the path as the recipe gives it, joined with the file name)."""

    kind: str
    files: dict


def locate(spec) -> Located:
    try:
        return _locate(spec)
    except OSError as e:  # permissions, a vanished file, ...
        raise DataError(f"dataset {spec.name!r}: {e.strerror or e}") from None


def _locate(spec) -> Located:
    name = spec.name
    if name in DATASETS:
        return Located("sklearn", {})
    if name.startswith("arrays:"):
        return Located("arrays", {})
    path = pathlib.Path(name).expanduser()
    if not path.exists():
        raise DataError(f"dataset {name!r} is neither a known set ({', '.join(DATASETS)}) nor an "
                        f"existing path")
    if path.is_file():
        with open(path, "rb") as f:
            refuse_pickle(name, f.read(2))
        if path.suffix.lower() == ".npz":
            return Located("npz", {name: path})
        hint = {".npy": " (one .npy holds one array: put X_train.npy, y_train.npy, X_test.npy, "
                        "y_test.npy in a folder)",
                ".gz": " (extract an archive first; gzipped IDX files go in a folder)",
                ".tar": " (extract the archive first)", ".zip": " (extract the archive first)",
                }.get(path.suffix.lower(), "")
        raise DataError(f"{name}: unsupported data file{hint}; tjac reads {LAYOUTS}")

    def labelled(paths):
        return {os.path.join(name, str(p.relative_to(path))): p for p in paths}

    npy = [path / f"{k}.npy" for k in ARRAY_KEYS]
    if any(p.is_file() for p in npy):
        missing = [p.name for p in npy if not p.is_file()]
        if missing:
            raise DataError(f"{name}: .npy folder lacks {', '.join(missing)} (needs "
                            f"{', '.join(k + '.npy' for k in ARRAY_KEYS)})")
        return Located("npy", labelled(npy))
    idx = images.find_idx(path)
    if idx is not None:
        return Located("idx", labelled(idx))
    cifar = images.find_cifar(path)
    if cifar is not None:
        return Located(f"cifar{cifar[0]}", labelled(cifar[1]))
    held = sorted(p.name for p in path.iterdir())
    shown = ", ".join(held[:8]) + (f", ... ({len(held)} entries)" if len(held) > 8 else "")
    raise DataError(f"{name}: folder matches no layout tjac reads ({LAYOUTS}); it holds "
                    f"{shown or 'nothing'}")


def read(spec) -> Raw:
    """The arrays ``spec`` names, as stored, with the SHA-256 of every file parsed."""
    loc = locate(spec)
    if loc.kind == "sklearn":
        return _read_sklearn(spec)
    if loc.kind == "arrays":
        arrays, sha = _live(spec)
        return Raw(arrays, dict.fromkeys(ARRAY_KEYS, IN_MEMORY), {"arrays": sha})
    if loc.kind == "npz":
        return _read_npz(loc.files)
    if loc.kind == "npy":
        return _read_npy(loc.files)
    if loc.kind == "idx":
        return images.read_idx(loc.files)
    return images.read_cifar(int(loc.kind[5:]), loc.files)


def digest(spec) -> dict:
    """``{label: sha256}`` of the data ``spec`` names, equal to ``load(spec, ...).sources``, without
    parsing files or building tensors (a resume refuses data that changed since the run began)."""
    loc = locate(spec)
    if loc.kind == "sklearn":
        return {f"sklearn:{spec.name}": _sklearn_set(spec.name)[2]}
    if loc.kind == "arrays":
        return {"arrays": _live(spec)[1]}
    return {label: sha256_file(path) for label, path in loc.files.items()}


# -- sklearn's bundled sets -------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _sklearn_set(name: str) -> tuple[np.ndarray, np.ndarray, str]:
    """(X, y, sha256) of ``sklearn.datasets.load_<name>()``, read once per process (read-only)."""
    from sklearn import datasets

    bunch = getattr(datasets, f"load_{name}")()
    x, y = np.asarray(bunch.data), np.asarray(bunch.target)
    x.flags.writeable = y.flags.writeable = False
    sha = sha256_arrays({"X_train": x, "y_train": y, "X_test": x[:0], "y_test": y[:0]})
    return x, y, sha


def _read_sklearn(spec) -> Raw:
    """``train_test_split(X, y, test_size, random_state=split_seed)``. ``test_size`` is the recipe's
    when it is smaller than the set (digits: 197 of 1797, breast_cancer: 197 of 569), else 20% of
    it, rounded (iris: 30 of 150, wine: 36 of 178). Digits keeps the divisor 16 for ``default``."""
    from sklearn.model_selection import train_test_split

    x, y, sha = _sklearn_set(spec.name)
    test_size = spec.test_size if spec.test_size < len(x) else max(1, round(0.2 * len(x)))
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_size,
                                              random_state=spec.split_seed)
    label = f"sklearn:{spec.name}"
    arrays = {"X_train": x_tr, "y_train": y_tr, "X_test": x_te, "y_test": y_te}
    return Raw(arrays, dict.fromkeys(ARRAY_KEYS, label), {label: sha},
               scale=16.0 if spec.name == "digits" else None)


# -- arrays held in memory --------------------------------------------------------------------
def _live(spec) -> tuple[dict, str]:
    """The recipe's in-memory arrays and their SHA-256, which must still match the recipe's name
    (arrays changed in place after the recipe was made would silently change its meaning)."""
    try:
        arrays = data_arrays(spec.live)
    except (TypeError, ValueError) as e:
        raise DataError(f"{IN_MEMORY}: {e}") from None
    sha = sha256_arrays(arrays)
    prefix = spec.name.removeprefix("arrays:")
    if not prefix or not sha.startswith(prefix):
        raise DataError(f"{IN_MEMORY}: their hash {sha[:16]} does not match the recipe's name "
                        f"{spec.name!r}; were they changed after the recipe was made?")
    return arrays, sha


# -- numpy files --------------------------------------------------------------------------------
def _npload(label: str, key: str | None, load):
    """``load()`` (an ``np.load`` or an npz member read), its failures as one-line DataErrors."""
    what = f"array {key}" if key else "data"
    try:
        return load()
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "pickle" in msg.lower() or "object arrays" in msg.lower():
            raise DataError(f"{label}: {what} is an object array (pickled); tjac never unpickles "
                            f"data: store numeric arrays") from None
        raise DataError(f"{label}: cannot read {what} ({msg})") from None


def _read_npz(files: dict) -> Raw:
    """Keys ``X_train, y_train, X_test, y_test`` (Keras' lower-case ``x_train``/``x_test`` are
    accepted too); other keys are ignored."""
    (label, path), = files.items()
    blob, sha = read_file(label, path)
    z = _npload(label, None, lambda: np.load(io.BytesIO(blob), allow_pickle=False))
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise DataError(f"{label}: holds a single array, not an .npz archive with "
                        f"{', '.join(ARRAY_KEYS)}")
    with z:
        names = {k: k if k in z.files else k[0].lower() + k[1:] for k in ARRAY_KEYS}
        missing = [k for k, n in names.items() if n not in z.files]
        if missing:
            raise DataError(f"{label}: missing {', '.join(missing)}; an .npz must hold the arrays "
                            f"{', '.join(ARRAY_KEYS)} (it holds {', '.join(z.files) or 'none'})")
        arrays = {k: np.asarray(_npload(label, k, lambda n=n: z[n])) for k, n in names.items()}
    return Raw(arrays, dict.fromkeys(ARRAY_KEYS, label), {label: sha})


def _read_npy(files: dict) -> Raw:
    arrays, where, sources = {}, {}, {}
    for key, (label, path) in zip(ARRAY_KEYS, files.items()):
        blob, sources[label] = read_file(label, path)
        if blob[:6] != b"\x93NUMPY":
            raise DataError(f"{label}: not an .npy file (no NPY magic)")
        arrays[key] = np.asarray(_npload(
            label, key, lambda b=blob: np.load(io.BytesIO(b), allow_pickle=False)))
        where[key] = label
    return Raw(arrays, where, sources)
