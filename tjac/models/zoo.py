"""More built-in families as ordinary modules: a small CNN and a tiny transformer on 8x8 images.
Their derivatives come from ``torch.func`` (:class:`~tjac.models.base.Model`); every op is
written out where forward-over-reverse AD is fragile (GELU, layer norm, attention, pooling)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .layers import LayerNorm, activation, seeded_init


class CNN(nn.Module):
    """8x8 image -> conv3x3(C, pad 1) -> phi -> 2x2 average pool -> linear(C*16 -> n_out)."""

    def __init__(self, channels: int, activation: str = "gelu_tanh", n_out: int = 10):
        super().__init__()
        if channels < 1:
            raise ValueError(f"CNN needs at least one channel, got {channels}")
        self.C, self.act = channels, activation
        self.conv = nn.Conv2d(1, channels, 3, padding=1, dtype=torch.float64)
        self.head = nn.Linear(channels * 16, n_out, dtype=torch.float64)
        seeded_init(self, {"conv.weight": 9, "conv.bias": 9, "head.weight": channels * 16,
                           "head.bias": channels * 16})

    def forward(self, x):
        h = F.conv2d(x.reshape(-1, 1, 8, 8), self.conv.weight, self.conv.bias, padding=1)
        h = activation(self.act, h)
        h = h.reshape(-1, self.C, 4, 2, 4, 2).mean((3, 5))  # 2x2 average pool, written out
        return h.reshape(h.shape[0], -1) @ self.head.weight.T + self.head.bias


class Positions(nn.Module):
    """A learned position embedding ``weight`` (tokens, d)."""

    def __init__(self, n: int, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n, d, dtype=torch.float64))


class Block(nn.Module):
    """Pre-norm block: single-head attention, then a 2d-wide MLP, each residual."""

    def __init__(self, d: int, act: str):
        super().__init__()
        self.d, self.act = d, act
        self.ln1 = LayerNorm(d)
        for n in ("q", "k", "v", "o"):
            setattr(self, n, nn.Linear(d, d, bias=False, dtype=torch.float64))
        self.ln2 = LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d, dtype=torch.float64)
        self.fc2 = nn.Linear(2 * d, d, dtype=torch.float64)

    def forward(self, h):
        a = self.ln1(h)
        q, k, v = (a @ getattr(self, n).weight.T for n in ("q", "k", "v"))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.d), -1)
        h = h + (att @ v) @ self.o.weight.T
        a = self.ln2(h)
        a = activation(self.act, a @ self.fc1.weight.T + self.fc1.bias)
        return h + a @ self.fc2.weight.T + self.fc2.bias


class Transformer(nn.Module):
    """Digits rows as 8 tokens of 8 pixels: embed(d) + positions, ``depth`` pre-norm blocks, final
    norm, mean pool, linear head."""

    def __init__(self, d: int, depth: int, activation: str = "gelu_tanh", n_out: int = 10):
        super().__init__()
        if d < 2:
            raise ValueError(f"transformer width must be >= 2 (layer norm of one feature is "
                             f"degenerate), got {d}")
        self.d = d
        self.embed = nn.Linear(8, d, dtype=torch.float64)
        self.pos = Positions(8, d)
        self.blocks = nn.ModuleList(Block(d, activation) for _ in range(depth))
        self.ln = LayerNorm(d)
        self.head = nn.Linear(d, n_out, dtype=torch.float64)
        self.to(torch.float64)
        fan_in = {"embed.weight": 8, "embed.bias": 8, "pos.weight": 1, "ln.gain": d, "ln.shift": d,
                  "head.weight": d, "head.bias": d}
        for name, _ in self.named_parameters():
            if name.startswith("blocks."):
                fan_in[name] = 2 * d if ".fc2." in name else d
        seeded_init(self, fan_in)

    def forward(self, x):
        h = x.reshape(-1, 8, 8) @ self.embed.weight.T + self.embed.bias + self.pos.weight
        for blk in self.blocks:
            h = blk(h)
        h = self.ln(h).mean(1)
        return h @ self.head.weight.T + self.head.bias
