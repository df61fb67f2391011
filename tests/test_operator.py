"""J V and J^T W against independent oracles: dense jacrev of a separately written training
function, central finite differences, a closed form, and the adjoint identity."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, jacrev

import tjac
from tjac.trajectory import Problem

from conftest import RTOL, assert_close, tiny


def independent_train(recipe):
    """theta_0 -> theta_T written from the paper's description with torch.nn.functional."""
    p = Problem(recipe)  # used only for data and batch order
    shapes = [q.shape for q in p.layout]
    o, T = recipe.optim, p.num_steps

    def loss(theta, x, y):
        ps, off = [], 0
        for s in shapes:
            ps.append(theta[off:off + math.prod(s)].reshape(s))
            off += math.prod(s)
        h = x
        for i in range(0, len(ps) - 2, 2):
            h = F.gelu(F.linear(h, ps[i], ps[i + 1]), approximate="tanh")
        return F.cross_entropy(F.linear(h, ps[-2], ps[-1]), y)

    def run(theta):
        m = torch.zeros_like(theta)
        v = torch.zeros_like(theta)
        for t in range(T):
            g = grad(loss)(theta, *p.batch(t))
            lr = o.lr * 0.5 * (1 + math.cos(math.pi * t / T))
            if o.name == "sgd":
                m = o.momentum * m + g
                theta = theta - lr * m
            else:
                m = o.beta1 * m + (1 - o.beta1) * g
                v = o.beta2 * v + (1 - o.beta2) * g * g
                mh = m / (1 - o.beta1 ** (t + 1))
                vh = v / (1 - o.beta2 ** (t + 1))
                theta = theta - lr * mh / (torch.sqrt(vh + o.eps_root) + o.eps)
        return theta

    return run


@pytest.fixture(scope="module", params=["sgd", "adam"])
def dense_case(request):
    r = tiny(optimizer=request.param, **({"lr": 0.05} if request.param == "adam" else {}))
    op = tjac.TrainingJacobian(r)
    J = jacrev(independent_train(r))(op.theta0)
    return r, op, J


@pytest.mark.parametrize("backend", ["eager", "fused"])
def test_jvp_and_vjp_match_dense_jacobian(dense_case, backend):
    r, op, J = dense_case
    op.backend = backend
    op.num_matvecs = op.num_rmatvecs = 0
    gen = torch.Generator().manual_seed(0)
    V = torch.randn(op.shape[0], 9, generator=gen, dtype=torch.float64)
    assert_close(op.matmat(V), J @ V, 1e-10, f"J V ({r.optim.name}, {backend})")
    assert_close(op.rmatmat(V), J.T @ V, 1e-10, f"J^T W ({r.optim.name}, {backend})")
    assert_close(op.matvec(V[:, 0]), J @ V[:, 0], 1e-10, "matvec")
    assert op.num_matvecs == 10 and op.num_rmatvecs == 9
    assert not torch.allclose(J, torch.eye(J.shape[0], dtype=J.dtype))  # a non-trivial oracle


def test_thetaT_matches_independent_training(dense_case):
    r, op, _ = dense_case
    assert_close(op.thetaT, independent_train(r)(op.theta0), 1e-12, "thetaT")


def test_adjoint_identity_float64():
    op = tjac.TrainingJacobian(tiny(width=16, epochs=3, depth=2))
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        v = torch.randn(op.shape[0], 1, generator=gen, dtype=torch.float64)
        w = torch.randn(op.shape[0], 1, generator=gen, dtype=torch.float64)
        lhs, rhs = float((op.matmat(v) * w).sum()), float((v * op.rmatmat(w)).sum())
        assert abs(lhs - rhs) <= 1e-12 * abs(lhs) + 1e-14
    rep = op.check()
    assert rep.deterministic and rep.adjoint_rel_error < 1e-12


def test_central_finite_differences():
    r = tiny(width=8)
    op = tjac.TrainingJacobian(r)
    gen = torch.Generator().manual_seed(2)
    v = torch.randn(op.shape[0], generator=gen, dtype=torch.float64)
    v /= v.norm()
    h = 1e-5
    fd = (tjac.train(r, op.theta0 + h * v).thetaT - tjac.train(r, op.theta0 - h * v).thetaT) / (2 * h)
    assert_close(op.matvec(v), fd, 1e-7, "J v vs central differences")


def test_sgd_on_quadratic_matches_closed_form():
    """A user's module and loss by import path: L_t(w) = mean_b (x_b . w)^2 / 2, Hessian
    A_t = X_t^T X_t / B, so J = prod_t (I - eta_t A_t)."""
    r = tjac.Recipe.paper(model="usermodels:quadratic", model_kwargs={"n": 64},
                          loss="usermodels:half_square", momentum=0.0, lr=0.5, epochs=3,
                          n_train=128, batch_size=32)
    prob = Problem(r)
    theta0 = torch.linspace(-1, 1, 64, dtype=torch.float64)
    op = tjac.TrainingJacobian(prob, theta0)
    J = torch.eye(64, dtype=torch.float64)
    for t in range(prob.num_steps):
        x, _ = prob.batch(t)
        A = x.T @ x / x.shape[0]
        J = (torch.eye(64, dtype=torch.float64) - prob.optimizer.lr(t) * A) @ J
    I = torch.eye(64, dtype=torch.float64)
    assert_close(op.matmat(I), J, 1e-12, "J vs prod(I - eta_t A_t)")
    assert_close(op.rmatmat(I), J.T, 1e-12, "J^T vs closed form")


@pytest.mark.parametrize("policy", ["sqrt", 3, 1, 100])
def test_checkpoint_policies_give_identical_results(policy):
    r = tiny(epochs=3)
    ref = tjac.TrainingJacobian(r, checkpoint="all")
    op = tjac.TrainingJacobian(r, checkpoint=policy)
    W = torch.randn(ref.shape[0], 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.equal(op.rmatmat(W), ref.rmatmat(W))
    assert torch.equal(op.thetaT, ref.thetaT)
    op.trajectory.verify_replay()


def test_sqrt_policy_stores_about_two_sqrt_T_states():
    r = tiny(epochs=25)  # 100 steps
    op = tjac.TrainingJacobian(r, checkpoint="sqrt")
    T = op.num_steps
    assert op.trajectory.stored_states <= 2 * math.ceil(math.sqrt(T))
    assert tjac.TrainingJacobian(r).trajectory.stored_states == T


def test_float32_operator_agrees_with_float64():
    r64 = tiny()
    op64 = tjac.TrainingJacobian(r64)
    op32 = tjac.TrainingJacobian(r64.replace(dtype="float32"), op64.theta0.float())
    assert op32.dtype == torch.float32
    V = torch.randn(op64.shape[0], 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out32 = op32.matmat(V.float())
    assert out32.dtype == torch.float32
    assert_close(out32, op64.matmat(V), 1e-4, "float32 JVP")
    assert_close(op32.rmatmat(V.float()), op64.rmatmat(V), 1e-4, "float32 VJP")
    with pytest.raises(TypeError, match="refusing to downcast"):
        op32.matmat(V)


@pytest.mark.parametrize("recipe, cause", [
    (lambda: tiny(shuffle="unseeded"), "unseeded batch shuffling"),
    (lambda: tjac.Recipe.paper(model="usermodels:noisy", epochs=1, n_train=128, batch_size=32),
     r"unseeded randomness in jitter \(Jitter\)"),
    (lambda: tjac.Recipe.paper(model="usermodels:noisy_input", epochs=1, n_train=128, batch_size=32),
     r"unseeded randomness in the model's own forward \(NoisyInput\)"),
])
def test_check_refuses_nondeterministic_recipes(recipe, cause):
    op = tjac.TrainingJacobian(recipe())
    with pytest.raises(tjac.NondeterminismError, match=cause):
        op.check()


def test_seeded_dropout_is_replayable():
    op = tjac.TrainingJacobian(tiny(dropout=0.2))
    assert op.problem.stochastic and op.check().deterministic
    # the masks really drop: a different seed gives a different run from the same theta_0
    other = tjac.TrainingJacobian(tiny(dropout=0.2, seed=1), op.theta0)
    assert not torch.equal(other.thetaT, op.thetaT)


def test_seeded_shuffle_is_deterministic():
    op = tjac.TrainingJacobian(tiny(shuffle="seeded", shuffle_seed=4), checkpoint=3)
    assert op.check().deterministic


def test_to_scipy_passes_dtype_and_matches():
    op = tjac.TrainingJacobian(tiny())
    A = op.to_scipy()
    assert A.dtype == np.float64 and op.num_matvecs == 0  # no probing replay
    x = np.random.default_rng(0).standard_normal(op.shape[0])
    np.testing.assert_allclose(A @ x, op.matvec(torch.from_numpy(x)).numpy(), rtol=1e-13)
    np.testing.assert_allclose(A.H @ x, op.rmatvec(torch.from_numpy(x)).numpy(), rtol=1e-13)
    X = np.random.default_rng(1).standard_normal((op.shape[0], 2))
    np.testing.assert_allclose(A.matmat(X), op.matmat(torch.from_numpy(X)).numpy(), rtol=1e-13)


def test_block_size_split_is_exact():
    r = tiny()
    a, b = tjac.TrainingJacobian(r, block_size=2), tjac.TrainingJacobian(r, block_size=64)
    V = torch.randn(a.shape[0], 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert_close(a.matmat(V), b.matmat(V), 1e-13, "block split JVP")
    assert_close(a.rmatmat(V), b.rmatmat(V), 1e-13, "block split VJP")


@pytest.mark.parametrize("bad, msg", [
    (dict(checkpoint="half"), "`checkpoint` must be 'all', 'sqrt' or a positive integer"),
    (dict(checkpoint=0), "`checkpoint` must be"),
    (dict(block_size=0), "`block_size` must be a positive integer"),
])
def test_bad_operator_arguments(bad, msg):
    with pytest.raises(ValueError, match=msg):
        tjac.TrainingJacobian(tiny(), **bad)


def test_bad_block_shape():
    op = tjac.TrainingJacobian(tiny())
    with pytest.raises(ValueError, match=r"must have shape \(310, k\)"):
        op.matmat(torch.zeros(5, 1, dtype=torch.float64))


def test_to_scipy_refuses_a_silent_downcast():
    """float64 vectors into a float32 operator's scipy view are refused, like the torch path,
    instead of being cast down without a word."""
    import numpy as np

    op = tjac.TrainingJacobian(tjac.Recipe.paper(width=4, epochs=1, n_train=64, dtype="float32"))
    A = op.to_scipy()
    assert A.matvec(np.ones(op.shape[0], dtype=np.float32)).dtype == np.float32
    with pytest.raises(TypeError, match="refusing to downcast silently"):
        A.matvec(np.ones(op.shape[0]))
