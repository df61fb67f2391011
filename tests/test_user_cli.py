"""The user-facing path end to end: CLI flags for a user's model/data/loss/optimizer, bad input
(one line, exit 2, nothing written), stores written by tjac 0.1.0 still resume, and a resume on
changed data is refused."""
import json
import pathlib
import pickle
import shutil

import numpy as np
import pytest
import zarr

import tjac
from tjac import runner
from tjac.cli import main
from tjac.query import open as open_store

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "store-v0.1.0.zarr"
SMALL = ["--epochs", "1", "--batch-size", "32", "--k-top", "2", "--k-bottom", "0", "-q",
         "--png", "none"]


def _npz(path, n=96, labels=None, nan=False, drop=None, bump=False):
    rng = np.random.default_rng(0)
    arrays = {"X_train": rng.standard_normal((n, 64)), "y_train": rng.integers(0, 10, n),
              "X_test": rng.standard_normal((32, 64)), "y_test": rng.integers(0, 10, 32)}
    if labels is not None:
        arrays["y_train"][:len(labels)] = labels
    if nan:
        arrays["X_test"][3, 5] = np.nan
    if bump:
        arrays["X_train"][0, 0] += 1.0
    if drop:
        arrays.pop(drop)
    np.savez(path, **arrays)
    return str(path)


def _toml(path, text):
    path.write_text(text)
    return str(path)


def _pickle(path):
    path.write_bytes(pickle.dumps({"X_train": [1, 2]}))
    return str(path)


BAD = [
    (lambda d: ["--model", "nosuch_module_xyz:f"], "cannot import module 'nosuch_module_xyz'"),
    (lambda d: ["--model", "usermodels:nope"], "has no attribute 'nope'"),
    (lambda d: ["--model", "usermodels:not_a_module"], "not a torch.nn.Module"),
    (lambda d: ["--model", "usermodels:quadratic"], "needs outputs of shape (batch, classes)"),
    (lambda d: ["--model", "usermodels:wrong_outputs"], "labels must lie in [0, 3)"),
    (lambda d: ["--model", "usermodels:frozen"], "no trainable parameters"),
    (lambda d: ["--model", "usermodels:plain_mlp", "--model-kwargs", "{width: 3}"],
     "--model-kwargs must be a JSON object"),
    (lambda d: ["--model", "usermodels:plain_mlp", "--width", "3"], "describe the built-in"),
    (lambda d: ["--param-filter", "conv.*"], "matches no parameter"),
    (lambda d: ["--dataset", _npz(d / "nan.npz", nan=True)], "X_test"),
    (lambda d: ["--dataset", _npz(d / "miss.npz", drop="y_test")], "y_test"),
    (lambda d: ["--dataset", _npz(d / "lab.npz", labels=[12]), "--model", "usermodels:plain_mlp"],
     "labels must lie in [0, 10)"),
    (lambda d: ["--dataset", _pickle(d / "data.pkl")], "pickle"),
    (lambda d: ["--dataset", str(d / "missing.npz")], "missing.npz"),
    (lambda d: ["--loss", "usermodels:nope"], "has no attribute 'nope'"),
    (lambda d: ["--optimizer", "usermodels:nope"], "has no attribute 'nope'"),
    (lambda d: ["--optimizer", "usermodels:inplace_momentum"], "modifies its state or params in place"),
    (lambda d: ["--loss", "usermodels:one_hot_mse"], "cannot be differentiated twice"),
    (lambda d: ["--model", "usermodels:plain_mlp", "--dropout", "0.1"], "unrecognized arguments"),
    (lambda d: ["--optimizer", "usermodels:momentum_sign", "--lr", "0.5"],
     "'lr' applies to the built-in optimizers"),
    (lambda d: ["--model", "usermodels:sequential_mlp", "--model-kwargs", '{"widht": 4}'],
     "takes no argument 'widht'"),
    (lambda d: ["--optimizer", "usermodels:momentum_sign", "--optimizer-kwargs", '{"rate": 1}'],
     "takes no argument 'rate'"),
    (lambda d: ["--config", _toml(d / "c.toml", '[optim]\nname = "custom"\n'
                                  'factory = "usermodels:momentum_sign"\nlr = 0.5\n')],
     "[optim] lr applies to the built-in optimizers"),
]


@pytest.mark.parametrize("args, msg", BAD, ids=[m for _, m in BAD])
def test_bad_user_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, args, msg):
    store = tmp_path / "s.zarr"
    code = main(["run", *args(tmp_path), "--store", str(store), *SMALL])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and msg in err, err
    assert "Traceback" not in err and not store.exists()


def test_user_model_and_data_through_the_cli(tmp_path, capsys):
    data = _npz(tmp_path / "d.npz")
    store = str(tmp_path / "s.zarr")
    args = ["run", "--model", "usermodels:bn_cnn", "--model-kwargs", '{"channels": 2}',
            "--dataset", data, "--optimizer", "usermodels:momentum_sign", "--optimizer-kwargs",
            '{"lr": 0.01}', "--clip-norm", "1.0", "--store", store, *SMALL]
    assert main(args) == 0, capsys.readouterr().err
    res = open_store(store)
    run = res.run(res.runs()[0])
    r = run.recipe
    assert r.model.factory == "usermodels:bn_cnn" and r.model.kwargs == {"channels": 2}
    assert r.optim.name == "custom" and r.optim.clip_norm == 1.0 and r.data.name == data
    prov = run.provenance
    assert prov["data"] == tjac.data.digest(r.data) and prov["model"]["class"].endswith("BNConvNet")
    assert run.top(2).converged.all()
    assert main(["info", store]) == 0
    assert "usermodels:bn_cnn" in capsys.readouterr().out


def test_own_model_example_runs_from_the_command_line(tmp_path, capsys, monkeypatch):
    """examples/own_model.py's docstring: `tjac run --model own_model:small_cnn` in that folder, on
    the default digits (64-pixel rows, reshaped by the forward)."""
    monkeypatch.syspath_prepend(str(pathlib.Path(__file__).parents[1] / "examples"))
    store = str(tmp_path / "s.zarr")
    args = ["run", "--model", "own_model:small_cnn", "--model-kwargs", '{"channels": 2}',
            "--n-train", "64", "--store", store, *SMALL]
    assert main(args) == 0, capsys.readouterr().err
    res = open_store(store)
    run = res.run(res.runs()[0])
    assert run.recipe.model.factory == "own_model:small_cnn" and run.top(2).converged.all()


def test_store_written_by_0_1_0_resumes_to_the_same_sigma(tmp_path, capsys):
    store = tmp_path / "old.zarr"
    shutil.copytree(FIXTURE, store)
    expected = json.loads((FIXTURE.parent / "store-v0.1.0.expected.json").read_text())
    stored = open_store(str(store)).run(expected["recipe_hash"])
    assert stored.status != "complete"
    # adding recipe fields did not change the hash of a recipe written before them
    assert stored.recipe.hash() == expected["recipe_hash"]
    r = tjac.Recipe.paper(width=4, epochs=2, n_train=128, batch_size=32)
    assert r.hash() == expected["recipe_hash"]
    # The stored theta0 and thetaT are the init's and the training's bits on the CPU that wrote
    # the fixture; another CPU's kernels (AVX-512 against AVX2: theta0 differed in one ulp, thetaT
    # in more) give other bits, and the resume is then refused, as it must be. What this test is
    # about is the 0.1.0 layout, so on such a CPU the copy's theta arrays are re-stamped with this
    # machine's bits (the layout, the attributes and the stored Jacobian columns stay the
    # fixture's: those columns differ from this CPU's by round-off only).
    op = tjac.TrainingJacobian(tjac.Problem(r), backend="eager")
    group = zarr.open_group(str(store / "runs" / expected["recipe_hash"]), mode="r+")
    here = {"theta0": op.theta0.numpy(), "thetaT": op.thetaT.numpy()}
    if not np.array_equal(group["thetaT"][:], here["thetaT"]):
        for name, bits in here.items():
            np.testing.assert_allclose(group[name][:], bits, rtol=0, atol=1e-12)
        assert main(["run", "--width", "4", "--epochs", "2", "--n-train", "128", "--batch-size",
                     "32", "--k-top", "4", "--k-bottom", "4", "--method", "dense", "--backend",
                     "eager", "--store", str(store), "--resume", "-q", "--png", "none"]) == 2
        err = capsys.readouterr().err.strip()
        assert "bit for bit" in err and "CPU" in err and len(err.splitlines()) == 1, err
        for name, bits in here.items():
            group[name][:] = bits
    assert main(["run", "--width", "4", "--epochs", "2", "--n-train", "128", "--batch-size", "32",
                 "--k-top", "4", "--k-bottom", "4", "--method", "dense", "--backend", "eager",
                 "--store", str(store), "--resume", "-q", "--png", "none"]) == 0
    run = open_store(str(store)).run(expected["recipe_hash"])
    assert run.status == "complete"
    np.testing.assert_allclose(run.top(4).sigma, expected["top_sigma"], rtol=1e-12)
    np.testing.assert_allclose(np.sort(run.bottom(4).sigma), np.sort(expected["bottom_sigma"]),
                               rtol=1e-10)


def test_a_resume_whose_training_differs_is_refused_naming_the_cpu(tmp_path, capsys):
    """thetaT one ulp off what this machine trains to (as another CPU's kernels give): refused in
    one line that says the bits depend on the CPU and the torch build, the store untouched."""
    store = tmp_path / "old.zarr"
    shutil.copytree(FIXTURE, store)
    rid = json.loads((FIXTURE.parent / "store-v0.1.0.expected.json").read_text())["recipe_hash"]
    r = tjac.Recipe.paper(width=4, epochs=2, n_train=128, batch_size=32)
    op = tjac.TrainingJacobian(tjac.Problem(r), backend="eager")
    group = zarr.open_group(str(store / "runs" / rid), mode="r+")
    off = op.thetaT.numpy().copy()
    off[0] = np.nextafter(off[0], np.inf)
    group["theta0"][:], group["thetaT"][:] = op.theta0.numpy(), off
    code = main(["run", "--width", "4", "--epochs", "2", "--n-train", "128", "--batch-size", "32",
                 "--k-top", "4", "--k-bottom", "4", "--method", "dense", "--backend", "eager",
                 "--store", str(store), "--resume", "-q", "--png", "none"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "bit for bit" in err and "CPU" in err and "torch build" in err
    assert "does not record the CPU" in err   # a 0.1.0 store: its provenance names no CPU
    assert np.array_equal(group["thetaT"][:], off)
    assert open_store(str(store)).run(rid).status != "complete"


class _Kill(Exception):
    pass


def _killing_bar(**kw):
    class Bar:
        def update(self, n):
            raise _Kill

        def close(self):
            pass
    return Bar()


def test_resume_on_changed_data_is_refused_naming_the_file(tmp_path, capsys):
    data = _npz(tmp_path / "d.npz", n=128)
    r = tjac.Recipe.paper(dataset=data, width=4, epochs=1, batch_size=32)
    store = str(tmp_path / "s.zarr")
    with pytest.raises(_Kill):
        runner.run_analysis(r, store, k_top=2, k_bottom=2, method="dense", backend="eager",
                            progress=_killing_bar, block=64)
    _npz(tmp_path / "d.npz", n=128, bump=True)  # same shapes, other bytes
    code = main(["run", "--dataset", data, "--width", "4", "--epochs", "1", "--batch-size", "32",
                 "--k-top", "2", "--k-bottom", "2", "--method", "dense", "--backend", "eager",
                 "--store", store, "--resume", "-q", "--png", "none"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "d.npz" in err and "changed" in err and len(err.splitlines()) == 1


def test_a_theta0_from_another_cpu_is_refused_naming_both_cpus(tmp_path, capsys):
    """A run started on another CPU whose init gave other bits (theta0's SHA-256 differs): the
    refusal names the CPU it was started on and this one, besides the model's init."""
    r = tjac.Recipe.paper(width=4, epochs=1, n_train=64, batch_size=32)
    store = str(tmp_path / "s.zarr")
    with pytest.raises(_Kill):
        runner.run_analysis(r, store, k_top=2, k_bottom=2, method="dense", backend="eager",
                            progress=_killing_bar, block=64)
    group = zarr.open_group(str(tmp_path / "s.zarr" / "runs" / r.hash()), mode="r+")
    prov = dict(group.attrs["provenance"])
    assert prov["cpu"] == runner.cpu_description()
    prov["cpu"], prov["model"] = "Other CPU (AVX2)", {**prov["model"], "theta0_sha256": "0" * 64}
    group.attrs["provenance"] = prov
    code = main(["run", "--width", "4", "--epochs", "1", "--n-train", "64", "--batch-size", "32",
                 "--k-top", "2", "--k-bottom", "2", "--method", "dense", "--backend", "eager",
                 "--store", store, "--resume", "-q", "--png", "none"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "another theta_0" in err and "'Other CPU (AVX2)'" in err
    assert repr(runner.cpu_description()) in err


def test_a_run_id_started_from_another_recipe_is_refused(tmp_path, capsys):
    """Under an explicit run id, other settings (here the epochs) are another recipe: neither
    reported as complete nor resumed, one line, exit 2, the stored run untouched."""
    store = str(tmp_path / "s.zarr")
    base = ["run", "--width", "4", "--n-train", "64", "--batch-size", "32", "--k-top", "2",
            "--k-bottom", "0", "--run-id", "mine", "--store", store, "-q", "--png", "none"]
    assert main([*base, "--epochs", "1"]) == 0, capsys.readouterr().err
    sigma = open_store(store).run("mine").top(2).sigma
    capsys.readouterr()
    for extra in ([], ["--resume"]):
        code = main([*base, "--epochs", "2", *extra])
        err = capsys.readouterr().err.strip()
        assert code == 2 and "another recipe" in err and len(err.splitlines()) == 1, err
    run = open_store(store).run("mine")
    assert run.recipe.epochs == 1 and (run.top(2).sigma == sigma).all()


def _cli_recipe(*args):
    from tjac.cli import _recipe_from_args, build_parser

    return _recipe_from_args(build_parser().parse_args(["run", *args]))


def test_kwargs_at_the_factorys_defaults_make_the_same_run_id(tmp_path):
    """Passing a factory's default explicitly (sequential_mlp(width=4, act="tanh"),
    momentum_sign(lr=0.05, beta=0.9)) is the recipe without it: same JSON, hash and run id; a
    value that differs (or differs in JSON type: 4.0 is not 4) is kept."""
    bare = _cli_recipe("--model", "usermodels:sequential_mlp",
                       "--optimizer", "usermodels:momentum_sign")
    explicit = _cli_recipe("--model", "usermodels:sequential_mlp", "--model-kwargs",
                           '{"width": 4, "act": "tanh"}', "--optimizer", "usermodels:momentum_sign",
                           "--optimizer-kwargs", '{"lr": 0.05, "beta": 0.9}')
    assert explicit.to_json() == bare.to_json() and explicit.hash() == bare.hash()
    other = _cli_recipe("--model", "usermodels:sequential_mlp", "--model-kwargs",
                        '{"width": 4.0, "act": "relu"}', "--optimizer", "usermodels:momentum_sign",
                        "--optimizer-kwargs", '{"lr": 0.05, "beta": 0.5}')
    assert other.model.kwargs == {"width": 4.0, "act": "relu"} and other.optim.kwargs == {"beta": 0.5}
    lib = tjac.Recipe.paper(model="usermodels:sequential_mlp", model_kwargs={"width": 4},
                            optimizer_factory="usermodels:momentum_sign",
                            optimizer_kwargs={"beta": 0.9})
    assert lib.hash() == bare.hash()
    # a **kwargs factory's arguments are kept as given (its defaults are not visible)
    kw = _cli_recipe("--model", "usermodels:plain_mlp", "--model-kwargs", '{"width": 64}')
    assert kw.model.kwargs == {"width": 64}
    # a full-table config with the defaults spelled out is the same recipe too
    cfg = tmp_path / "full.toml"
    cfg.write_text(
        '[model]\nfamily = "module"\nfactory = "usermodels:sequential_mlp"\n'
        '[model.kwargs]\nwidth = 4\nact = "tanh"\n'
        '[optim]\nname = "custom"\nfactory = "usermodels:momentum_sign"\n'
        '[optim.kwargs]\nlr = 0.05\n')
    assert _cli_recipe("--config", str(cfg)).hash() == bare.hash()
