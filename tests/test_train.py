"""tjac.train against a plain torch.optim loop on the same recipe."""
import math

import pytest
import torch
import torch.nn.functional as F

import tjac
from tjac.trajectory import Problem

from conftest import assert_close, tiny


def torch_optim_train(recipe, theta0):
    """An independent nn.Module + torch.optim loop with the recipe's batches and schedule."""
    p = Problem(recipe)
    shapes = [q.shape for q in p.layout]
    params, off = [], 0
    for s in shapes:
        n = math.prod(s)
        params.append(torch.nn.Parameter(theta0[off:off + n].reshape(s).clone()))
        off += n
    o = recipe.optim
    if o.name == "sgd":
        opt = torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                              weight_decay=o.weight_decay)
    elif o.name == "adam":
        opt = torch.optim.Adam(params, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                               weight_decay=o.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                weight_decay=o.weight_decay)
    T = p.num_steps
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / T)) if o.schedule == "cosine" else 1.0)
    for t in range(T):
        x, y = p.batch(t)
        h = x
        for i in range(0, len(params) - 2, 2):
            h = F.gelu(F.linear(h, params[i], params[i + 1]), approximate="tanh")
        loss = F.cross_entropy(F.linear(h, params[-2], params[-1]), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return torch.cat([q.detach().reshape(-1) for q in params])


@pytest.mark.parametrize("kw", [
    dict(),
    dict(nesterov=True, weight_decay=1e-3, depth=2),
    dict(optimizer="adam", lr=1e-2),
    dict(optimizer="adamw", weight_decay=0.1, lr=1e-2),
], ids=["sgd", "nesterov-wd-depth2", "adam", "adamw"])
def test_train_matches_torch_optim(kw):
    r = tiny(epochs=3, width=8, **kw)
    if r.optim.name != "sgd":  # torch's Adam has no eps_root
        r = r.replace(optim=r.optim.__class__(**{**r.optim.__dict__, "eps_root": 0.0}))
    res = tjac.train(r)
    ref = torch_optim_train(r, res.theta0)
    assert_close(res.thetaT, ref, 1e-11, "thetaT vs torch.optim")
    assert not torch.equal(res.thetaT, res.theta0)


def test_paper_recipe_trains_to_paper_accuracy():
    res = tjac.train(tjac.Recipe.paper(epochs=5))
    assert res.train_acc > 0.9 and res.test_acc > 0.85
    assert res.train_loss < 0.5 and res.num_steps == 125


def test_explicit_theta0_is_used():
    r = tiny()
    th = torch.zeros(Problem(r).num_params, dtype=torch.float64)
    res = tjac.train(r, th)
    assert torch.equal(res.theta0, th)
    assert not torch.equal(res.thetaT, tjac.train(r).thetaT)


def test_divergence_names_the_step():
    r = tiny(lr=1e300, schedule="constant", momentum=0.0, epochs=3)
    with pytest.raises(tjac.TrainingDivergedError, match=r"non-finite parameters at step \d+") as e:
        tjac.train(r)
    assert 0 <= e.value.step < 6


@pytest.mark.parametrize("theta0, exc, msg", [
    (torch.zeros(5, dtype=torch.float64), ValueError, r"`theta0` must have shape \(310,\)"),
    (torch.zeros(310, dtype=torch.float32), TypeError, "`theta0` must have dtype torch.float64"),
    ([0.0] * 310, TypeError, "`theta0` must be a torch.Tensor"),
])
def test_bad_theta0(theta0, exc, msg):
    with pytest.raises(exc, match=msg):
        tjac.train(tiny(), theta0)


@pytest.mark.parametrize("drop_last", [True, False])
def test_partial_last_batch_against_a_dataloader_loop(drop_last, caplog):
    """80 examples at batch 32: drop_last (the default) trains on 2 batches per epoch and says
    that 16 examples are dropped; drop_last=False adds a last batch of 16 (its loss the mean over
    16). Oracle: torch DataLoader(drop_last=...) + torch.optim.SGD + LambdaLR (cosine over T)."""
    r = tiny(epochs=2, n_train=80, batch_size=32, drop_last=drop_last)
    assert (r.hash() == tiny(epochs=2, n_train=80, batch_size=32).hash()) == drop_last
    with caplog.at_level("WARNING", logger="tjac.problem"):
        res = tjac.train(r)
    notes = [m for m in caplog.messages if "dropped every epoch" in m]
    assert notes == (["16 of the 80 training examples are dropped every epoch: batch size 32 "
                      "leaves a partial last batch (2 full batches, 64 examples, per epoch); "
                      "drop_last=False (--no-drop-last) trains on them as a smaller last batch"]
                     if drop_last else [])
    p = Problem(r)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(p.data.x_train, p.data.y_train),
                                         batch_size=32, shuffle=False, drop_last=drop_last)
    T = r.epochs * len(loader)
    assert res.num_steps == T == (4 if drop_last else 6)
    shapes = [q.shape for q in p.layout]
    params, off = [], 0
    for s in shapes:
        params.append(torch.nn.Parameter(res.theta0[off:off + math.prod(s)].reshape(s).clone()))
        off += math.prod(s)
    opt = torch.optim.SGD(params, lr=r.optim.lr, momentum=r.optim.momentum)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / T)))
    for _ in range(r.epochs):
        for x, y in loader:
            h = F.gelu(F.linear(x, params[0], params[1]), approximate="tanh")
            opt.zero_grad()
            F.cross_entropy(F.linear(h, params[2], params[3]), y).backward()
            opt.step()
            sched.step()
    ref = torch.cat([q.detach().reshape(-1) for q in params])
    assert_close(res.thetaT, ref, 1e-11, "thetaT vs DataLoader + torch.optim")


def test_partial_last_batch_under_a_seeded_shuffle():
    """Each epoch's permutation covers all 80 examples: 32 + 32 + 16, no example twice."""
    p = Problem(tiny(n_train=80, batch_size=32, shuffle="seeded", drop_last=False))
    assert p.num_steps == 6
    for epoch in range(2):
        idx = torch.cat([p.order.indices(3 * epoch + b) for b in range(3)])
        assert [len(p.order.indices(3 * epoch + b)) for b in range(3)] == [32, 32, 16]
        assert sorted(idx.tolist()) == list(range(80))
