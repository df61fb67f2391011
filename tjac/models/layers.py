"""Building blocks of the built-in families, each written out where forward-over-reverse AD is
fragile (GELU, layer norm), and :class:`SeededDropout`, whose masks are a pure function of
(recipe seed, step, layer, element): the same masks in training and in every replay."""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

_C = math.sqrt(2.0 / math.pi)
_A = 0.044715

# standard deviation of a standard normal truncated to [-2, 2] (JAX's variance_scaling constant)
TRUNC_STD = 0.87962566103423978


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


def truncated_normal(n: int, gen: torch.Generator) -> torch.Tensor:
    """n draws of a standard normal truncated to [-2, 2] (inverse CDF of a uniform), float64."""
    lo, hi = 0.5 * (1 + math.erf(-2 / math.sqrt(2))), 0.5 * (1 + math.erf(2 / math.sqrt(2)))
    u = lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)
    return (math.sqrt(2.0) * torch.erfinv(2 * u - 1)).clamp_(-2.0, 2.0)


def seeded_init(module: nn.Module, fan_in: dict, weight_init: str = "lecun_normal") -> None:
    """The built-in families' initialisation, drawn on the CPU in float64 from one generator seeded
    with ``torch.initial_seed()`` (the recipe's seed: modules are built under it), in
    ``named_parameters()`` order, so theta_0 is the same on every device: weights LeCun-normal
    (JAX/Flax's truncated normal rescaled to variance 1/fan_in; ``"normal"``: untruncated), biases
    N(0, 1/fan_in), layer-norm gains 1 and shifts 0."""
    gen = torch.Generator().manual_seed(torch.initial_seed())
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.is_meta:  # shapes only (tjac sizes a model on the meta device before building it)
                continue
            n = p.numel()
            if name.endswith("gain"):
                z = torch.ones(n, dtype=torch.float64)
            elif name.endswith("shift"):
                z = torch.zeros(n, dtype=torch.float64)
            elif name.endswith("weight") and weight_init == "lecun_normal":
                z = truncated_normal(n, gen) / TRUNC_STD / math.sqrt(fan_in[name])
            else:
                z = torch.randn(n, generator=gen, dtype=torch.float64) / math.sqrt(fan_in[name])
            p.copy_(z.view(p.shape))


class LayerNorm(nn.Module):
    """Layer norm over the last dimension, written out (gain, shift)."""

    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(d))
        self.shift = nn.Parameter(torch.zeros(d))
        self.eps = eps

    def forward(self, x):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + self.eps) * self.gain + self.shift


_M32 = 0xFFFFFFFF


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    """(h * c) mod 2^32 for h, c < 2^32 in int64 without overflow: c is split into 16-bit halves,
    so every intermediate stays below 2^49."""
    lo = h * (c & 0xFFFF)
    hi = ((h * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _M32


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (lowbias32) in int64 arithmetic."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x7FEB352D)
    h = h ^ (h >> 15)
    h = _mul32(h, 0x846CA68B)
    return h ^ (h >> 16)


def step_key(seed: int, step: int, layer: int) -> int:
    """A 32-bit key for (recipe seed, step, dropout layer), stable across processes and versions."""
    d = hashlib.sha256(f"tjac-dropout:{seed}:{step}:{layer}".encode()).digest()
    return int.from_bytes(d[:4], "little")


def uniform_from_key(key: int, shape, *, dtype, device) -> torch.Tensor:
    """U[0, 1) of ``shape`` as a pure function of ``key`` and the element index: no RNG state, the
    same numbers on every device, inside or outside ``torch.func`` transforms."""
    n = math.prod(shape)
    idx = torch.arange(n, dtype=torch.int64, device=device)
    h = _mix32(_mix32(idx ^ key) ^ ((key * 0x9E3779B1) & _M32))  # Python ints: exact
    return (h.to(torch.float64) / 4294967296.0).to(dtype).view(*shape)


class SeededDropout(nn.Module):
    """Dropout whose mask is a pure function of (recipe seed, step, layer, element).

    tjac replaces every ``nn.Dropout`` (and ``Dropout1d/2d/3d``, which drop whole channels) of a
    model with this module and sets ``key`` before each step, so training and every replay see the
    same masks. In eval mode, or with ``p = 0``, it is the identity."""

    def __init__(self, p: float, channelwise: bool = False):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must satisfy 0 <= p < 1, got {p}")
        self.p, self.channelwise = float(p), channelwise
        self.key: int | None = None

    def mask(self, shape, *, dtype, device) -> torch.Tensor:
        if self.key is None:
            raise RuntimeError("SeededDropout needs a step key (tjac sets it before every step)")
        shape = tuple(shape)
        if self.channelwise:
            shape = shape[:2] + (1,) * (len(shape) - 2)
        keep = 1.0 - self.p
        return (uniform_from_key(self.key, shape, dtype=dtype, device=device) < keep).to(dtype) / keep

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        return x * self.mask(x.shape, dtype=x.dtype, device=x.device)

    def extra_repr(self) -> str:
        return f"p={self.p}" + (", channelwise" if self.channelwise else "")
