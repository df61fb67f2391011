"""The training Jacobian of a small MLP on MNIST (or Fashion-MNIST) read from its IDX files.

    python examples/mnist_idx.py [DIR]

DIR holds train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and
t10k-labels-idx1-ubyte (each may be gzipped, as distributed). Without DIR a tiny random IDX data
set (256 train / 64 test 28x28 images) is written to a temporary folder, so the script runs offline.
tjac reads the bytes itself (no torchvision, nothing unpickled); images are divided by 255.
"""
import gzip
import pathlib
import struct
import sys
import tempfile

import numpy as np

import tjac


def write_idx(path, array) -> None:
    """One IDX file: two zero bytes, type code 0x08 (uint8), the number of dimensions, one
    big-endian uint32 per dimension, then the bytes. Gzipped when ``path`` ends in ``.gz``."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    blob = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape) + array.tobytes()
    path = pathlib.Path(path)
    path.write_bytes(gzip.compress(blob) if path.suffix == ".gz" else blob)


def tiny_mnist(folder, n_train: int = 256, n_test: int = 64, seed: int = 0) -> pathlib.Path:
    """Random 28x28 uint8 images with labels 0-9 under the MNIST file names (gzipped)."""
    rng = np.random.default_rng(seed)
    folder = pathlib.Path(folder)
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    return folder


def main(folder) -> None:
    recipe = tjac.Recipe.paper(dataset=str(folder), width=8, epochs=1, batch_size=64, n_train=256)
    op = tjac.TrainingJacobian(recipe)              # trains once; the built-in MLP flattens images
    print("P =", op.shape[0])
    top = tjac.svd(op, 4, which="top")
    print("top sigma:", top.S.numpy().round(4))


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(sys.argv[1])
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(tiny_mnist(tmp))
