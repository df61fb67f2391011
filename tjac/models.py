"""Functional models on one flat parameter vector.

Every model publishes its ``layout`` (name, shape, offset of every tensor inside theta) and provides

* ``loss(theta, x, y)``                      mean cross-entropy of one minibatch,
* ``grad(theta, x, y)``                      its gradient g,
* ``grad_hvp(theta, x, y, V[k, P])``         (g, H V) with H the minibatch Hessian (symmetric).

The base class derives ``grad``/``grad_hvp`` with ``torch.func`` (forward-over-reverse, vmapped over
the block so the primal is computed once). :class:`MLP` overrides both with hand-derived
propagation, which avoids torch.func's per-call overhead (about 10x on the paper's net on CPU);
tests check it against the torch.func path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.func import grad as func_grad
from torch.func import jvp, vmap

from .recipe import ModelSpec

_C = math.sqrt(2.0 / math.pi)
_A = 0.044715


@dataclass(frozen=True)
class ParamInfo:
    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy written out (F.cross_entropy's forward AD depends on TorchScript)."""
    return (torch.logsumexp(logits, -1) - logits.gather(-1, y[:, None]).squeeze(-1)).mean()


def activation(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "gelu_tanh":
        return 0.5 * x * (1.0 + torch.tanh(_C * (x + _A * x * x * x)))
    if name == "tanh":
        return torch.tanh(x)
    return torch.relu(x)


def activation_derivs(name: str, x: torch.Tensor):
    """(phi(x), phi'(x), phi''(x)) elementwise."""
    if name == "gelu_tanh":
        u = _C * (x + _A * x * x * x)
        t = torch.tanh(u)
        s = 1.0 - t * t
        du = _C * (1.0 + 3.0 * _A * x * x)
        ddu = _C * 6.0 * _A * x
        return (0.5 * x * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * x * s * du,
                s * (du + 0.5 * x * (ddu - 2.0 * t * du * du)))
    if name == "tanh":
        t = torch.tanh(x)
        s = 1.0 - t * t
        return t, s, -2.0 * t * s
    pos = (x > 0).to(x.dtype)
    return x * pos, pos, torch.zeros_like(x)


# standard deviation of a standard normal truncated to [-2, 2] (JAX's variance_scaling constant)
_TRUNC_STD = 0.87962566103423978


def truncated_normal(n: int, gen: torch.Generator) -> torch.Tensor:
    """n draws of a standard normal truncated to [-2, 2] (inverse CDF of a uniform), float64."""
    lo, hi = 0.5 * (1 + math.erf(-2 / math.sqrt(2))), 0.5 * (1 + math.erf(2 / math.sqrt(2)))
    u = lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)
    return (math.sqrt(2.0) * torch.erfinv(2 * u - 1)).clamp_(-2.0, 2.0)


class Model:
    """Base class: subclasses set ``layout`` and implement ``loss`` and ``init``."""

    layout: tuple[ParamInfo, ...]
    stochastic: bool = False

    @property
    def num_params(self) -> int:
        last = self.layout[-1]
        return last.offset + last.size

    def unflatten(self, theta: torch.Tensor) -> list[torch.Tensor]:
        return [theta[..., p.offset:p.offset + p.size].reshape(*theta.shape[:-1], *p.shape)
                for p in self.layout]

    def init(self, seed: int, *, dtype: torch.dtype, device) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, theta, x, y):
        raise NotImplementedError

    def logits(self, theta, x):
        raise NotImplementedError

    def grad(self, theta, x, y):
        return func_grad(self.loss)(theta, x, y)

    def grad_hvp(self, theta, x, y, V):
        g_fn = func_grad(lambda th: self.loss(th, x, y))
        g, hv = vmap(lambda v: jvp(g_fn, (theta,), (v,)), randomness="same")(V)
        return g[0], hv


class MLP(Model):
    """x -> [Linear -> phi (-> dropout)] * depth -> Linear, weights stored (out, in) like torch."""

    def __init__(self, spec: ModelSpec, n_in: int, n_out: int, *, backend: str = "manual"):
        if backend not in ("manual", "func"):
            raise ValueError(f"unknown MLP backend {backend!r}; expected 'manual' or 'func'")
        self.spec, self.backend = spec, backend
        self.act = spec.activation
        self.dropout = spec.dropout
        self.stochastic = spec.dropout > 0
        widths = (n_in, *spec.hidden, n_out)
        self.widths = widths
        layout, off = [], 0
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            layout.append(ParamInfo(f"layers.{i}.weight", (b, a), off))
            off += a * b
            layout.append(ParamInfo(f"layers.{i}.bias", (b,), off))
            off += b
        self.layout = tuple(layout)

    def init(self, seed: int, *, dtype: torch.dtype, device) -> torch.Tensor:
        """Weights LeCun-normal, biases N(0, 1/fan_in), drawn on the CPU in float64 from
        ``torch.Generator().manual_seed(seed)`` (the same theta_0 on every device), then cast.

        ``weight_init="lecun_normal"`` is JAX/Flax's definition: a standard normal truncated to
        [-2, 2], rescaled to variance exactly 1/fan_in; ``"normal"`` is the untruncated N(0, 1/fan_in).
        """
        gen = torch.Generator().manual_seed(int(seed))
        parts = []
        for p in self.layout:
            fan_in = self.widths[int(p.name.split(".")[1])]
            if p.name.endswith("weight") and self.spec.weight_init == "lecun_normal":
                z = truncated_normal(p.size, gen) / _TRUNC_STD
            else:
                z = torch.randn(p.size, generator=gen, dtype=torch.float64)
            parts.append(z / math.sqrt(fan_in))
        return torch.cat(parts).to(dtype=dtype, device=device)

    def _masks(self, x):
        if not self.stochastic:
            return [None] * (len(self.widths) - 2)
        keep = 1.0 - self.dropout
        return [(torch.rand(x.shape[0], w, dtype=x.dtype, device=x.device) < keep).to(x.dtype) / keep
                for w in self.widths[1:-1]]

    def logits(self, theta, x, masks=None):
        ps = self.unflatten(theta)
        masks = masks if masks is not None else self._masks(x)
        a = x
        for i in range(len(ps) // 2):
            z = a @ ps[2 * i].T + ps[2 * i + 1]
            if i == len(ps) // 2 - 1:
                return z
            a = activation(self.act, z)
            if masks[i] is not None:
                a = a * masks[i]

    def loss(self, theta, x, y):
        return cross_entropy(self.logits(theta, x), y)

    # -- hand-derived gradient and Hessian-vector products --------------------------------------
    def _forward(self, ps, x, masks):
        acts, derivs = [x], []  # acts[l] = a_l; derivs[l] = (phi', phi'') at z_{l+1}
        a = x
        n = len(ps) // 2
        for i in range(n):
            z = a @ ps[2 * i].T + ps[2 * i + 1]
            if i == n - 1:
                return acts, derivs, z
            a, d1, d2 = activation_derivs(self.act, z)
            if masks[i] is not None:
                a, d1, d2 = a * masks[i], d1 * masks[i], d2 * masks[i]
            acts.append(a)
            derivs.append((d1, d2))

    def _backward(self, ps, acts, derivs, delta):
        grads = [None] * len(ps)
        deltas = [None] * (len(ps) // 2)
        for i in reversed(range(len(ps) // 2)):
            deltas[i] = delta
            grads[2 * i] = delta.T @ acts[i]
            grads[2 * i + 1] = delta.sum(0)
            if i > 0:
                delta = (delta @ ps[2 * i]) * derivs[i - 1][0]
        return grads, deltas

    def grad(self, theta, x, y):
        if self.backend == "func":
            return super().grad(theta, x, y)
        ps = self.unflatten(theta)
        acts, derivs, z = self._forward(ps, x, self._masks(x))
        p = torch.softmax(z, -1)
        delta = p.clone()
        delta[torch.arange(len(y), device=y.device), y] -= 1.0
        grads, _ = self._backward(ps, acts, derivs, delta / len(y))
        return torch.cat([g.reshape(-1) for g in grads])

    def grad_hvp(self, theta, x, y, V):
        if self.backend == "func":
            return super().grad_hvp(theta, x, y, V)
        B = len(y)
        ps = self.unflatten(theta)
        dps = self.unflatten(V)  # each (k, *shape)
        acts, derivs, z = self._forward(ps, x, self._masks(x))
        p = torch.softmax(z, -1)
        delta = p.clone()
        delta[torch.arange(B, device=y.device), y] -= 1.0
        grads, deltas = self._backward(ps, acts, derivs, delta / B)
        n = len(ps) // 2
        # forward tangents: dz_l, da_l (k, B, width)
        dzs, das = [], [None]
        for i in range(n):
            dz = acts[i] @ dps[2 * i].transpose(-1, -2) + dps[2 * i + 1][:, None, :]
            if das[i] is not None:
                dz = dz + das[i] @ ps[2 * i].T
            dzs.append(dz)
            if i < n - 1:
                das.append(derivs[i][0] * dz)
        dz = dzs[-1]
        ddelta = (p * dz - p * (p * dz).sum(-1, keepdim=True)) / B
        hv = [None] * len(ps)
        for i in reversed(range(n)):
            hv[2 * i] = ddelta.transpose(-1, -2) @ acts[i]
            if das[i] is not None:
                hv[2 * i] = hv[2 * i] + deltas[i].T @ das[i]
            hv[2 * i + 1] = ddelta.sum(1)
            if i > 0:
                de = ddelta @ ps[2 * i] + deltas[i] @ dps[2 * i]  # d(delta W) (k, B, width)
                e = deltas[i] @ ps[2 * i]
                d1, d2 = derivs[i - 1]
                ddelta = de * d1 + e * d2 * dzs[i - 1]
        g = torch.cat([t.reshape(-1) for t in grads])
        return g, torch.cat([t.reshape(t.shape[0], -1) for t in hv], dim=1)


def build(spec: ModelSpec, n_in: int, n_out: int, *, backend: str = "manual") -> Model:
    """The model of a spec. ``hidden`` means: MLP widths; CNN ``(channels,)``; transformer
    ``(width,) * depth`` (all entries equal)."""
    if spec.family == "mlp":
        return MLP(spec, n_in, n_out, backend=backend)
    from . import zoo

    if n_in != 64:
        raise ValueError(f"model family {spec.family!r} needs 8x8 images (64 features), got {n_in}")
    if spec.dropout:
        raise ValueError(f"dropout is only implemented for the MLP family, not {spec.family!r}")
    if spec.family == "cnn":
        if len(spec.hidden) != 1:
            raise ValueError(f"a CNN takes one channel count in `hidden`, got {spec.hidden}")
        return zoo.CNN(spec.hidden[0], spec.activation, n_out)
    if len(set(spec.hidden)) != 1:
        raise ValueError(f"a transformer takes equal widths in `hidden` (one per block), got {spec.hidden}")
    return zoo.Transformer(spec.hidden[0], len(spec.hidden), spec.activation, n_out)
