"""What every reader shares: the error type, the raw-arrays bundle, hashing, and the pickle refusal."""

from __future__ import annotations

import hashlib
import pathlib
from dataclasses import dataclass

import numpy as np

from ..recipe import ARRAY_KEYS

PICKLE_SUFFIXES = (".pkl", ".pickle")


class DataError(ValueError):
    """Data that tjac will not train on: missing, malformed, non-finite, pickled or too large.

    Messages are one line and name the file (or ``in-memory arrays``) and the array."""


@dataclass
class Raw:
    """Arrays as a source stores them, before validation, ``n_train``, preprocessing and variants.

    ``where[key]`` names the file (or ``in-memory arrays``) an array came from, for messages;
    ``sources`` is the ``{label: sha256}`` of everything read; ``scale`` is the source's
    conventional divisor for ``preprocess="default"`` (digits: 16), ``None`` to let the dtype decide;
    ``min_classes`` is the number of classes the format implies (MNIST 10, CIFAR-100 100).
    """

    arrays: dict[str, np.ndarray]
    where: dict[str, str]
    sources: dict[str, str]
    scale: float | None = None
    min_classes: int = 0


def sha256_bytes(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def sha256_file(path: pathlib.Path, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file's bytes as stored (a ``.gz`` is hashed compressed), read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_arrays(arrays: dict[str, np.ndarray]) -> str:
    """The full SHA-256 whose prefix :func:`tjac.recipe.arrays_name` puts in ``"arrays:<prefix>"``
    (the same bytes in the same order: key, dtype, shape, then the C-ordered data)."""
    h = hashlib.sha256()
    for k in ARRAY_KEYS:
        a = arrays[k]
        h.update(f"{k}:{a.dtype.str}:{a.shape};".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def is_pickle(head: bytes) -> bool:
    """Pickle protocols 2-5 begin with the PROTO opcode 0x80 and the protocol number."""
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def refuse_pickle(label: str, head: bytes = b"") -> None:
    """Raise if the file is a pickle (by suffix or by its first two bytes). Unpickling runs code
    chosen by whoever wrote the file, so tjac reads arrays only from formats that cannot."""
    name = pathlib.PurePath(label).name
    if not (is_pickle(head) or name.lower().endswith(PICKLE_SUFFIXES)):
        return
    hint = ("; CIFAR's 'python version' is pickled: download the binary version "
            "(cifar-10-binary.tar.gz / cifar-100-binary.tar.gz)" if name.startswith(
                ("data_batch", "test_batch")) or name in ("train", "test", "meta") else
            "; save the arrays with numpy.savez (X_train, y_train, X_test, y_test)")
    raise DataError(f"{label} is a pickle; tjac never unpickles data (it can run arbitrary code)"
                    f"{hint}")


def read_file(label: str, path: pathlib.Path) -> tuple[bytes, str]:
    """The bytes of a file and their SHA-256, after refusing pickles and unreadable paths."""
    try:
        blob = path.read_bytes()
    except OSError as e:
        raise DataError(f"{label}: cannot read ({e.strerror or e})") from None
    refuse_pickle(label, blob[:2])
    return blob, sha256_bytes(blob)
