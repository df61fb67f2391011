"""Data readers against files written here in the upstream formats, validation, preprocessing,
variants, hashing, and the pickle refusal."""
import gzip
import importlib.util
import os
import pathlib
import pickle
import struct

import numpy as np
import pytest
import torch

import tjac
from tjac import data
from tjac.data import DataError
from tjac.recipe import DataSpec

CPU = torch.device("cpu")
ROOT = pathlib.Path(__file__).resolve().parents[1]


def load(name, dtype=torch.float64, **kw):
    return data.load(DataSpec(name=str(name), **kw), dtype=dtype, device=CPU)


def assert_equal(tensor, array, what=""):
    array = np.asarray(array)
    assert tuple(tensor.shape) == array.shape, f"{what}: shape {tuple(tensor.shape)} != {array.shape}"
    bad = np.flatnonzero(tensor.numpy().reshape(-1) != array.reshape(-1))
    assert bad.size == 0, (f"{what}: {bad.size} entries differ, first [{bad[0]}] "
                           f"{tensor.numpy().reshape(-1)[bad[0]]!r} vs {array.reshape(-1)[bad[0]]!r}")


# -- writers in the upstream byte formats (independent of tjac's readers) -----------------------
IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(">i2"): 0x0B,
             np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}


def write_idx(path, array):
    """IDX: 0x00 0x00, type code, ndim, big-endian uint32 dims, big-endian data."""
    array = np.ascontiguousarray(array)
    header = struct.pack(">BBBB", 0, 0, IDX_CODES[array.dtype], array.ndim)
    blob = header + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    pathlib.Path(path).write_bytes(gzip.compress(blob) if str(path).endswith(".gz") else blob)


def mnist_like(folder, *, gz, dot=False, n_train=20, n_test=8, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {"X_train": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
              "y_train": rng.integers(0, 10, n_train, dtype=np.uint8),
              "X_test": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
              "y_test": rng.integers(0, 10, n_test, dtype=np.uint8)}
    sep, ext = (".", ".gz" if gz else "") if dot else ("-", ".gz" if gz else "")
    names = {"X_train": f"train-images{sep}idx3-ubyte", "y_train": f"train-labels{sep}idx1-ubyte",
             "X_test": f"t10k-images{sep}idx3-ubyte", "y_test": f"t10k-labels{sep}idx1-ubyte"}
    folder.mkdir(parents=True, exist_ok=True)
    for k, a in arrays.items():
        write_idx(folder / (names[k] + ext), a)
    return arrays, {k: str(folder / (n + ext)) for k, n in names.items()}


def cifar_records(rng, n, label_bytes, classes):
    """CIFAR binary: per record the label byte(s), then 1024 R, 1024 G, 1024 B bytes."""
    labels = np.stack([rng.integers(0, 20, n), rng.integers(0, classes, n)], 1)[:, -label_bytes:]
    pixels = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    blob = b"".join(bytes(labels[i].astype(np.uint8)) + pixels[i].tobytes() for i in range(n))
    return blob, labels[:, -1], pixels


# -- sklearn's bundled sets -------------------------------------------------------------------
def test_digits_bitwise_as_direct_sklearn():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(digits.data / 16.0, digits.target, test_size=197,
                                              random_state=0)
    d = data.load(DataSpec(), dtype=torch.float64, device=CPU)
    for t, a, what in ((d.x_train, x_tr, "x_train"), (d.x_test, x_te, "x_test"),
                       (d.y_train, y_tr, "y_train"), (d.y_test, y_te, "y_test")):
        assert_equal(t, a, what)
    assert d.y_train.dtype == torch.int64 and d.n_classes == 10 and d.task == "classification"
    assert d.n_features == 64 and d.input_shape == (64,)
    small = data.load(DataSpec(n_train=100), dtype=torch.float32, device=CPU)
    assert_equal(small.x_train, x_tr[:100].astype(np.float32), "float32 n_train")


@pytest.mark.parametrize("name", ["iris", "wine", "breast_cancer"])
def test_sklearn_sets(name):
    from sklearn import datasets
    from sklearn.model_selection import train_test_split

    bunch = getattr(datasets, f"load_{name}")()
    n = len(bunch.data)
    test_size = 197 if 197 < n else round(n / 5)  # the rule in the docstring
    x_tr, x_te, y_tr, y_te = train_test_split(bunch.data, bunch.target, test_size=test_size,
                                              random_state=0)
    d = load(name)
    assert_equal(d.x_train, x_tr, "x_train")  # preprocess "default" is none for these sets
    assert_equal(d.y_test, y_te, "y_test")
    assert d.n_classes == len(np.unique(bunch.target))
    assert data.digest(DataSpec(name=name)) == d.sources and list(d.sources) == [f"sklearn:{name}"]


# -- MNIST-style IDX ----------------------------------------------------------------------------
@pytest.mark.parametrize("gz,dot", [(False, False), (True, False), (True, True)])
def test_idx_reads_exactly_what_was_written(tmp_path, gz, dot):
    arrays, paths = mnist_like(tmp_path / "mnist", gz=gz, dot=dot)
    d = load(tmp_path / "mnist")
    assert d.input_shape == (1, 28, 28) and d.n_features == 784 and d.n_classes == 10
    assert_equal(d.x_train, arrays["X_train"][:, None] / 255.0, "x_train / 255")
    assert_equal(d.x_test, arrays["X_test"][:, None] / 255.0, "x_test / 255")
    assert_equal(d.y_train, arrays["y_train"].astype(np.int64), "y_train")
    assert_equal(d.y_test, arrays["y_test"].astype(np.int64), "y_test")
    assert sorted(d.sources) == sorted(paths.values())
    raw = load(tmp_path / "mnist", preprocess="none")
    assert_equal(raw.x_train, arrays["X_train"][:, None].astype(np.float64), "none")


@pytest.mark.parametrize("dtype", [np.int8, ">i2", ">i4", ">f4", ">f8"])
def test_idx_every_type_code(tmp_path, dtype):
    from tjac.data import images

    a = (np.arange(-30, 30).reshape(3, 4, 5) * 3).astype(dtype)
    write_idx(tmp_path / "a-idx3-ubyte", a)
    got = images.parse_idx("a", (tmp_path / "a-idx3-ubyte").read_bytes())
    assert got.dtype.isnative and np.array_equal(got, a)


def test_idx_size_mismatch_and_missing_file(tmp_path):
    _, paths = mnist_like(tmp_path, gz=False)
    blob = pathlib.Path(paths["X_test"]).read_bytes()
    pathlib.Path(paths["X_test"]).write_bytes(blob[:-1])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte: IDX header says shape"):
        load(tmp_path)
    os.remove(paths["y_train"])
    with pytest.raises(DataError, match="lacks train-labels-idx1-ubyte"):
        load(tmp_path)


def test_example_writes_idx_tjac_reads(tmp_path):
    spec = importlib.util.spec_from_file_location("mnist_idx", ROOT / "examples" / "mnist_idx.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.tiny_mnist(tmp_path, n_train=32, n_test=16)
    d = load(tmp_path)
    assert d.x_train.shape == (32, 1, 28, 28) and d.x_test.shape == (16, 1, 28, 28)
    assert 0 <= float(d.x_train.min()) and float(d.x_train.max()) <= 1 and d.n_classes == 10


# -- CIFAR binary -------------------------------------------------------------------------------
def test_cifar10_binary_from_parent(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    xs, ys = [], []
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        blob, y, x = cifar_records(rng, 3, 1, 10)
        (folder / name).write_bytes(blob)
        xs.append(x)
        ys.append(y)
    d = load(tmp_path)  # the parent of cifar-10-batches-bin
    assert d.input_shape == (3, 32, 32) and d.n_classes == 10
    assert_equal(d.x_train, np.concatenate(xs[:5]) / 255.0, "x_train")
    assert_equal(d.y_train, np.concatenate(ys[:5]), "y_train")
    assert_equal(d.x_test, xs[5] / 255.0, "x_test")
    assert_equal(d.y_test, ys[5], "y_test")
    assert len(d.sources) == 6 and data.digest(DataSpec(name=str(tmp_path))) == d.sources
    os.remove(folder / "data_batch_3.bin")
    with pytest.raises(DataError, match="lacks data_batch_3.bin"):
        load(folder)


def test_cifar100_binary_fine_labels(tmp_path):
    rng = np.random.default_rng(2)
    made = {}
    for name, n in (("train.bin", 5), ("test.bin", 4)):
        blob, fine, x = cifar_records(rng, n, 2, 100)
        (tmp_path / name).write_bytes(blob)
        made[name] = fine, x
    d = load(tmp_path)
    assert d.n_classes == 100
    assert_equal(d.y_train, made["train.bin"][0], "fine labels")
    assert_equal(d.x_test, made["test.bin"][1] / 255.0, "x_test")
    (tmp_path / "test.bin").write_bytes(blob[:-1])
    with pytest.raises(DataError, match="test.bin: .* not a whole number of 3074-byte"):
        load(tmp_path)


def test_cifar_python_version_refused(tmp_path):
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps({"data": [1, 2]}, protocol=2))
    with pytest.raises(DataError, match="binary version"):
        load(tmp_path)
    with pytest.raises(DataError, match="is a pickle; tjac never unpickles"):
        load(tmp_path / "data_batch_1")


# -- numpy files ----------------------------------------------------------------------------
class _Tripwire:
    """Unpickling this touches a file: the test sees whether anything unpickled it."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.path),)


@pytest.mark.parametrize("name", ["data.npz", "data.pkl", "data.bin"])
def test_pickle_refused_unopened(tmp_path, name):
    marker = tmp_path / "unpickled"
    (tmp_path / name).write_bytes(pickle.dumps({"X_train": _Tripwire(str(marker))}, protocol=4))
    with pytest.raises(DataError, match="is a pickle; tjac never unpickles data"):
        load(tmp_path / name)
    assert not marker.exists()


def test_object_array_in_npz_refused(tmp_path):
    x = np.empty(3, dtype=object)
    np.savez(tmp_path / "d.npz", X_train=x, y_train=np.arange(3), X_test=np.zeros((1, 2)),
             y_test=np.zeros(1, int))
    with pytest.raises(DataError, match=r"d\.npz: array X_train is an object array"):
        load(tmp_path / "d.npz")


def test_npy_folder_and_nchw(tmp_path):
    rng = np.random.default_rng(3)
    arrays = {"X_train": rng.standard_normal((6, 2, 3, 4)), "y_train": np.array([0, 4, 1, 1, 2, 0]),
              "X_test": rng.standard_normal((2, 2, 3, 4)), "y_test": np.array([3, 0])}
    for k, a in arrays.items():
        np.save(tmp_path / f"{k}.npy", a)
    d = load(tmp_path)
    assert d.input_shape == (2, 3, 4) and d.n_features == 24
    assert d.n_classes == 5  # the largest label + 1 over train and test
    for k in arrays:
        assert_equal(getattr(d, k.lower()), arrays[k], k)
    assert set(d.sources) == {os.path.join(str(tmp_path), f"{k}.npy") for k in arrays}


def _npz(path, **over):
    rng = np.random.default_rng(4)
    arrays = {"X_train": rng.standard_normal((8, 3)), "y_train": rng.integers(0, 3, 8),
              "X_test": rng.standard_normal((4, 3)), "y_test": rng.integers(0, 3, 4)}
    arrays.update(over)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return arrays


def test_nan_names_file_and_key(tmp_path):
    x = np.ones((4, 3))
    x[2, 1] = np.nan
    _npz(tmp_path / "bad.npz", X_test=x)
    with pytest.raises(DataError, match=r"bad\.npz: X_test has 1 NaN/inf value\(s\), the first "
                                        r"at index \(2, 1\)"):
        load(tmp_path / "bad.npz")
    _npz(tmp_path / "inf.npz", y_train=np.full(8, np.inf))
    with pytest.raises(DataError, match=r"inf\.npz: y_train has 8 NaN/inf"):
        load(tmp_path / "inf.npz")


def test_missing_keys_lists_expected(tmp_path):
    _npz(tmp_path / "part.npz", X_test=None, y_test=None)
    with pytest.raises(DataError) as e:
        load(tmp_path / "part.npz")
    msg = str(e.value)
    assert "part.npz" in msg and "missing X_test, y_test" in msg and "\n" not in msg
    assert "X_train, y_train, X_test, y_test" in msg


def test_bad_shapes_labels_and_names(tmp_path):
    _npz(tmp_path / "len.npz", y_train=np.zeros(7, int))
    with pytest.raises(DataError, match="X_train has 8 examples but y_train"):
        load(tmp_path / "len.npz")
    _npz(tmp_path / "neg.npz", y_test=np.array([0, -1, 2, 1]))
    with pytest.raises(DataError, match="negative label -1"):
        load(tmp_path / "neg.npz")
    _npz(tmp_path / "mix.npz", y_test=np.zeros(4))
    with pytest.raises(DataError, match="both must be integers"):
        load(tmp_path / "mix.npz")
    with pytest.raises(DataError, match="nowhere.npz"):
        load(tmp_path / "nowhere.npz")
    with pytest.raises(DataError, match="digits, iris, wine, breast_cancer"):
        load("mnist-please")
    _npz(tmp_path / "ok.npz")
    with pytest.raises(ValueError, match="`n_train` must be at most 8"):
        load(tmp_path / "ok.npz", n_train=9)


def test_regression_targets(tmp_path):
    arrays = _npz(tmp_path / "reg.npz", y_train=np.arange(16.0).reshape(8, 2),
                  y_test=-np.arange(8.0).reshape(4, 2))
    d = load(tmp_path / "reg.npz", dtype=torch.float32)
    assert d.task == "regression" and d.n_classes is None and d.y_train.dtype == torch.float32
    assert_equal(d.y_train, arrays["y_train"].astype(np.float32), "y_train")
    assert_equal(d.x_test, arrays["X_test"].astype(np.float32), "x_test (default: none)")


def test_preprocess_options(tmp_path):
    rng = np.random.default_rng(5)
    x_tr = rng.uniform(-3, 7, (10, 4))
    x_tr[:, 2] = 0.0            # an always-zero feature
    x_tr[:, 3] = 0.1            # a constant whose float mean is not exactly 0.1
    x_te = rng.uniform(-3, 7, (5, 4))
    _npz(tmp_path / "p.npz", X_train=x_tr, X_test=x_te, y_train=np.zeros(10, int),
         y_test=np.zeros(5, int))
    s = load(tmp_path / "p.npz", preprocess="standardize")
    assert (s.x_train[:, 2:] == 0).all() and (s.x_test[:, 2:] == 0).all()
    assert torch.allclose(s.x_train[:, :2].mean(0), torch.zeros(2, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(s.x_train[:, :2].std(0, unbiased=False),
                          torch.ones(2, dtype=torch.float64))
    assert_equal(s.x_test[:, :2], (x_te[:, :2] - x_tr[:, :2].mean(0)) / x_tr[:, :2].std(0), "test")
    u = load(tmp_path / "p.npz", preprocess="scale01")
    assert float(u.x_train.min()) == 0.0 and float(u.x_train.max()) == 1.0
    assert_equal(u.x_test, (x_te - x_tr.min()) / (x_tr.max() - x_tr.min()), "test, train range")
    eight = rng.integers(3, 200, (6, 5), dtype=np.uint8)
    _npz(tmp_path / "u8.npz", X_train=eight, X_test=eight[:4], y_train=np.zeros(6, int),
         y_test=np.zeros(4, int))
    assert_equal(load(tmp_path / "u8.npz", preprocess="scale01").x_train, eight / 255.0, "8-bit")


def test_variants_after_preprocessing(tmp_path):
    arrays = _npz(tmp_path / "v.npz")
    d = load(tmp_path / "v.npz", variant="shuffled_labels", variant_seed=7)
    assert_equal(d.y_train, np.random.default_rng(7).permutation(arrays["y_train"]), "labels")
    w = load(tmp_path / "v.npz", variant="white_noise", variant_seed=7, n_train=5)
    rng = np.random.default_rng(7)
    assert_equal(w.x_train, rng.standard_normal((5, 3)), "noise train")
    assert_equal(w.x_test, rng.standard_normal((4, 3)), "noise test")


# -- in-memory arrays, hashing, memory ------------------------------------------------------------
def test_in_memory_arrays_via_recipe():
    rng = np.random.default_rng(6)
    arrays = (rng.standard_normal((12, 1, 4, 4)), rng.integers(0, 4, 12),
              rng.standard_normal((5, 1, 4, 4)), rng.integers(0, 4, 5))
    recipe = tjac.Recipe.paper(dataset=arrays, preprocess="none")
    d = data.load(recipe.data, dtype=torch.float64, device=CPU)
    for t, a in zip((d.x_train, d.y_train, d.x_test, d.y_test), arrays):
        assert_equal(t, a)
    assert list(d.sources) == ["arrays"]
    assert recipe.data.name == "arrays:" + d.sources["arrays"][:16]
    assert data.digest(recipe.data) == d.sources
    arrays[0][0, 0, 0, 0] += 1.0  # changed in place after the recipe was made
    with pytest.raises(DataError, match="does not match the recipe's name"):
        data.load(recipe.data, dtype=torch.float64, device=CPU)


def test_digest_tracks_file_bytes(tmp_path):
    _npz(tmp_path / "h.npz")
    spec = DataSpec(name=str(tmp_path / "h.npz"))
    before = data.digest(spec)
    assert before == data.load(spec, dtype=torch.float64, device=CPU).sources
    assert list(before) == [str(tmp_path / "h.npz")]
    _npz(tmp_path / "h.npz", X_test=np.zeros((4, 3)))
    after = data.digest(spec)
    assert after != before and after == data.load(spec, dtype=torch.float64, device=CPU).sources
    _, paths = mnist_like(tmp_path / "m", gz=True)
    spec = DataSpec(name=str(tmp_path / "m"))
    before = data.digest(spec)
    blob = bytearray(gzip.decompress(pathlib.Path(paths["y_test"]).read_bytes()))
    blob[-1] = (blob[-1] + 1) % 10
    pathlib.Path(paths["y_test"]).write_bytes(gzip.compress(bytes(blob)))
    after = data.digest(spec)
    assert {k for k in before if before[k] != after[k]} == {paths["y_test"]}


def test_refuses_data_beyond_half_the_memory(monkeypatch):
    need = (1797 * 64) * 8 + 1797 * 8  # digits in float64, int64 labels
    monkeypatch.setattr(data.prepare, "available_bytes", lambda device: 2 * need - 2)
    msg = (rf"needs {need / 1024:.1f} KiB on cpu as float64 .*half of the "
           rf"{(2 * need - 2) / 2**20:.1f} MiB")
    with pytest.raises(DataError, match=msg):
        data.load(DataSpec(), dtype=torch.float64, device=CPU)
    monkeypatch.setattr(data.prepare, "available_bytes", lambda device: 2 * need)
    data.load(DataSpec(), dtype=torch.float64, device=CPU)
    assert data.available_bytes(CPU) is None or data.available_bytes(CPU) > 0


def test_batch_order():
    order = data.BatchOrder(10, 3, "none", 0, CPU)
    assert order.per_epoch == 3 and order.indices(4) == slice(3, 6)
    seeded = data.BatchOrder(10, 3, "seeded", 5, CPU)
    perm = np.random.default_rng(5 + 1).permutation(10)
    assert np.array_equal(seeded.indices(4).numpy(), perm[3:6])
    with pytest.raises(ValueError, match="at most the number of training examples"):
        data.BatchOrder(2, 3, "none", 0, CPU)
