"""Image formats as their authors distribute them: MNIST-style IDX files and CIFAR binary batches.

Both are plain big-endian arrays behind a fixed header, so they are read with ``numpy.frombuffer``;
nothing is unpickled (CIFAR's pickled "python version" is refused).
"""

from __future__ import annotations

import gzip
import math
import pathlib
import struct
import zlib

import numpy as np

from ..recipe import ARRAY_KEYS
from ._common import DataError, Raw, read_file

# IDX type codes (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT"); data is big-endian
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
IDX_STEMS = {"X_train": ("train-images", 3), "y_train": ("train-labels", 1),
             "X_test": ("t10k-images", 3), "y_test": ("t10k-labels", 1)}

CIFAR10_DIR, CIFAR100_DIR = "cifar-10-batches-bin", "cifar-100-binary"
CIFAR10_TRAIN = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR10_TEST, CIFAR100_TRAIN, CIFAR100_TEST = "test_batch.bin", "train.bin", "test.bin"
CIFAR_PIXELS = 3 * 32 * 32
CIFAR_PYTHON = ("cifar-10-batches-py", "cifar-100-python", "data_batch_1", "test_batch")


def _idx_names(stem: str, ndim: int) -> list[str]:
    """Uncompressed first (a folder that holds both after ``gunzip -k`` reads the plain file)."""
    plain = [f"{stem}-idx{ndim}-ubyte", f"{stem}.idx{ndim}-ubyte"]
    return plain + [p + ".gz" for p in plain]


def find_idx(folder: pathlib.Path) -> list[pathlib.Path] | None:
    """The four IDX files (``ARRAY_KEYS`` order) in ``folder``; None if it holds no IDX file."""
    found, missing = [], []
    for key in ARRAY_KEYS:
        names = _idx_names(*IDX_STEMS[key])
        hit = next((folder / n for n in names if (folder / n).is_file()), None)
        found.append(hit)
        if hit is None:
            missing.append(names[0] + "[.gz]")
    if all(p is None for p in found):
        return None
    if missing:
        raise DataError(f"{folder}: MNIST-style IDX folder lacks {', '.join(missing)} "
                        f"(needs train-images, train-labels, t10k-images, t10k-labels)")
    return found


def parse_idx(label: str, blob: bytes) -> np.ndarray:
    """One IDX array: bytes 0-1 zero, byte 2 the type code, byte 3 the number of dimensions, then
    one big-endian uint32 per dimension, then the data (big-endian, C order). Gzipped if the name
    ends in ``.gz``. The header's size must match the file's exactly."""
    if label.endswith(".gz"):
        try:
            blob = gzip.decompress(blob)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{label}: not a valid gzip file ({e})") from None
    if len(blob) < 4 or blob[0] != 0 or blob[1] != 0:
        raise DataError(f"{label}: not an IDX file (its first two bytes must be 0x00 0x00, got "
                        f"{blob[:2].hex(' ') or 'nothing'})")
    code, ndim = blob[2], blob[3]
    if code not in IDX_DTYPES:
        raise DataError(f"{label}: unknown IDX type code 0x{code:02X} (known: "
                        f"{', '.join(f'0x{c:02X}' for c in IDX_DTYPES)})")
    start = 4 + 4 * ndim
    if ndim == 0 or len(blob) < start:
        raise DataError(f"{label}: IDX header truncated or without dimensions (ndim {ndim}, "
                        f"{len(blob)} bytes)")
    dims = struct.unpack(f">{ndim}I", blob[4:start])
    dtype = np.dtype(IDX_DTYPES[code])
    want = math.prod(dims) * dtype.itemsize
    if len(blob) - start != want:
        raise DataError(f"{label}: IDX header says shape {dims} of {dtype.name} ({want} bytes of "
                        f"data), the file holds {len(blob) - start}")
    a = np.frombuffer(blob, dtype, count=math.prod(dims), offset=start)
    return a.astype(dtype.newbyteorder("="), copy=True).reshape(dims)  # native order, writable


def read_idx(files: dict[str, pathlib.Path]) -> Raw:
    """MNIST / Fashion-MNIST (/ EMNIST with the MNIST names): images N x H x W become
    N x 1 x H x W; at least 10 classes."""
    arrays, where, sources = {}, {}, {}
    for key, (label, path) in zip(ARRAY_KEYS, files.items()):
        blob, sources[label] = read_file(label, path)
        a = parse_idx(label, blob)
        if key.startswith("X") and a.ndim == 3:
            a = a[:, None]
        arrays[key], where[key] = a, label
    return Raw(arrays, where, sources, min_classes=10)


def refuse_cifar_python(folder: pathlib.Path) -> None:
    for name in CIFAR_PYTHON:
        if (folder / name).exists():
            raise DataError(f"{folder / name} is CIFAR's pickled 'python version'; tjac never "
                            f"unpickles data and reads only the binary version "
                            f"(cifar-10-binary.tar.gz / cifar-100-binary.tar.gz)")


def find_cifar(folder: pathlib.Path) -> tuple[int, list[pathlib.Path]] | None:
    """(classes, files with the test file last) of a CIFAR binary folder or its parent; None if
    ``folder`` is neither. CIFAR-10 needs all five ``data_batch_k.bin``: a partial download would
    otherwise train, without a word, on a fraction of the set (``n_train`` takes a subset)."""
    for sub in (CIFAR10_DIR, CIFAR100_DIR):
        if (folder / sub).is_dir():
            folder = folder / sub
            break
    layouts = ((10, CIFAR10_TRAIN + (CIFAR10_TEST,)), (100, (CIFAR100_TRAIN, CIFAR100_TEST)))
    for classes, names in layouts:
        present = [(folder / n).is_file() for n in names]
        if any(present):
            if not all(present):
                missing = [n for n, ok in zip(names, present) if not ok]
                raise DataError(f"{folder}: CIFAR-{classes} binary folder lacks "
                                f"{', '.join(missing)}")
            return classes, [folder / n for n in names]
    refuse_cifar_python(folder)
    return None


def parse_cifar(label: str, blob: bytes, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Records of label byte(s) then 3072 pixel bytes (1024 red, 1024 green, 1024 blue, each
    32 x 32 row-major): CIFAR-10 one label byte, CIFAR-100 a coarse then the fine label."""
    lead = 1 if classes == 10 else 2
    rec = lead + CIFAR_PIXELS
    if not blob or len(blob) % rec:
        raise DataError(f"{label}: {len(blob)} bytes is not a whole number of {rec}-byte "
                        f"CIFAR-{classes} records ({lead} label byte(s) + {CIFAR_PIXELS} pixels)")
    a = np.frombuffer(blob, np.uint8).reshape(-1, rec)
    y = a[:, lead - 1].astype(np.int64)
    for col, n, what in ((lead - 1, classes, "label"), (0, 20, "coarse label"))[:lead]:
        if a[:, col].max() >= n:
            raise DataError(f"{label}: {what} {a[:, col].max()} is out of range for "
                            f"CIFAR-{classes} (0..{n - 1}); a different or corrupt file?")
    return a[:, lead:].reshape(-1, 3, 32, 32).copy(), y


def read_cifar(classes: int, files: dict[str, pathlib.Path]) -> Raw:
    """CIFAR-10 (labels 0-9) or CIFAR-100 (fine labels 0-99); images N x 3 x 32 x 32 uint8."""
    xs, ys, sources = [], [], {}
    for label, path in files.items():
        blob, sources[label] = read_file(label, path)
        x, y = parse_cifar(label, blob, classes)
        xs.append(x)
        ys.append(y)
    labels = list(files)
    train = labels[0] if len(labels) == 2 else f"{labels[0]}..{pathlib.PurePath(labels[-2]).name}"
    arrays = {"X_train": np.concatenate(xs[:-1]), "y_train": np.concatenate(ys[:-1]),
              "X_test": xs[-1], "y_test": ys[-1]}
    where = {"X_train": train, "y_train": train, "X_test": labels[-1], "y_test": labels[-1]}
    return Raw(arrays, where, sources, min_classes=classes)
