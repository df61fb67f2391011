"""Analyses of a stored run rebuild its recipe: a rebuild that is not the run's (changed data,
changed optimizer code) is refused before any product or write, and a list of analyses is checked
whole before any of them runs (one line, exit 2, the store unchanged)."""
import os

import numpy as np
import pytest

import tjac
from tjac import store
from tjac.analyze_store import analyze, analyze_density
from tjac.cli import main
from tjac.runner import run_analysis


def _npz(path, bump=False):
    rng = np.random.default_rng(0)
    arrays = {"X_train": rng.standard_normal((64, 16)), "y_train": rng.integers(0, 4, 64),
              "X_test": rng.standard_normal((32, 16)), "y_test": rng.integers(0, 4, 32)}
    if bump:
        arrays["X_train"][0, 0] += 1.0  # same shapes, other bytes
    np.savez(path, **arrays)
    return str(path)


def _snapshot(path) -> dict:
    """Every file of a store with its bytes (the writer's lock file aside)."""
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            if f != store.LOCK:
                p = os.path.join(root, f)
                out[os.path.relpath(p, path)] = open(p, "rb").read()
    return out


def _store(tmp_path, **kw):
    """A tiny run (P = 88) on a user .npz into a store: (store path, data path)."""
    data = _npz(tmp_path / "d.npz")
    recipe = tjac.Recipe.paper(dataset=data, width=4, epochs=1, batch_size=32, **kw)
    path = str(tmp_path / "s.zarr")
    run_analysis(recipe, path, k_top=2, k_bottom=2, method="dense", run_id="a",
                 backend="eager")
    return path, data


@pytest.fixture
def user_run(tmp_path):
    return _store(tmp_path, optimizer="custom", optimizer_factory="usermodels:momentum_sign")


def test_analyses_refuse_a_run_whose_data_file_changed(user_run, capsys):
    path, data = user_run
    before = _snapshot(path)
    _npz(data, bump=True)
    for what in ("density", "movement", "bulk", "perturbation"):
        code = main(["analyze", path, "--run", "a", "--what", what, "--eps", "0.1", "-q"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1, (what, err)
        assert "d.npz" in err and "changed" in err and "cannot analyze" in err, err
    with pytest.raises(store.StoreError, match="d.npz"):
        analyze_density(path, "a", eps=(0.1,), probes=2, max_steps=20)
    assert _snapshot(path) == before


def test_analyses_refuse_a_run_their_training_no_longer_reproduces(user_run, monkeypatch,
                                                                   capsys):
    """The same recipe (hash, data, theta_0), but the optimizer's code now steps otherwise: the
    retrained theta_T is not the stored one."""
    import usermodels

    path, _ = user_run
    before = _snapshot(path)
    orig = usermodels.momentum_sign
    monkeypatch.setattr(usermodels, "momentum_sign", lambda lr=0.05, beta=0.9: orig(lr, 0.8))
    for what in ("density", "movement,bulk"):
        code = main(["analyze", path, "--run", "a", "--what", what, "--eps", "0.1", "-q"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1, (what, err)
        assert "theta_T" in err and "bit for bit" in err, err
    assert _snapshot(path) == before
    monkeypatch.setattr(usermodels, "momentum_sign", orig)  # the run's own code: analysed
    assert main(["analyze", path, "--run", "a", "--what", "movement", "-q"]) == 0
    assert tjac.open(path).run("a").analyses() == ["movement"]


def test_a_list_of_analyses_is_checked_whole_before_any_runs(tmp_path, capsys):
    """'density' first, then 'jacobian-null' that cannot run (weight decay: no structural
    sigma = 1 directions, so no bulk directions without --dense): refused up front, the density
    never computed nor stored."""
    path, _ = _store(tmp_path, weight_decay=1e-3)
    before = _snapshot(path)
    for what in ("density,jacobian-null", "movement,ood,jacobian-null"):
        code = main(["analyze", path, "--run", "a", "--what", what, "--eps", "0.1", "-q"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1, err
        assert "jacobian-null" in err and "--dense" in err, err
    code = main(["analyze", path, "--run", "a", "--what", "movement,density", "--eps", "2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "'density'" in err and "(0, 1)" in err, err
    with pytest.raises(ValueError, match="eps_grid"):
        analyze(path, "a", what="movement,perturbation", eps_grid=(1e-3, -1.0))
    assert _snapshot(path) == before
    assert set(analyze(path, "a", what="movement,bulk")) == {"movement", "bulk"}


def test_known_regions_of_a_run_whose_data_changed_are_the_solves_alone(tmp_path, caplog):
    from tjac.analyze_store import known_regions

    path, data = _store(tmp_path)  # SGD: the softmax shift directions are singular
    run = tjac.open(path).run("a")
    assert known_regions(run, 1e-3)["structural_ones"] > 0  # the softmax shift directions
    _npz(data, bump=True)
    with caplog.at_level("WARNING", logger="tjac.analyze_store"):
        assert known_regions(run, 1e-3)["structural_ones"] is None
    assert any("d.npz" in r.getMessage() for r in caplog.records)
