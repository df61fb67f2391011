"""CNN and transformer families: J V and J^T W against a dense jacrev of the whole training run."""
import pytest
import torch
from torch.func import grad, jacrev

import tjac
from tjac.analysis import structural_ones, verify_structural

CASES = {"cnn": dict(family="cnn", width=2), "transformer": dict(family="transformer", width=4, depth=2)}


def dense_J(op):
    prob = op.problem

    def train(theta):
        state = prob.optimizer.init(theta)
        for t in range(prob.num_steps):
            state = prob.optimizer.update(state, grad(prob.loss)(state[0], t), t)
        return state[0]

    return jacrev(train)(op.theta0)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_zoo_operator_matches_dense(name, optimizer):
    r = tjac.Recipe.paper(epochs=1, n_train=96, batch_size=32, optimizer=optimizer, **CASES[name])
    op = tjac.TrainingJacobian(r, checkpoint="sqrt")
    J = dense_J(op)
    V = torch.randn(op.shape[0], 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    scale = float(J.abs().max())
    assert float((op.matmat(V) - J @ V).abs().max()) <= 1e-11 * scale * V.abs().sum(0).max()
    assert float((op.rmatmat(V) - J.T @ V).abs().max()) <= 1e-11 * scale * V.abs().sum(0).max()
    assert op.check().deterministic


def test_zoo_softmax_shift_is_structural():
    op = tjac.TrainingJacobian(tjac.Recipe.paper(epochs=1, n_train=96, batch_size=32, **CASES["cnn"]))
    s = structural_ones(op.problem)
    assert s.n_softmax_shift == 2 * 16 + 1 and s.n_zero_input == 0
    j, jt = verify_structural(op, s)["softmax_shift"]
    assert j < 1e-13 and jt < 1e-13


@pytest.mark.parametrize("kw, msg", [
    (dict(family="cnn", hidden=(2, 3)), "one channel count"),
    (dict(family="transformer", hidden=(4, 6)), "equal widths"),
    (dict(family="transformer", width=1), "width must be >= 2"),
    (dict(family="cnn", width=2, dropout=0.1), "dropout is only implemented"),
])
def test_zoo_bad_sizes(kw, msg):
    with pytest.raises(ValueError, match=msg):
        tjac.Problem(tjac.Recipe.paper(epochs=1, **kw))
