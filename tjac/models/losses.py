"""Losses as functions of (outputs, targets) returning the batch mean, written out so that
forward-over-reverse AD works without TorchScript decompositions (``F.cross_entropy`` needs them;
``F.mse_loss`` has no forward-over-reverse rule)."""

from __future__ import annotations

import torch

from .._imports import resolve


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean softmax cross-entropy of integer labels ``y`` (logits (B, C))."""
    return (torch.logsumexp(logits, -1) - logits.gather(-1, y[:, None]).squeeze(-1)).mean()


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
