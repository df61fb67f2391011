"""More model families on a flat parameter vector: a small CNN and a tiny transformer on the 8x8
digits. Their gradients and Hessian-vector products come from ``torch.func`` (the base class);
every op is written out where forward-over-reverse AD is fragile (GELU, layer norm, attention,
softmax cross-entropy).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .models import Model, ParamInfo, activation, cross_entropy, truncated_normal, _TRUNC_STD


def _layout(entries):
    out, off = [], 0
    for name, shape, fan_in in entries:
        out.append(ParamInfo(name, tuple(shape), off))
        off += math.prod(shape)
    return tuple(out), {name: fan_in for name, _, fan_in in entries}


class _Zoo(Model):
    """Shared init: weights truncated LeCun-normal, biases N(0, 1/fan_in), norm gains 1, shifts 0."""

    def init(self, seed: int, *, dtype, device) -> torch.Tensor:
        gen = torch.Generator().manual_seed(int(seed))
        parts = []
        for p in self.layout:
            fan_in = self._fan_in[p.name]
            if p.name.endswith("gain"):
                parts.append(torch.ones(p.size, dtype=torch.float64))
            elif p.name.endswith("shift"):
                parts.append(torch.zeros(p.size, dtype=torch.float64))
            elif p.name.endswith("bias"):
                parts.append(torch.randn(p.size, generator=gen, dtype=torch.float64) / math.sqrt(fan_in))
            else:
                parts.append(truncated_normal(p.size, gen) / _TRUNC_STD / math.sqrt(fan_in))
        return torch.cat(parts).to(dtype=dtype, device=device)

    def params(self, theta):
        return {p.name: t for p, t in zip(self.layout, self.unflatten(theta))}

    def loss(self, theta, x, y):
        return cross_entropy(self.logits(theta, x), y)


class CNN(_Zoo):
    """8x8 image -> conv3x3(C, pad 1) -> GELU -> 2x2 average pool -> linear(C*16 -> 10)."""

    def __init__(self, channels: int, act: str, n_out: int = 10):
        if channels < 1:
            raise ValueError(f"CNN needs at least one channel, got {channels}")
        self.C, self.act = channels, act
        self.layout, self._fan_in = _layout([
            ("conv.weight", (channels, 1, 3, 3), 9), ("conv.bias", (channels,), 9),
            ("head.weight", (n_out, channels * 16), channels * 16),
            ("head.bias", (n_out,), channels * 16)])

    def logits(self, theta, x):
        p = self.params(theta)
        h = F.conv2d(x.reshape(-1, 1, 8, 8), p["conv.weight"], p["conv.bias"], padding=1)
        h = activation(self.act, h)
        h = h.reshape(-1, self.C, 4, 2, 4, 2).mean((3, 5))  # 2x2 average pool, written out
        return h.reshape(h.shape[0], -1) @ p["head.weight"].T + p["head.bias"]


def layer_norm(x, gain, shift, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * gain + shift


class Transformer(_Zoo):
    """Digits rows as 8 tokens of 8 pixels: embed(d) + positions, ``depth`` pre-norm blocks of
    single-head attention and a 2d-wide MLP, final norm, mean pool, linear head."""

    def __init__(self, d: int, depth: int, act: str, n_out: int = 10):
        if d < 2:
            raise ValueError(f"transformer width must be >= 2 (layer norm of one feature is "
                             f"degenerate), got {d}")
        self.d, self.depth, self.act = d, depth, act
        entries = [("embed.weight", (d, 8), 8), ("embed.bias", (d,), 8), ("pos.weight", (8, d), 1)]
        for i in range(depth):
            b = f"blocks.{i}."
            entries += [(b + "ln1.gain", (d,), d), (b + "ln1.shift", (d,), d)]
            entries += [(b + n + ".weight", (d, d), d) for n in ("q", "k", "v", "o")]
            entries += [(b + "ln2.gain", (d,), d), (b + "ln2.shift", (d,), d),
                        (b + "fc1.weight", (2 * d, d), d), (b + "fc1.bias", (2 * d,), d),
                        (b + "fc2.weight", (d, 2 * d), 2 * d), (b + "fc2.bias", (d,), 2 * d)]
        entries += [("ln.gain", (d,), d), ("ln.shift", (d,), d),
                    ("head.weight", (n_out, d), d), ("head.bias", (n_out,), d)]
        self.layout, self._fan_in = _layout(entries)

    def logits(self, theta, x):
        p = self.params(theta)
        h = x.reshape(-1, 8, 8) @ p["embed.weight"].T + p["embed.bias"] + p["pos.weight"]
        for i in range(self.depth):
            b = f"blocks.{i}."
            a = layer_norm(h, p[b + "ln1.gain"], p[b + "ln1.shift"])
            q, k, v = (a @ p[b + n + ".weight"].T for n in ("q", "k", "v"))
            att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.d), -1)
            h = h + (att @ v) @ p[b + "o.weight"].T
            a = layer_norm(h, p[b + "ln2.gain"], p[b + "ln2.shift"])
            a = activation(self.act, a @ p[b + "fc1.weight"].T + p[b + "fc1.bias"])
            h = h + a @ p[b + "fc2.weight"].T + p[b + "fc2.bias"]
        h = layer_norm(h, p["ln.gain"], p["ln.shift"]).mean(1)
        return h @ p["head.weight"].T + p["head.bias"]
