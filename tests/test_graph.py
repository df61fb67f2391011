"""Hand-derived block HVPs of traced user modules (tjac.models.graph) against torch.func's
forward-over-reverse of the same module, op by op and end to end."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tjac
from tjac.models import GraphModel, MLPModel, Model
from tjac.models.graph import Plan, Unsupported, matches
from tjac.models.losses import cross_entropy, mse

import usermodels


class ResNetish(nn.Module):
    """conv-BN-ReLU, a residual conv-BN (no conv bias), max pool, strided conv-BN-GELU (exact),
    adaptive average pool, flatten, linear."""

    def __init__(self, c=3, affine=True):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c, affine=affine)
        self.c2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(c, affine=affine)
        self.c3 = nn.Conv2d(c, 2 * c, 3, stride=2, padding=(1, 1), dilation=1)
        self.b3 = nn.BatchNorm2d(2 * c)
        self.head = nn.Linear(2 * c, 10)

    def forward(self, x):
        h = F.relu(self.b1(self.c1(x)))
        h = torch.relu(h + self.b2(self.c2(h)))
        h = F.max_pool2d(h, 2)
        h = F.gelu(self.b3(self.c3(h)))
        return self.head(nn.functional.adaptive_avg_pool2d(h, 1).flatten(1))


class BroadcastBN(nn.Module):
    """Batch norms whose input tangents are broadcast-shaped: a frozen convolution's (only its
    bias is trained) and the data plus a (C, 1, 1) parameter (no affine)."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 3, 3, padding=1)
        self.c.weight.requires_grad_(False)
        self.shift = nn.Parameter(torch.randn(3, 1, 1))
        self.b1, self.b2 = nn.BatchNorm2d(3), nn.BatchNorm2d(3, affine=False)
        self.head = nn.Linear(48, 10)

    def forward(self, x):
        h = torch.tanh(self.b1(self.c(x))) + torch.tanh(self.b2(x + self.shift))
        return self.head(h.flatten(1))


class TinyLM(nn.Module):
    """Token and position embeddings, a causal multi-head attention block written out (view,
    transpose, masked_fill, softmax as a method), an MLP with tanh-GELU, a final layer norm, the
    last position's logits through the embedding matrix (tied weights)."""

    def __init__(self, vocab=11, d=8, n=6, heads=2, ln_affine=True):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.1 * torch.randn(n, d))
        self.ln1 = nn.LayerNorm(d, elementwise_affine=ln_affine)
        self.qkv, self.o = nn.Linear(d, 3 * d), nn.Linear(d, d, bias=False)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"),
                                 nn.Linear(4 * d, d))
        self.lnf = nn.LayerNorm(d)
        self.heads, self.d = heads, d
        self.register_buffer("causal", torch.triu(torch.ones(n, n, dtype=torch.bool), 1))

    def forward(self, x):
        t = x.long()
        B, n = t.shape
        h = self.emb(t) + self.pos
        q, k, v = self.qkv(self.ln1(h)).split(self.d, -1)
        q, k, v = (z.view(B, n, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1) / math.sqrt(self.d // self.heads))
        att = att.masked_fill(self.causal, float("-inf")).softmax(-1)
        h = h + self.o((att @ v).transpose(1, 2).reshape(B, n, self.d))
        h = h + self.mlp(self.ln2(h))
        return F.linear(self.lnf(h)[:, -1], self.emb.weight)


class Odds(nn.Module):
    """Less common ops: sigmoid, SiLU, chunk, permute, sum/mean with keepdim, scaling by a buffer,
    subtraction, negation, division by a constant tensor, a frozen parameter, an nn.Dropout."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.frozen = nn.Parameter(torch.randn(4), requires_grad=False)
        self.w = nn.Parameter(torch.randn(4, 3))
        self.drop = nn.Dropout(0.25)
        self.register_buffer("scale", torch.tensor([2.0, 3.0, 4.0]))

    def forward(self, x):
        u, v = self.a(x).chunk(2, -1)
        h = torch.sigmoid(u) * F.silu(v) - self.frozen
        h = self.drop(h)
        z = h @ self.w / self.scale
        z = -z + z.sum(-1, keepdim=True) - z.mean()
        return z.unsqueeze(1).permute(0, 2, 1).squeeze(-1)


def _model(module, loss="cross_entropy", seed=3):
    fn = cross_entropy if loss == "cross_entropy" else mse
    m = GraphModel(module, fn, loss_name=loss, dtype=torch.float64)
    m.set_step(seed)
    return m


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


CASES = {
    "resnet": (lambda: ResNetish(), lambda g: (torch.rand(6, 3, 8, 8, generator=g,
                                                          dtype=torch.float64),
                                               torch.randint(0, 10, (6,), generator=g))),
    "resnet-no-affine": (lambda: ResNetish(affine=False),
                         lambda g: (torch.rand(5, 3, 8, 8, generator=g, dtype=torch.float64),
                                    torch.randint(0, 10, (5,), generator=g))),
    "bn-broadcast-tangents": (lambda: BroadcastBN(), lambda g: (
        torch.rand(5, 3, 4, 4, generator=g, dtype=torch.float64),
        torch.randint(0, 10, (5,), generator=g))),
    "lm": (lambda: TinyLM(), lambda g: (torch.randint(0, 11, (7, 6), generator=g).double(),
                                        torch.randint(0, 11, (7,), generator=g))),
    "lm-no-ln-affine": (lambda: TinyLM(ln_affine=False),
                        lambda g: (torch.randint(0, 11, (4, 6), generator=g).double(),
                                   torch.randint(0, 11, (4,), generator=g))),
    "odds": (lambda: Odds(), lambda g: (torch.randn(9, 6, generator=g, dtype=torch.float64),
                                        torch.randint(0, 3, (9,), generator=g))),
    "bn_cnn": (lambda: usermodels.bn_cnn(), lambda g: (
        torch.rand(8, 64, generator=g, dtype=torch.float64), torch.randint(0, 10, (8,), generator=g))),
    "tiny_block": (lambda: usermodels.tiny_block(), lambda g: (
        torch.rand(8, 64, generator=g, dtype=torch.float64), torch.randint(0, 10, (8,), generator=g))),
    "zoo-transformer": (lambda: tjac.models.Transformer(4, 2), lambda g: (
        torch.rand(8, 64, generator=g, dtype=torch.float64), torch.randint(0, 10, (8,), generator=g))),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_block_hvp_matches_torch_func(case):
    make, batch = CASES[case]
    torch.manual_seed(0)
    m = _model(make())
    g = torch.Generator().manual_seed(1)
    x, y = batch(g)
    theta = m.theta0() + 0.1 * torch.randn(m.num_params, generator=g, dtype=torch.float64)
    V = torch.randn(3, m.num_params, generator=g, dtype=torch.float64)
    grad, hv = m.grad_hvp(theta, x, y, V)
    grad_ref, hv_ref = Model.grad_hvp(m, theta, x, y, V)
    assert _rel(grad, grad_ref) < 1e-12
    assert _rel(hv, hv_ref) < 1e-12
    # block rows are independent: one row alone gives the same product
    _, hv1 = m.grad_hvp(theta, x, y, V[1:2])
    assert _rel(hv1[0], hv_ref[1]) < 1e-12
    # H V alone (a VJP's HVPs) skips the gradient's own products and gives the same H V
    assert _rel(m.hvp(theta, x, y, V), hv_ref) < 1e-12


@pytest.mark.parametrize("case", ["resnet", "lm"])
def test_an_hvp_alone_skips_the_products_only_the_gradient_needs(case):
    make, batch = CASES[case]
    torch.manual_seed(0)
    m = _model(make())
    x, y = batch(torch.Generator().manual_seed(1))
    theta, V = m.theta0(), torch.randn(2, m.num_params, dtype=torch.float64)
    _, full, hv_full = m.plan.run(m.params(theta), m.params(V), x, y)
    _, part, hv_part = m.plan.run(m.params(theta), m.params(V), x, y, grad=False)
    skipped = {n for n, mod in m._fmodule.named_modules()
               if isinstance(mod, (nn.Linear, nn.Conv2d, nn.Embedding))}
    names = [n for n in full if n.rsplit(".", 1)[0] in skipped]
    assert names and all(part[n] is None for n in names)  # no weight gradient was formed
    assert all(full[n] is not None for n in full)
    for n in hv_full:
        assert _rel(hv_part[n], hv_full[n]) < 1e-13


@pytest.mark.parametrize("fn", ["gelu", "gelu_tanh"])
def test_the_fused_gelu_rule_is_phi_and_its_two_derivatives(fn):
    from tjac.models.rules import Unary
    x = torch.linspace(-9.0, 9.0, 2001, dtype=torch.float64, requires_grad=True)
    approx = "tanh" if fn == "gelu_tanh" else "none"
    y = F.gelu(x, approximate=approx)
    d1, = torch.autograd.grad(y.sum(), x, create_graph=True)
    d2, = torch.autograd.grad(d1.sum(), x)
    got, (g1, g2) = Unary.fwd([x.detach()], {"fn": fn})
    # to ~1e-14 of each function's scale (phi'' cancels to ~3e-14 where it is ~0 at |x| ~ 7)
    assert torch.allclose(got, y.detach(), rtol=1e-14, atol=1e-14)
    assert torch.allclose(g1, d1.detach(), rtol=1e-14, atol=1e-14)
    assert torch.allclose(g2, d2, rtol=1e-12, atol=1e-13)


def test_mse_loss_and_a_finite_difference_of_the_gradient():
    torch.manual_seed(0)
    m = _model(ResNetish(), loss="mse")
    g = torch.Generator().manual_seed(2)
    x = torch.rand(6, 3, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randn(6, 10, generator=g, dtype=torch.float64)
    theta = m.theta0()
    v = torch.randn(1, m.num_params, generator=g, dtype=torch.float64)
    _, hv = m.grad_hvp(theta, x, y, v)
    eps = 1e-5  # central difference of torch.autograd's gradient: an oracle without torch.func
    fd = (Model.grad(m, theta + eps * v[0], x, y) - Model.grad(m, theta - eps * v[0], x, y)) / (2 * eps)
    assert _rel(hv[0], fd) < 1e-6


@pytest.mark.parametrize("src", ["cumsum", "divide_by_live", "groups", "branch"])
def test_ops_without_a_rule_are_refused_by_name(src):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(2, 2, 3, groups=2 if src == "groups" else 1)
            self.lin = nn.Linear(8, 3)

        def forward(self, x):
            h = self.c(x.reshape(-1, 2, 4, 4)).flatten(1)
            if src == "cumsum":
                h = h.cumsum(-1)
            if src == "divide_by_live":
                h = h / h.sum()
            if src == "branch" and h.sum() > 0:
                h = -h
            return self.lin(h)

    with pytest.raises(Unsupported) as e:
        Plan(M(), "cross_entropy")
    named = {"cumsum": "cumsum", "groups": "groups", "divide_by_live": "div", "branch": "trace"}
    assert named[src] in str(e.value)


def test_a_plan_that_disagrees_with_the_module_is_not_used():
    # a torch.no_grad() block changes derivatives but not outputs: fx does not see it, so the plan
    # differentiates through it and the numeric check against torch.func catches the difference
    class NoGrad(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(64, 4), nn.Linear(4, 10)

        def forward(self, x):
            h = self.a(x)
            with torch.no_grad():
                s = h.sum(-1, keepdim=True)
            return self.b(torch.tanh(h) * s)

    torch.manual_seed(0)
    m = _model(NoGrad())
    x, y = torch.rand(8, 64, dtype=torch.float64), torch.randint(0, 10, (8,))
    assert not matches(m, x, m.theta0(), y)
    ok = _model(usermodels.bn_cnn())
    assert matches(ok, x, ok.theta0(), y)


SMALL = dict(epochs=1, batch_size=32)


def test_a_user_cnn_gets_the_plan_and_the_same_jacobian_as_torch_func():
    r = tjac.Recipe.paper(model="usermodels:bn_cnn", model_kwargs={"channels": 2}, **SMALL)
    hand, ref = tjac.Problem(r), tjac.Problem(r, model_backend="func")
    assert type(hand.model) is GraphModel and type(ref.model) is Model
    a = tjac.TrainingJacobian(hand, backend="eager", block_size=3)
    b = tjac.TrainingJacobian(ref, backend="eager", block_size=3)
    assert torch.equal(a.thetaT, b.thetaT)  # training keeps torch.func's gradient: same bits
    g = torch.Generator().manual_seed(0)
    V = torch.randn(a.shape[0], 3, generator=g, dtype=torch.float64)
    W = torch.randn(a.shape[0], 2, generator=g, dtype=torch.float64)
    JV, JtW = a.matmat(V), a.rmatmat(W)
    assert _rel(JV, b.matmat(V)) < 1e-10
    assert _rel(JtW, b.rmatmat(W)) < 1e-10
    assert abs(float((JV[:, :2] * W).sum() - (V[:, :2] * JtW).sum())) < 1e-10 * float(
        JV.norm() * W.norm())


def test_recipes_the_plan_cannot_serve_keep_torch_func(caplog):
    no_grad = tjac.Recipe.paper(model="usermodels:no_grad_first", **SMALL)
    with caplog.at_level("INFO", logger="tjac.models"):
        assert type(tjac.Problem(no_grad).model) is Model
    assert "disagree with torch.func" in caplog.text  # the user learns why
    mlp = tjac.Recipe.paper(model="usermodels:plain_mlp", model_kwargs={"width": 4}, **SMALL)
    assert isinstance(tjac.Problem(mlp).model, MLPModel)  # the MLP chain comes first
