"""A spectrum that says nothing about training is said: a sign-based optimizer (Lion) has an
update with zero derivative, so J = I (with weight decay, J = (1 - lr wd)^T I); the run warns
(log, the CLI summary, the stored summary), found from the adjoint check's own products."""
import logging

import numpy as np
import pytest
import torch

import tjac
from tjac.cli import main
from tjac.linalg import materialize
from tjac.query import open as open_store


def _npz(path):
    rng = np.random.default_rng(0)
    np.savez(path, X_train=rng.standard_normal((64, 8)), y_train=rng.integers(0, 3, 64),
             X_test=rng.standard_normal((16, 8)), y_test=rng.integers(0, 3, 16))
    return str(path)


def _recipe(data, **kw):
    return tjac.Recipe.paper(dataset=data, width=4, epochs=1, batch_size=32, optimizer="custom",
                             optimizer_factory="usermodels:lion_sign", optimizer_kwargs=kw)


def test_lion_gives_j_equal_identity_and_the_run_warns(tmp_path, capsys, caplog):
    data = _npz(tmp_path / "d.npz")
    op = tjac.TrainingJacobian(_recipe(data))
    J = materialize(op)  # the oracle: J formed column by column
    assert torch.equal(J, torch.eye(J.shape[0], dtype=J.dtype))
    store = str(tmp_path / "s.zarr")
    with caplog.at_level(logging.WARNING, logger="tjac.runner"):
        code = main(["run", "--dataset", data, "--width", "4", "--epochs", "1", "--batch-size",
                     "32", "--optimizer", "usermodels:lion_sign", "--k-top", "2", "--k-bottom",
                     "2", "--method", "dense", "--backend", "eager", "--store", store,
                     "--run-id", "lion", "--png", "none"])
    out = capsys.readouterr().out
    assert code == 0
    assert any("J = I" in r.getMessage() for r in caplog.records)
    assert "warning: J = I" in out and "sign-based" in out, out
    (w,) = open_store(store).run("lion").summary["warnings"]
    assert w.startswith("J = I") and "says nothing about training" in w


def test_lion_with_weight_decay_is_a_multiple_of_identity(tmp_path):
    data = _npz(tmp_path / "d.npz")
    op = tjac.TrainingJacobian(_recipe(data, weight_decay=0.5))
    c = (1 - 0.02 * 0.5) ** op.num_steps  # closed form: each step scales the tangent by 1 - lr wd
    J = materialize(op)
    torch.testing.assert_close(J, c * torch.eye(J.shape[0], dtype=J.dtype), rtol=0, atol=1e-14)
    assert op.check().scalar == pytest.approx(c, rel=1e-12)


def test_an_ordinary_run_has_no_warning(tmp_path):
    data = _npz(tmp_path / "d.npz")
    op = tjac.TrainingJacobian(tjac.Recipe.paper(dataset=data, width=4, epochs=1, batch_size=32))
    assert op.check().scalar is None
    s = torch.linalg.svdvals(materialize(op))
    assert float(s.max() - s.min()) > 1e-3  # the oracle: not a multiple of an orthogonal matrix


def test_equal_ends_warn_only_when_both_ends_are_known():
    from tjac.analysis.summary import trivial_spectrum

    sp = {"sigma_max": 2.0, "sigma_min": 2.0 - 1e-13, "certificate_max": 1e-13, "complete": False}
    (w,) = trivial_spectrum(None, sp, both_ends=True, tol=1e-8)
    assert "orthogonal" in w
    assert trivial_spectrum(None, sp, both_ends=False, tol=1e-8) == []  # the top alone: unknown
    assert trivial_spectrum(None, {**sp, "sigma_min": 1.9}, both_ends=True, tol=1e-8) == []
