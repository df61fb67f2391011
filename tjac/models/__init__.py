"""Models: one protocol (:class:`Model`, any ``nn.Module`` through ``functional_call``) for the
built-in families and for a user's module named by import path or passed live."""

from __future__ import annotations

import copy
import logging
import math

import torch
from torch import nn

from . import losses
from .._checks import seeded_construction
from .base import Model, ModelError, ParamInfo, seed_dropouts
from .._imports import ImportPathError, resolve
from .layers import SeededDropout, activation, activation_derivs, truncated_normal
from .losses import cross_entropy, mse
from .chain import matches as chain_matches
from .chain import mlp_chain
from .graph import GraphModel
from .graph import Unsupported as GraphUnsupported
from .graph import matches as graph_matches
from .mlp import MLP, MLPModel
from .zoo import CNN, Transformer
from ..recipe import LIVE_MISSING

log = logging.getLogger("tjac.models")


def output_size(data) -> int:
    if data.n_classes is not None:
        return int(data.n_classes)
    return math.prod(data.y_train.shape[1:]) or 1


def _builtin(spec, data):
    n_in, n_out = data.n_features, output_size(data)
    if spec.family == "mlp":
        return lambda: MLP(n_in, spec.hidden, n_out, spec.activation, spec.dropout, spec.weight_init)
    if data.input_shape not in ((64,), (8, 8), (1, 8, 8)):
        raise ModelError(f"model family {spec.family!r} needs 8x8 images (64 features), got "
                         f"inputs of shape {tuple(data.input_shape)}")
    if spec.dropout:
        raise ModelError(f"dropout is only implemented for the MLP family, not {spec.family!r}")
    if spec.family == "cnn":
        if len(spec.hidden) != 1:
            raise ModelError(f"a CNN takes one channel count in `hidden`, got {spec.hidden}")
        return lambda: CNN(spec.hidden[0], spec.activation, n_out)
    if len(set(spec.hidden)) != 1:
        raise ModelError(f"a transformer takes equal widths in `hidden` (one per block), got "
                         f"{spec.hidden}")
    return lambda: Transformer(spec.hidden[0], len(spec.hidden), spec.activation, n_out)


def build_module(recipe, data, dtype: torch.dtype) -> nn.Module:
    """The recipe's module, initialised by its own code under ``recipe.seed``."""
    spec = recipe.model
    if spec.family != "module":
        make = _builtin(spec, data)
        name = spec.family
    elif spec.live is LIVE_MISSING:
        raise ModelError(f"the recipe names the live model {spec.factory[5:]!r}, which exists only "
                         f"in the process that made it: pass the module or factory again "
                         f"(Recipe.paper(model=...))")
    elif spec.live is not None:
        if isinstance(spec.live, nn.Module):
            from ..recipe import _live_name

            if _live_name(spec.live, recipe.seed, str(dtype)) != spec.factory:
                raise ModelError(f"the live module {type(spec.live).__qualname__!r} changed after "
                                 f"the recipe was made (its parameters or buffers no longer match "
                                 f"{spec.factory!r}, the recipe's name for it): make the recipe "
                                 f"again (Recipe.paper(model=...))")
            return copy.deepcopy(spec.live)  # theta_0 = its parameters as given
        make, name = spec.live, spec.factory
    else:
        make = resolve(spec.factory, what="model")
        name = spec.factory
        if not callable(make):
            raise ModelError(f"model {name!r} is a {type(make).__name__}, not a factory")
        kwargs = spec.kwargs
        make = (lambda f: (lambda: f(**kwargs)))(make)
    with seeded_construction(recipe.seed, dtype):
        try:
            module = make()
        except (ModelError, ImportPathError):
            raise
        except Exception as e:  # noqa: BLE001 - the user's factory failed
            if spec.family != "module":
                raise ModelError(str(e)) from None
            raise ModelError(f"model {name!r} raised {type(e).__name__}: {e}") from None
    if not isinstance(module, nn.Module):
        raise ModelError(f"model {name!r} returned a {type(module).__name__}, not a "
                         f"torch.nn.Module")
    return module


def count_params(recipe, data, dtype: torch.dtype) -> int | None:
    """Trainable parameters of the recipe's module, counted on the meta device (nothing is
    allocated); None when the module cannot be built there (then it is sized after building)."""
    if recipe.model.family == "module" and isinstance(recipe.model.live, nn.Module):
        return sum(p.numel() for p in recipe.model.live.parameters() if p.requires_grad)
    try:
        with torch.device("meta"):
            module = build_module(recipe, data, dtype)
    except Exception:  # noqa: BLE001 - some factories cannot run on meta tensors
        return None
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def build(recipe, data, *, dtype: torch.dtype, device, backend: str = "manual") -> Model:
    """The :class:`Model` of a recipe (built-in family or user module) over ``data``."""
    module = build_module(recipe, data, dtype)
    kw = dict(seed=recipe.seed, dtype=dtype, device=device,
              allow_downcast=recipe.model.family != "module")
    if isinstance(module, MLP) and recipe.loss == "cross_entropy":
        return MLPModel(module, backend=backend, **kw)
    found = None
    if recipe.model.family == "module" and recipe.loss == "cross_entropy":
        found = mlp_chain(module)
        if found is not None:  # a user's MLP: the hand-derived derivatives, once they agree
            m = MLPModel(module, backend="manual", chain=found, **kw)
            x = data.x_train[:64].to(device=m.device, dtype=m.dtype)
            y = data.y_train[:64].to(device=m.device)
            if not chain_matches(m, x, m.theta0(), y):
                found = None
            elif backend == "manual":
                return m
            module = m.module
    if backend == "manual" and found is None and recipe.loss in ("cross_entropy", "mse"):
        graph = _graph_model(module, recipe, data, kw)
        if graph is not None:
            return graph
    model = Model(module, losses.get(recipe.loss), **kw)
    model.chain = found  # verified: its structural sigma = 1 directions are the MLP's
    return model


def _graph_model(module, recipe, data, kw):
    """A :class:`GraphModel` of the module (hand-derived block HVPs) if every op has a rule and
    its products agree with torch.func's on the first training batch, else None."""
    try:
        m = GraphModel(module, losses.get(recipe.loss), loss_name=recipe.loss, **kw)
    except GraphUnsupported as e:
        log.info("%s: no hand-derived rules (%s); HVPs through torch.func", type(module).__name__, e)
        return None
    x = data.x_train[:recipe.batch_size].to(device=m.device, dtype=m.dtype)
    y = data.y_train[:recipe.batch_size].to(device=m.device)
    if y.dtype.is_floating_point:
        y = y.to(m.dtype)
    if m.dropouts:
        m.set_step(0)
    if graph_matches(m, x, m.theta0(), y):
        return m
    log.info("%s: the hand-derived rules disagree with torch.func on the first batch; HVPs "
             "through torch.func", type(module).__name__)
    return None


__all__ = ["count_params", "CNN", "ImportPathError", "MLP", "MLPModel", "Model", "ModelError", "ParamInfo", "GraphModel",
           "SeededDropout", "Transformer", "activation", "activation_derivs", "build",
           "build_module", "cross_entropy", "losses", "mse", "output_size", "resolve",
           "seed_dropouts", "seeded_construction", "truncated_normal"]
