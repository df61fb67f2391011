"""A user's module, loss and optimizer: J V and J^T W against a dense jacrev of a training loop
written here from the recipe's description (functional_call, the optimizer's formulas)."""
import math

import pytest
import torch
from torch.func import functional_call, grad, jacrev

import tjac
from tjac.models import losses, seed_dropouts
from tjac.models.layers import step_key

import usermodels

SMALL = dict(epochs=2, n_train=64, batch_size=32)  # 4 steps
MODELS = {
    "bn_cnn": dict(model="usermodels:bn_cnn", model_kwargs={"channels": 2, "p": 0.25}),
    "plain_mlp": dict(model="usermodels:plain_mlp", model_kwargs={"width": 4}),
    "tiny_block": dict(model="usermodels:tiny_block", model_kwargs={"d": 4}),
}
OPTIMIZERS = {
    "sgd": dict(optimizer="sgd"),
    "adam": dict(optimizer="adam", lr=0.01),
    "user": dict(optimizer="custom", optimizer_factory="usermodels:momentum_sign",
                 optimizer_kwargs={"lr": 0.02}),
    "sgd_clip": dict(optimizer="sgd", clip_norm=0.05),
}


def reference_training(recipe, op):
    """theta_0 -> theta_T written out: a fresh module from the factory, seeded dropout keyed as
    documented (recipe.seed, step, layer), BatchNorm on batch statistics, the optimizer's formulas."""
    prob = op.problem  # for the batches only
    factory = getattr(usermodels, recipe.model.factory.split(":")[1])
    module = factory(**recipe.model.kwargs).double()
    drops = seed_dropouts(module)
    torch.func.replace_all_batch_norm_modules_(module)
    names = [p.name for p in op.param_layout]
    shapes = [p.shape for p in op.param_layout]
    T, o = prob.num_steps, recipe.optim
    lossf = losses.get(recipe.loss)

    def loss(theta, t):
        x, y = prob.batch(t)
        for i, d in enumerate(drops):
            d.key = step_key(recipe.seed, t, i)
        params, off = {}, 0
        for n, s in zip(names, shapes):
            params[n] = theta[off:off + math.prod(s)].reshape(s)
            off += math.prod(s)
        return lossf(functional_call(module, params, (x,)), y)

    user = usermodels.momentum_sign(**o.kwargs) if o.name == "custom" else None

    def run(theta):
        m = torch.zeros_like(theta)
        v = torch.zeros_like(theta)
        for t in range(T):
            g = grad(loss)(theta, t)
            if o.clip_norm is not None:
                n = g.norm()
                g = g * torch.where(n > o.clip_norm, o.clip_norm / n, torch.ones_like(n))
            lr = o.lr * 0.5 * (1 + math.cos(math.pi * t / T))
            if o.name == "sgd":
                m = o.momentum * m + g
                theta = theta - lr * m
            elif o.name == "adam":
                m = o.beta1 * m + (1 - o.beta1) * g
                v = o.beta2 * v + (1 - o.beta2) * g * g
                mh, vh = m / (1 - o.beta1 ** (t + 1)), v / (1 - o.beta2 ** (t + 1))
                theta = theta - lr * mh / (torch.sqrt(vh + o.eps_root) + o.eps)
            else:
                upd, (m,) = user[1](g, (m,), theta, t)
                theta = theta + upd
        return theta

    return run


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
@pytest.mark.parametrize("name", list(MODELS))
def test_user_model_products_match_dense_jacobian(name, opt):
    if opt == "sgd_clip" and name != "plain_mlp":
        pytest.skip("clipping: one model suffices")
    r = tjac.Recipe.paper(**MODELS[name], **OPTIMIZERS[opt], **SMALL)
    op = tjac.TrainingJacobian(r)
    run = reference_training(r, op)
    assert torch.equal(run(op.theta0), op.thetaT) or torch.allclose(run(op.theta0), op.thetaT,
                                                                     rtol=0, atol=1e-13)
    J = jacrev(run)(op.theta0)
    V = torch.randn(op.shape[0], 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    scale = float(J.abs().max()) * float(V.abs().sum(0).max())
    assert float((op.matmat(V) - J @ V).abs().max()) <= 1e-10 * scale
    assert float((op.rmatmat(V) - J.T @ V).abs().max()) <= 1e-10 * scale
    op.backend = "double-backward"  # HVPs by reverse-over-reverse: the same oracle
    assert float((op.matmat(V) - J @ V).abs().max()) <= 1e-10 * scale
    assert float((op.rmatmat(V) - J.T @ V).abs().max()) <= 1e-10 * scale
    if opt == "sgd_clip":  # the clip was active at some step (else this tests nothing new)
        prob = op.problem
        norms = [float(prob.grad(s[0], t).norm()) for t, s in op.trajectory.reversed_states()]
        assert max(norms) > r.optim.clip_norm
    assert op.check().deterministic


def test_user_mlp_equals_the_builtin_fused_path():
    builtin = tjac.TrainingJacobian(tjac.Recipe.paper(width=4, **SMALL), backend="fused")
    r = tjac.Recipe.paper(**MODELS["plain_mlp"], **SMALL)
    user = tjac.TrainingJacobian(r, builtin.theta0)  # recognised as an MLP chain: fused
    generic = tjac.TrainingJacobian(tjac.Problem(r, model_backend="func"), builtin.theta0)
    assert user.problem.model.recognised and generic.backend == "eager"
    assert [p.name for p in user.param_layout] == [p.name for p in builtin.param_layout]
    V = torch.randn(builtin.shape[0], 4, generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64)
    ref = builtin.matmat(V), builtin.rmatmat(V)
    for op in (user, generic):
        for a, b in ((op.matmat(V), ref[0]), (op.rmatmat(V), ref[1])):
            assert float((a - b).abs().max()) <= 1e-12 * float(b.abs().max())


def test_theta_is_the_trainable_parameters_in_order_and_init_is_the_modules_own():
    r = tjac.Recipe.paper(**MODELS["bn_cnn"], **SMALL, seed=5)
    state = torch.get_rng_state()
    op = tjac.TrainingJacobian(r)
    assert torch.equal(state, torch.get_rng_state())  # the caller's RNG is untouched
    torch.manual_seed(5)
    torch.set_default_dtype(torch.float64)
    try:
        ref = usermodels.bn_cnn(channels=2, p=0.25)
    finally:
        torch.set_default_dtype(torch.float32)
    expect = torch.cat([p.detach().reshape(-1) for p in ref.parameters()])
    assert torch.equal(op.theta0, expect)
    assert [p.name for p in op.param_layout] == [n for n, _ in ref.named_parameters()]
    assert op.thetaT.shape == op.theta0.shape == (op.shape[0],)


def test_frozen_parameters_are_constants_of_j():
    """A module with a frozen layer: theta is the trainable head only, the frozen weights stay as
    built, and J (of the head) matches a dense jacrev of a loop that keeps the frozen layer fixed."""
    r = tjac.Recipe.paper(model="usermodels:partly_frozen", model_kwargs={"width": 8}, **SMALL)
    op = tjac.TrainingJacobian(r)
    assert [p.name for p in op.param_layout] == ["head.weight", "head.bias"]
    assert op.shape == (8 * 10 + 10, 8 * 10 + 10)
    built = usermodels.partly_frozen(width=8).double()
    module = op.problem.model.module
    assert torch.equal(module.embed.weight, built.embed.weight)  # not trained
    run = reference_training(r, op)
    assert torch.allclose(run(op.theta0), op.thetaT, rtol=0, atol=1e-13)
    J = jacrev(run)(op.theta0)
    V = torch.randn(op.shape[0], 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    scale = float(J.abs().max()) * float(V.abs().sum(0).max())
    assert float((op.matmat(V) - J @ V).abs().max()) <= 1e-10 * scale
    assert float((op.rmatmat(V) - J.T @ V).abs().max()) <= 1e-10 * scale


def test_batchnorm_running_statistics_are_carried_like_torch():
    """No dropout: a torch.optim loop over the same module gives the same theta_T and the same
    running statistics (carried alongside, used for evaluation)."""
    r = tjac.Recipe.paper(model="usermodels:bn_cnn", model_kwargs={"channels": 2, "p": 0.0},
                          **SMALL)
    op = tjac.TrainingJacobian(r)
    torch.manual_seed(r.seed)
    torch.set_default_dtype(torch.float64)
    try:
        net = usermodels.bn_cnn(channels=2, p=0.0)
    finally:
        torch.set_default_dtype(torch.float32)
    T = op.num_steps
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / T)))
    for t in range(T):
        x, y = op.problem.batch(t)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        sched.step()
    flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    assert float((flat - op.thetaT).abs().max()) < 1e-12
    assert torch.allclose(op.trajectory.buffers["bn.running_mean"], net.bn.running_mean, atol=1e-13)
    assert int(op.trajectory.buffers["bn.num_batches_tracked"]) == T
    net.eval()
    with torch.no_grad():
        xt, yt = op.problem.data.x_test, op.problem.data.y_test
        ref_loss = float(torch.nn.functional.cross_entropy(net(xt), yt))
    got = op.problem.evaluate(op.trajectory.thetaT, op.trajectory.buffers)
    assert got["test_loss"] == pytest.approx(ref_loss, rel=1e-12)


def test_param_filter_is_the_sub_block_of_the_dense_jacobian():
    base = dict(width=4, **SMALL)
    full = tjac.TrainingJacobian(tjac.Recipe.paper(**base))
    J = tjac.linalg.materialize(full)
    sub = tjac.TrainingJacobian(tjac.Recipe.paper(**base, param_filter=("layers.1.*",)))
    idx = torch.cat([torch.arange(p.offset, p.offset + p.size) for p in full.param_layout
                     if p.name.startswith("layers.1.")])
    assert sub.shape == (len(idx), len(idx))
    assert [p.name for p in sub.param_layout] == ["layers.1.weight", "layers.1.bias"]
    assert torch.equal(sub.theta0, full.theta0[idx])
    Js = tjac.linalg.materialize(sub)
    assert float((Js - J[idx][:, idx]).abs().max()) <= 1e-13 * float(J.abs().max())
    Jst = sub.rmatmat(torch.eye(len(idx), dtype=torch.float64)).T
    assert float((Jst - J[idx][:, idx]).abs().max()) <= 1e-13 * float(J.abs().max())


def test_mse_regression_matches_a_closed_form_free_oracle():
    """Float targets and mse: the operator against a dense jacrev of a loop written here."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(96, 5, generator=gen, dtype=torch.float64)
    Y = X @ torch.randn(5, 2, generator=gen, dtype=torch.float64)
    r = tjac.Recipe.paper(model="usermodels:plain_mlp", model_kwargs={"n_in": 5, "width": 3, "n_out": 2},
                          dataset=(X[:64], Y[:64], X[64:], Y[64:]), loss="mse", momentum=0.0,
                          lr=0.05, epochs=2, batch_size=32)
    op = tjac.TrainingJacobian(r)
    prob = op.problem
    module = usermodels.plain_mlp(n_in=5, width=3, n_out=2).double()
    names = [p.name for p in op.param_layout]

    def run(theta):
        for t in range(prob.num_steps):
            x, y = prob.batch(t)

            def loss(th):
                ps, off = {}, 0
                for n, p in zip(names, op.param_layout):
                    ps[n] = th[off:off + p.size].reshape(p.shape)
                    off += p.size
                return ((functional_call(module, ps, (x,)) - y) ** 2).mean()
            theta = theta - 0.05 * 0.5 * (1 + math.cos(math.pi * t / prob.num_steps)) * grad(loss)(theta)
        return theta

    J = jacrev(run)(op.theta0)
    I = torch.eye(op.shape[0], dtype=torch.float64)
    assert float((op.matmat(I) - J).abs().max()) <= 1e-12 * float(J.abs().max())
    assert math.isnan(op.problem.evaluate(op.thetaT)["train_acc"])  # no accuracy for regression


@pytest.mark.slow
@pytest.mark.skipif(not tjac.replay.compiler_available(), reason="torch.compile needs a C++ compiler")
@pytest.mark.parametrize("name", ["plain_mlp", pytest.param("tiny_block", marks=pytest.mark.xfail(
    strict=False, reason="measured on torch 2.13 CPU: torch.compile gives tiny_block wrong products "
    "(JVP off by 2.0e-2, VJP by 1.4e-2 against eager); the replay's guard falls back to eager, "
    "which the products-only comparison used to pass"))])
def test_user_model_compiled_backend_matches_eager(name):
    """torch.compile of functional_call steps, with clipping: the products equal eager's to 1e-12,
    and they are the compiled graphs' own. The replay checks its first product in each direction
    against eager and on a mismatch falls back to eager for good, so equal products alone would
    pass with compile broken: both directions must have passed that check, with no fallback."""
    op, _ = _agrees_with_eager(tjac.Recipe.paper(**MODELS[name], clip_norm=0.05, **SMALL),
                               "compiled")
    assert_ran_compiled(op)


def assert_ran_compiled(op):
    """``op``'s products came from its compiled graphs: no direction fell back to eager, and the
    first product of each (a full replay) passed the check against eager."""
    rp = op._replay
    assert rp.name == "compiled" and rp.fallback == {}, getattr(rp, "fallback", None)
    assert {("jvp", False), ("vjp", False)} <= rp._verified, rp._verified


def _agrees_with_eager(recipe, backend):
    """The operator's products through ``backend`` equal eager's to 1e-12 (three columns, both
    directions); returns the operator (now on ``backend``) and the columns."""
    op = tjac.TrainingJacobian(recipe, backend="eager")
    V = torch.randn(op.shape[0], 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    jv, jtw = op.matmat(V), op.rmatmat(V)
    op.backend = backend
    for a, b in ((op.matmat(V), jv), (op.rmatmat(V), jtw)):
        assert float((a - b).abs().max()) <= 1e-12 * float(b.abs().max())
    return op, V


class _UnusedAndLinear(torch.nn.Module):
    """A trainable parameter the loss never uses, and one (a logit offset added after the last
    nonlinearity) whose gradient enters the loss only linearly before softmax."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(64, 10)
        self.unused = torch.nn.Linear(3, 3)
        self.offset = torch.nn.Parameter(torch.zeros(10))

    def forward(self, x):
        return torch.tanh(self.a(x.reshape(x.shape[0], -1))) + self.offset


def test_double_backward_handles_unused_parameters_like_eager():
    op, V = _agrees_with_eager(tjac.Recipe.paper(model=_UnusedAndLinear, epochs=1, n_train=128,
                                                 batch_size=32), "double-backward")
    # the unused parameter's block of J is the identity (theta_T = theta_0 there)
    lay = {p.name: p for p in op.param_layout}["unused.weight"]
    sl = slice(lay.offset, lay.offset + lay.size)
    torch.testing.assert_close(op.matmat(V)[sl], V[sl], atol=0, rtol=0)


def test_a_live_module_is_used_as_given_and_refused_once_changed_in_place():
    module = usermodels.plain_mlp(width=4).double()
    r = tjac.Recipe.paper(model=module, **SMALL)
    assert r.model.factory.startswith("live:PlainMLP@")
    op = tjac.TrainingJacobian(r)
    assert torch.equal(op.theta0, torch.cat([p.detach().reshape(-1) for p in module.parameters()]))
    other = usermodels.plain_mlp(width=4).double()
    assert tjac.Recipe.paper(model=other, **SMALL).hash() != r.hash()  # other weights, other run
    with torch.no_grad():
        module.layers[0].weight[0, 0] += 1.0  # the recipe's name (and hash) no longer describe it
    with pytest.raises(tjac.models.ModelError, match="changed after the recipe was made"):
        tjac.TrainingJacobian(r)
