"""Hand-derived gradients, HVPs and optimizer linearizations against torch.func."""
import pytest
import torch
from torch.func import grad, jvp, vjp, vmap

import tjac
from tjac import models, optim
from tjac.recipe import OptimSpec

from conftest import RTOL, assert_close


@pytest.mark.parametrize("activation", ["gelu_tanh", "tanh", "relu"])
@pytest.mark.parametrize("hidden", [(5,), (6, 3), (4, 5, 3)])
def test_mlp_grad_and_hvp_match_torch_func(activation, hidden):
    gen = torch.Generator().manual_seed(0)
    with models.seeded_construction(1, torch.float64):
        module = models.MLP(7, hidden, 4, activation)
    manual = models.MLPModel(module)
    ref = models.MLPModel(module, backend="func")
    theta = manual.theta0()
    x = torch.randn(11, 7, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (11,), generator=gen)
    V = torch.randn(3, manual.num_params, generator=gen, dtype=torch.float64)
    g1, hv1 = manual.grad_hvp(theta, x, y, V)
    g2, hv2 = ref.grad_hvp(theta, x, y, V)
    assert_close(manual.grad(theta, x, y), grad(ref.loss)(theta, x, y), 1e-12, "grad")
    assert_close(g1, g2, 1e-12, "grad from grad_hvp")
    assert_close(hv1, hv2, 1e-11, "hvp")
    # the Hessian is symmetric: <H v1, v2> = <v1, H v2>
    assert float((hv1[0] @ V[1] - V[0] @ hv1[1]).abs()) < 1e-12 * float(hv1.norm() * V.norm())


def mlp(seed, **kw):
    with models.seeded_construction(seed, torch.float64):
        return models.MLPModel(models.MLP(**kw))


def test_param_layout_is_contiguous_and_torch_shaped():
    m = mlp(0, n_in=64, hidden=(64,), n_out=10)
    names = [p.name for p in m.layout]
    assert names == ["layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias"]
    assert [p.shape for p in m.layout] == [(64, 64), (64,), (10, 64), (10,)]
    off = 0
    for p in m.layout:
        assert p.offset == off
        off += p.size
    assert off == m.num_params == 4810


def test_init_statistics_lecun_and_bias():
    m = mlp(0, n_in=64, hidden=(256,), n_out=10)
    th = m.theta0()
    W0, b0, W1, b1 = m.unflatten(th)
    assert abs(float(W0.std()) - 64 ** -0.5) < 0.005
    assert abs(float(W1.std()) - 256 ** -0.5) < 0.003
    # truncated at two (unscaled) standard deviations, as JAX's lecun_normal
    assert float(W0.abs().max()) <= 2 / 0.87962566103423978 * 64 ** -0.5 + 1e-15
    assert float(b0.abs().max()) > 2.5 * 64 ** -0.5  # biases are not truncated
    plain = mlp(0, n_in=64, hidden=(256,), n_out=10, weight_init="normal")
    assert float(plain.unflatten(plain.theta0())[0].abs().max()) > 2.3 * 64 ** -0.5
    assert abs(float(b0.std()) - 64 ** -0.5) < 0.03
    assert torch.equal(th, mlp(0, n_in=64, hidden=(256,), n_out=10).theta0())
    assert not torch.equal(th, mlp(1, n_in=64, hidden=(256,), n_out=10).theta0())
    # the caller's RNG state is untouched by a seeded construction
    state = torch.get_rng_state()
    mlp(3, n_in=64, hidden=(8,), n_out=10)
    assert torch.equal(state, torch.get_rng_state())


OPTS = [
    OptimSpec(name="sgd", lr=0.3, momentum=0.9),
    OptimSpec(name="sgd", lr=0.3, momentum=0.0),
    OptimSpec(name="sgd", lr=0.3, momentum=0.8, nesterov=True, weight_decay=0.01),
    OptimSpec(name="adam", lr=0.01, weight_decay=0.02),
    OptimSpec(name="adamw", lr=0.01, weight_decay=0.02),
]


@pytest.mark.parametrize("spec", OPTS, ids=lambda s: f"{s.name}-nest{s.nesterov}-wd{s.weight_decay}-mu{s.momentum}")
def test_optimizer_linearizations_match_torch_func(spec):
    gen = torch.Generator().manual_seed(3)
    P, k, t = 13, 4, 5
    opt = optim.build(spec, 20)
    state = tuple(torch.randn(P, generator=gen, dtype=torch.float64) for _ in opt.state_names)
    if spec.name != "sgd":
        state = (state[0], state[1], state[2].abs())
    g = torch.randn(P, generator=gen, dtype=torch.float64)
    ds = tuple(torch.randn(k, P, generator=gen, dtype=torch.float64) for _ in state)
    dg = torch.randn(k, P, generator=gen, dtype=torch.float64)

    def U(s, gg):
        return opt.update(s, gg, t)

    new, dnew = opt.jvp(state, g, ds, dg, t)
    ref_new = U(state, g)
    for a, b in zip(new, ref_new):
        assert torch.equal(a, b)
    ref_d = vmap(lambda a, b: jvp(U, (state, g), (a, b))[1])(ds, dg)
    for a, b in zip(dnew, ref_d):
        assert_close(a, b, 1e-13, "jvp")
    bs = tuple(torch.randn(k, P, generator=gen, dtype=torch.float64) for _ in state)
    (b_state, b_g) = opt.vjp(state, g, bs, t)
    _, fn = vjp(U, state, g)
    ref_bs, ref_bg = vmap(fn)(bs)
    for a, b in zip(b_state, ref_bs):
        assert_close(a, b, 1e-13, "vjp state")
    assert_close(b_g, ref_bg, 1e-13, "vjp grad")


def test_adam_tangent_is_finite_where_v_is_zero():
    opt = optim.build(OptimSpec(name="adam", lr=1e-3), 10)
    z = torch.zeros(3, dtype=torch.float64)
    state = opt.init(z)
    _, d = opt.jvp(state, z, tuple(torch.ones(1, 3, dtype=torch.float64) for _ in state),
                   torch.ones(1, 3, dtype=torch.float64), 0)
    assert all(bool(torch.isfinite(x).all()) for x in d)
