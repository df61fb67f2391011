"""The built-in MLP: an ordinary ``nn.Module`` plus hand-derived gradient and block
Hessian-vector products (:class:`MLPModel`), which avoid torch.func's per-call overhead (about 10x
on the paper's net on CPU) and are what the fused replay builds on. Tests hold them to the
torch.func path of the same module."""

from __future__ import annotations

import torch
from torch import nn

from .base import Model
from .layers import SeededDropout, activation, activation_derivs, seeded_init
from .losses import cross_entropy, cross_entropy_adjoint, cross_entropy_adjoint_tangent


class MLP(nn.Module):
    """x (flattened) -> [Linear -> phi (-> dropout)] * len(hidden) -> Linear.

    Parameters are ``layers.{i}.weight`` (out, in) and ``layers.{i}.bias``; initialisation is
    :func:`~tjac.models.layers.seeded_init` (LeCun-normal weights, N(0, 1/fan_in) biases)."""

    def __init__(self, n_in: int, hidden=(64,), n_out: int = 10, activation: str = "gelu_tanh",
                 dropout: float = 0.0, weight_init: str = "lecun_normal"):
        super().__init__()
        self.widths = (int(n_in), *(int(h) for h in hidden), int(n_out))
        self.act = activation
        self.layers = nn.ModuleList(nn.Linear(a, b, dtype=torch.float64)
                                    for a, b in zip(self.widths[:-1], self.widths[1:]))
        self.drops = nn.ModuleList(SeededDropout(dropout) for _ in hidden) if dropout else None
        seeded_init(self, {f"layers.{i}.{k}": a for i, a in enumerate(self.widths[:-1])
                           for k in ("weight", "bias")}, weight_init)

    def forward(self, x):
        a = x.reshape(x.shape[0], -1)
        n = len(self.layers)
        for i, lin in enumerate(self.layers):
            z = a @ lin.weight.T + lin.bias
            if i == n - 1:
                return z
            a = activation(self.act, z)
            if self.drops is not None:
                a = self.drops[i](a)


class MLPModel(Model):
    """:class:`Model` of a :class:`MLP` with cross-entropy, gradients and HVPs derived by hand.

    ``backend="func"`` keeps the torch.func path of the base class (the oracle in tests)."""

    def __init__(self, module: nn.Module, *, backend: str = "manual", chain=None, **kw):
        """``module`` a :class:`MLP`, or (``chain=(widths, activation)``) a user's module that
        :func:`tjac.models.chain.mlp_chain` recognised as one."""
        if backend not in ("manual", "func"):
            raise ValueError(f"unknown MLP backend {backend!r}; expected 'manual' or 'func'")
        super().__init__(module, cross_entropy, **kw)
        self.backend = backend
        self.widths, self.act = chain if chain is not None else (module.widths, module.act)
        self.recognised = chain is not None
        self.chain = (self.widths, self.act)

    def _masks(self, x):
        if not self.stochastic:
            return [None] * (len(self.widths) - 2)
        return [d.mask((x.shape[0], w), dtype=x.dtype, device=x.device)
                for d, w in zip(self.dropouts, self.widths[1:-1])]

    def _forward(self, ps, x, masks):
        x = x.reshape(x.shape[0], -1)
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
        _, delta = cross_entropy_adjoint(z, y)
        grads, _ = self._backward(ps, acts, derivs, delta)
        return torch.cat([g.reshape(-1) for g in grads])

    def grad_hvp(self, theta, x, y, V):
        if self.backend == "func":
            return super().grad_hvp(theta, x, y, V)
        ps = self.unflatten(theta)
        dps = self.unflatten(V)  # each (k, *shape)
        acts, derivs, z = self._forward(ps, x, self._masks(x))
        p, delta = cross_entropy_adjoint(z, y)
        grads, deltas = self._backward(ps, acts, derivs, delta)
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
        ddelta = cross_entropy_adjoint_tangent(p, dz)
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
