"""Losses as functions of (outputs, targets) returning the batch mean, written out so that
forward-over-reverse AD works without TorchScript decompositions (``F.cross_entropy`` needs them;
``F.mse_loss`` has no forward-over-reverse rule)."""

from __future__ import annotations

import torch

from .._imports import resolve


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean softmax cross-entropy of integer labels ``y`` (logits (B, C))."""
    return (torch.logsumexp(logits, -1) - logits.gather(-1, y[:, None]).squeeze(-1)).mean()


def cross_entropy_adjoint(z: torch.Tensor, y: torch.Tensor):
    """(p, g): p = softmax(z) and g = (p - onehot(y)) / B, the mean cross-entropy's gradient in
    the logits z (B, C) (the hand-derived backwards start from it)."""
    p = torch.softmax(z, -1)
    g = p.clone()
    g[torch.arange(len(y), device=z.device), y] -= 1.0
    return p, g / len(y)


def cross_entropy_adjoint_tangent(p: torch.Tensor, dz: torch.Tensor) -> torch.Tensor:
    """The tangent of that gradient along a block of logit tangents dz (k, B, C):
    (p dz - p <p, dz>) / B."""
    pdz = p * dz
    return (pdz - p * pdz.sum(-1, keepdim=True)) / p.shape[0]


def mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all elements (``F.mse_loss``'s default); (B, 1) outputs meet (B,)
    targets."""
    if outputs.shape != targets.shape:
        targets = targets.reshape(outputs.shape)
    d = outputs - targets
    return (d * d).mean()


BUILTIN = {"cross_entropy": cross_entropy, "mse": mse}


def get(name: str):
    """The loss named in a recipe: a built-in name or ``"package.module:function"``."""
    if name in BUILTIN:
        return BUILTIN[name]
    fn = resolve(name, what="loss")
    if not callable(fn):
        raise ValueError(f"loss {name!r} is a {type(fn).__name__}, not a callable "
                         f"loss(outputs, targets)")
    return fn
