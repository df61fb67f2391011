"""A user's module that is an MLP chain gets the built-in MLP's hand-derived derivatives (and the
fused backend); anything else stays on torch.func. Products of the recognised path against the
torch.func path of the same module (Problem(model_backend="func")), which the user-model tests
hold to a dense jacrev of a training loop."""
import pytest
import torch

import tjac
from tjac.analysis.structural import structural_ones
from tjac.models import MLPModel, Model
from tjac.models.chain import mlp_chain

import usermodels

SMALL = dict(epochs=2, n_train=64, batch_size=32)  # 4 steps


def _ops(recipe, backend="auto"):
    rec = tjac.TrainingJacobian(recipe, backend=backend)
    gen = tjac.TrainingJacobian(tjac.Problem(recipe, model_backend="func"), backend="eager")
    return rec, gen


def _close(a, b, tol=1e-12):
    return float((a - b).abs().max()) <= tol * float(b.abs().max())


@pytest.mark.parametrize("model,kwargs,act", [
    ("usermodels:plain_mlp", {"width": 4}, "gelu_tanh"),
    ("usermodels:plain_mlp", {"width": 4, "depth": 2}, "gelu_tanh"),
    ("usermodels:sequential_mlp", {"act": "tanh"}, "tanh"),
    ("usermodels:sequential_mlp", {"act": "relu"}, "relu"),
    ("usermodels:sequential_mlp", {"act": "gelu"}, "gelu_tanh"),
])
def test_mlp_chains_take_the_hand_derived_path_and_agree_with_torch_func(model, kwargs, act):
    r = tjac.Recipe.paper(model=model, model_kwargs=kwargs, **SMALL)
    rec, gen = _ops(r)
    m = rec.problem.model
    assert isinstance(m, MLPModel) and m.recognised and m.act == act
    assert type(gen.problem.model) is Model  # the oracle stays on torch.func
    assert rec.backend in ("auto", "fused") and tjac.replay.supported(rec.problem, "fused") is None
    # the user's names, theta_0 and theta_T unchanged
    assert [p.name for p in rec.param_layout] == [p.name for p in gen.param_layout]
    assert torch.equal(rec.theta0, gen.theta0)
    assert _close(rec.thetaT, gen.thetaT)
    V = torch.randn(rec.shape[0], 3, generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64)
    for backend in ("fused", "eager"):
        rec.backend = backend
        assert _close(rec.matmat(V), gen.matmat(V)), backend
        assert _close(rec.rmatmat(V), gen.rmatmat(V)), backend


@pytest.mark.parametrize("kind", ["scaled", "residual", "no_bias", "reversed_registration",
                                  "buffer", "dropout"])
def test_modules_off_the_pattern_stay_on_torch_func(kind):
    r = tjac.Recipe.paper(model="usermodels:not_a_chain", model_kwargs={"kind": kind}, **SMALL)
    p = tjac.Problem(r)
    assert not isinstance(p.model, MLPModel) and p.model.chain is None, kind
    assert tjac.replay.supported(p, "fused") is not None


def test_exact_gelu_mse_loss_and_frozen_parameters_are_not_recognised():
    exact = tjac.Recipe.paper(model="usermodels:sequential_mlp", model_kwargs={"act": "gelu_exact"},
                              **SMALL)
    assert not isinstance(tjac.Problem(exact).model, MLPModel)
    X = torch.randn(96, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    Y = X[:, :10].clone()
    mse = tjac.Recipe.paper(model="usermodels:plain_mlp", model_kwargs={"width": 4}, loss="mse",
                            dataset=(X[:64], Y[:64], X[64:], Y[64:]), epochs=1, batch_size=32)
    assert not isinstance(tjac.Problem(mse).model, MLPModel)  # the MLP code is cross-entropy's
    m = usermodels.plain_mlp(width=4)
    assert mlp_chain(m) == ((64, 4, 10), "gelu_tanh")
    m.layers[0].bias.requires_grad_(False)
    assert mlp_chain(m) is None


def test_a_chain_whose_numbers_differ_is_not_used(monkeypatch):
    """The structural match is confirmed on the data before it is used."""
    import tjac.models as models

    monkeypatch.setattr(models, "chain_matches", lambda *a, **k: False)
    r = tjac.Recipe.paper(model="usermodels:plain_mlp", model_kwargs={"width": 4}, **SMALL)
    model = tjac.Problem(r).model
    assert not isinstance(model, MLPModel) and model.chain is None


def test_structural_ones_of_a_user_mlp_equal_the_builtin_mlps():
    builtin = tjac.Problem(tjac.Recipe.paper(width=4, **SMALL))
    for backend in ("manual", "func"):
        user = tjac.Problem(tjac.Recipe.paper(model="usermodels:plain_mlp",
                                              model_kwargs={"width": 4}, **SMALL),
                            model_backend=backend)
        a, b = structural_ones(user), structural_ones(builtin)
        assert a.n_zero_input == b.n_zero_input > 0 and a.n_softmax_shift == b.n_softmax_shift
        assert torch.equal(a.basis, b.basis)


@pytest.mark.parametrize("model,kwargs", [
    ("usermodels:no_grad_first", {}),          # same outputs, other derivatives
    ("usermodels:hooked_mlp", {}),             # a hook the trace does not see
    ("usermodels:hooked_mlp", {"shift": True}),
])
def test_what_the_trace_cannot_see_keeps_a_module_off_the_chain(model, kwargs):
    r = tjac.Recipe.paper(model=model, model_kwargs=kwargs, **SMALL)
    for backend in ("manual", "func"):
        p = tjac.Problem(r, model_backend=backend)
        assert type(p.model) is Model and p.model.chain is None
        s = structural_ones(p)  # no MLP directions claimed for it
        assert s.n_zero_input == 0 and s.n_softmax_shift == 0


def test_no_grad_inside_forward_is_caught_by_the_derivative_check():
    """The structure alone passes (fx does not see no_grad); the gradient check refuses it."""
    from tjac.models.chain import matches

    m = usermodels.no_grad_first()
    found = mlp_chain(m)
    assert found == ((64, 4, 10), "tanh")
    mm = MLPModel(m, chain=found)
    p = tjac.Problem(tjac.Recipe.paper(width=4, **SMALL))
    x, y = p.batch(0)
    assert matches(mm, x, mm.theta0())           # the outputs agree ...
    assert not matches(mm, x, mm.theta0(), y)    # ... the derivatives do not


def test_float32_mlp_is_recognised():
    r = tjac.Recipe.paper(model="usermodels:plain_mlp", model_kwargs={"width": 4},
                          dtype="float32", **SMALL)
    assert tjac.Problem(r).model.recognised


def test_a_user_mlp_run_started_on_torch_func_resumes(tmp_path, monkeypatch):
    """Runs started before MLP chains were recognised trained through torch.func; their theta_T
    differs from the hand-derived one in the last bits, and the resume takes the same path."""
    from tjac import runner, store

    r = tjac.Recipe.paper(model="usermodels:plain_mlp", model_kwargs={"width": 4}, **SMALL)
    path = str(tmp_path / "s.zarr")
    old = tjac.Problem(r, model_backend="func")
    with monkeypatch.context() as m:  # started as the code before recognition did
        m.setattr(runner, "Problem", lambda recipe, **kw: tjac.Problem(recipe, model_backend="func"))
        runner.run_analysis(r, path, k_top=2, k_bottom=0, run_id="a")
    assert not torch.equal(tjac.TrainingJacobian(r).thetaT,
                           tjac.TrainingJacobian(old).thetaT)  # not bit for bit
    with store.Writer(path) as w:
        w.set_attrs(w.run("a"), status="running")
    # (fused, the hand-derived path's backend, is asked for: the torch.func resume picks its own)
    out = runner.run_analysis(r, path, k_top=2, k_bottom=0, run_id="a", resume=True,
                              backend="fused")
    assert tjac.open(path).run("a").status == "complete" and out.summary["P"] == old.num_params
