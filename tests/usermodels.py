"""Users' models, losses and optimizers, named by import path in the tests ("usermodels:...")."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class Quadratic(nn.Module):
    """outputs x . w; with ``half_square`` the loss is mean_b (x_b . w)^2 / 2 (Hessian X^T X / B)."""

    def __init__(self, n: int):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(n))

    def forward(self, x):
        return x @ self.w


def quadratic(n=64):
    return Quadratic(n)


def half_square(outputs, targets):
    return 0.5 * (outputs ** 2).mean()


class PlainMLP(nn.Module):
    """The paper's MLP written as a plain module (nn.Linear + tanh-approximate GELU)."""

    def __init__(self, n_in=64, width=64, n_out=10, depth=1):
        super().__init__()
        widths = [n_in] + [width] * depth + [n_out]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))

    def forward(self, x):
        h = x.reshape(x.shape[0], -1)
        for lin in self.layers[:-1]:
            h = F.gelu(lin(h), approximate="tanh")
        return self.layers[-1](h)


def plain_mlp(**kw):
    return PlainMLP(**kw)


class BNConvNet(nn.Module):
    """8x8 images: conv -> BatchNorm (train mode: batch statistics) -> tanh -> 2x2 mean pool ->
    dropout -> linear."""

    def __init__(self, channels=2, n_out=10, p=0.25):
        super().__init__()
        self.conv = nn.Conv2d(1, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.drop = nn.Dropout(p)
        self.head = nn.Linear(channels * 16, n_out)
        self.c = channels

    def forward(self, x):
        h = torch.tanh(self.bn(self.conv(x.reshape(-1, 1, 8, 8))))
        h = h.reshape(-1, self.c, 4, 2, 4, 2).mean((3, 5))
        return self.head(self.drop(h).reshape(h.shape[0], -1))


def bn_cnn(**kw):
    return BNConvNet(**kw)


class TinyBlock(nn.Module):
    """Rows of an 8x8 image as 8 tokens; one pre-norm attention block (written out) + MLP, mean
    pool, linear head. Layer norm through torch's module."""

    def __init__(self, d=4, n_out=10):
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.ln = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.Tanh(), nn.Linear(2 * d, d))
        self.head = nn.Linear(d, n_out)
        self.d = d

    def forward(self, x):
        h = self.embed(x.reshape(-1, 8, 8))
        q, k, v = self.qkv(self.ln(h)).split(self.d, -1)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.d), -1)
        h = h + att @ v
        h = h + self.mlp(h)
        return self.head(h.mean(1))


def tiny_block(**kw):
    return TinyBlock(**kw)


class Noisy(nn.Module):
    """Adds unseeded noise inside a submodule: check() must name ``jitter``."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 10)
        self.jitter = Jitter()

    def forward(self, x):
        return self.jitter(self.lin(x))


class Jitter(nn.Module):
    def forward(self, x):
        return x + 1e-3 * torch.rand_like(x)


def noisy():
    return Noisy()


class Frozen(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 10)
        for p in self.lin.parameters():
            p.requires_grad_(False)

    def forward(self, x):
        return self.lin(x)


def frozen():
    return Frozen()


def not_a_module():
    return 42


def wrong_outputs():
    return nn.Linear(64, 3)  # 3 outputs for 10 classes


def momentum_sign(lr=0.05, beta=0.9):
    """An optax-style optimizer: heavy-ball momentum on a smooth sign, g / sqrt(g^2 + 1e-4)."""

    def init(params):
        return (torch.zeros_like(params),)

    def update(grads, state, params, step):
        (m,) = state
        m = beta * m + grads / torch.sqrt(grads * grads + 1e-4)
        return -lr * m, (m,)

    return init, update


class NoisyInput(nn.Module):
    """Adds unseeded noise in its own forward before calling a child: check() must name the
    model's own forward, not the child."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 10)

    def forward(self, x):
        return self.lin(x + 1e-3 * torch.rand_like(x))


def noisy_input():
    return NoisyInput()


def inplace_momentum(lr=0.05, beta=0.9):
    """The same heavy-ball update written in place (torch style): tjac must refuse it."""

    def init(params):
        return (torch.zeros_like(params),)

    def update(grads, state, params, step):
        (m,) = state
        m.mul_(beta).add_(grads)
        return -lr * m, (m,)

    return init, update


def one_hot_mse(outputs, targets):
    """F.mse_loss has no forward-over-reverse rule: refused before training."""
    return torch.nn.functional.mse_loss(outputs, torch.nn.functional.one_hot(targets, 10).to(outputs))


def sequential_mlp(width=4, act="tanh"):
    """An MLP as nn.Sequential: Flatten, Linear, activation, Linear, activation, Linear."""
    a = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": lambda: nn.GELU(approximate="tanh"),
         "gelu_exact": nn.GELU}[act]
    return nn.Sequential(nn.Flatten(), nn.Linear(64, width), a(), nn.Linear(width, width), a(),
                         nn.Linear(width, 10))


class NotAChain(nn.Module):
    """Almost an MLP; ``kind`` names what breaks the pattern."""

    def __init__(self, kind, width=4):
        super().__init__()
        self.kind = kind
        if kind == "reversed_registration":  # parameters registered last layer first
            self.out = nn.Linear(width, 10)
            self.inp = nn.Linear(64, width)
        else:
            self.inp = nn.Linear(64, width, bias=kind != "no_bias")
            self.out = nn.Linear(width, 10)
        if kind == "buffer":
            self.register_buffer("scale", torch.ones(()))
        if kind == "dropout":
            self.drop = nn.Dropout(0.1)

    def forward(self, x):
        h = x.reshape(x.shape[0], -1)
        z = self.inp(h)
        if self.kind == "scaled":
            z = 2.0 * z
        a = torch.tanh(z)
        if self.kind == "dropout":
            a = self.drop(a)
        if self.kind == "buffer":
            a = a * self.scale
        if self.kind == "residual":
            a = a + z
        return self.out(a)


def not_a_chain(kind="scaled", width=4):
    return NotAChain(kind, width)


class NoGradFirst(nn.Module):
    """Outputs of an MLP, but the first layer is computed under torch.no_grad()."""

    def __init__(self, width=4):
        super().__init__()
        self.a, self.b = nn.Linear(64, width), nn.Linear(width, 10)

    def forward(self, x):
        with torch.no_grad():
            h = self.a(x.reshape(x.shape[0], -1))
        return self.b(torch.tanh(h))


def no_grad_first(width=4):
    return NoGradFirst(width)


def hooked_mlp(width=4, shift=False):
    """A Sequential MLP with a hook on its first Linear: detach its output (changes derivatives
    only) or shift its input (changes outputs)."""
    m = sequential_mlp(width, "tanh")
    if shift:
        m[1].register_forward_pre_hook(lambda mod, inp: (inp[0] + 1.0,))
    else:
        m[1].register_forward_hook(lambda mod, inp, out: out.detach())
    return m


class PartlyFrozen(nn.Module):
    """A frozen random feature layer (a fixed generator: the same in every build) under a
    trainable head: theta is the head only."""

    def __init__(self, width=8):
        super().__init__()
        self.embed = nn.Linear(64, width)
        gen = torch.Generator().manual_seed(11)
        with torch.no_grad():  # float32 draws: the same values whatever dtype the module is built in
            for p in self.embed.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) / 8)
        self.embed.requires_grad_(False)
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        return self.head(torch.tanh(self.embed(x.reshape(x.shape[0], -1))))


def partly_frozen(width=8):
    return PartlyFrozen(width)


def lion_sign(lr=0.02, beta1=0.9, beta2=0.99, weight_decay=0.0):
    """Lion (Chen et al. 2023) in the optax style: the step is lr * sign(interpolated momentum),
    whose derivative is zero, so J = (1 - lr * weight_decay)^T I exactly."""

    def init(params):
        return (torch.zeros_like(params),)

    def update(grads, state, params, step):
        (m,) = state
        u = torch.sign(beta1 * m + (1 - beta1) * grads) + weight_decay * params
        return -lr * u, (beta2 * m + (1 - beta2) * grads,)

    return init, update
