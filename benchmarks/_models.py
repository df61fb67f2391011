"""Users' models and synthetic data shared by the benchmarks: a ResNet-style CNN with BatchNorm on
CIFAR-shaped images and a small causal transformer LM on token sequences, both written the way
users write them (nn.Conv2d, nn.BatchNorm2d, nn.LayerNorm, nn.Embedding, attention spelled out)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class Residual(nn.Module):
    """h + BN(conv(ReLU(BN(conv(h))))) (``convs`` = 2) or h + BN(conv(h)) (``convs`` = 1), then
    ReLU."""

    def __init__(self, c, convs=2):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.two = convs == 2
        if self.two:
            self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, h):
        z = self.b1(self.c1(h))
        if self.two:
            z = self.b2(self.c2(F.relu(z)))
        return F.relu(h + z)


class ResNet(nn.Module):
    """3x32x32 -> conv(w0)-BN-ReLU, 2x2 max pool, then per stage a residual block and (between
    stages) a stride-2 conv-BN-ReLU that doubles the channels; global average pool; linear.
    ``widths`` (32, 64, 128, 256) with ``last_convs`` = 1 has 1.37e6 parameters."""

    def __init__(self, widths=(32, 64, 128, 256), last_convs=1, n_out=10):
        super().__init__()
        w = list(widths)
        self.stem, self.bn = nn.Conv2d(3, w[0], 3, padding=1, bias=False), nn.BatchNorm2d(w[0])
        self.blocks = nn.ModuleList(Residual(c, last_convs if i == len(w) - 1 else 2)
                                    for i, c in enumerate(w))
        self.downs = nn.ModuleList(nn.Sequential(nn.Conv2d(a, b, 3, stride=2, padding=1,
                                                           bias=False), nn.BatchNorm2d(b),
                                                 nn.ReLU())
                                   for a, b in zip(w[:-1], w[1:]))
        self.head = nn.Linear(w[-1], n_out)

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.bn(self.stem(x))), 2)
        for i, blk in enumerate(self.blocks):
            h = blk(h)
            if i < len(self.downs):
                h = self.downs[i](h)
        return self.head(F.adaptive_avg_pool2d(h, 1).flatten(1))


def resnet(**kw):
    torch.manual_seed(0)  # theta_0 is whatever the module holds: make it reproducible
    return ResNet(**kw)


class Block(nn.Module):
    def __init__(self, d, heads, n):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.heads, self.d = heads, d
        self.register_buffer("causal", torch.triu(torch.ones(n, n, dtype=torch.bool), 1))

    def forward(self, h):
        B, n, d = h.shape  # traced: B, n, d stand for h's sizes in the ops below
        q, k, v = self.qkv(self.ln1(h)).split(self.d, -1)
        q, k, v = (z.view(B, n, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(self.d // self.heads)  # a Python number
        att = att.masked_fill(self.causal, float("-inf")).softmax(-1)  # n: the model's length
        h = h + self.proj((att @ v).transpose(1, 2).reshape(B, n, d))
        return h + self.fc2(F.gelu(self.fc1(self.ln2(h)), approximate="tanh"))


class TinyLM(nn.Module):
    """Causal transformer LM: token + learned position embeddings, ``depth`` pre-norm blocks, final
    layer norm, logits of the token after the last position (untied head). ``d`` 128, ``depth``
    5, ``vocab`` 512, ``n`` 32 has 1.13e6 parameters."""

    def __init__(self, vocab=512, d=128, depth=5, heads=4, n=32):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.02 * torch.randn(n, d))
        self.blocks = nn.ModuleList(Block(d, heads, n) for _ in range(depth))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, x):
        h = self.emb(x.long()) + self.pos
        for blk in self.blocks:
            h = blk(h)
        return self.head(self.ln(h)[:, -1])


def tiny_lm(**kw):
    torch.manual_seed(0)
    return TinyLM(**kw)


def cifar_like(n_train, n_test, seed=0):
    """3x32x32 images in [0, 1]: a smooth random template per class (8x8 blocks upsampled) times a
    random contrast, plus pixel noise; labels uniform. uint8 like CIFAR (tjac divides by 255)."""
    rng = np.random.default_rng(seed)
    raw = rng.normal(size=(10, 3, 8, 8))
    templates = np.kron(raw, np.ones((1, 1, 4, 4)))
    templates = (templates - templates.min()) / (templates.max() - templates.min())

    def draw(n):
        y = rng.integers(0, 10, n)
        c = rng.uniform(0.5, 1.0, (n, 1, 1, 1))
        X = np.clip(c * templates[y] + 0.2 * rng.normal(size=(n, 3, 32, 32)), 0, 1)
        return (255 * X).round().astype(np.uint8), y.astype(np.int64)

    return (*draw(n_train), *draw(n_test))


def tokens_like(n_train, n_test, vocab=512, n=32, seed=0):
    """Sequences from a sparse random Markov chain over ``vocab`` tokens (each token has 4 likely
    successors): X the first n tokens as integers, y the next one."""
    rng = np.random.default_rng(seed)
    succ = rng.integers(0, vocab, (vocab, 4))

    def draw(m):
        seq = np.empty((m, n + 1), np.int64)
        seq[:, 0] = rng.integers(0, vocab, m)
        for t in range(n):
            seq[:, t + 1] = succ[seq[:, t], rng.integers(0, 4, m)]
        return seq[:, :n], seq[:, n]

    return (*draw(n_train), *draw(n_test))
