"""Recognise a user's module that is an MLP chain, so it gets the hand-derived derivatives.

A module whose forward is, op for op, ``flatten -> Linear -> phi -> Linear -> ... -> Linear`` (phi
one of tanh-approximate GELU, tanh, ReLU; every Linear with a bias and used once; parameters
registered as W0, b0, W1, b1, ... and all trainable; no buffers, no dropout) computes exactly
what the built-in MLP computes. Trained with cross-entropy, its gradients and block HVPs can then
come from :class:`~tjac.models.mlp.MLPModel`'s hand-derived code and its replays from the fused
backend: products about 4x cheaper than torch.func's on the paper's net (BENCHMARKS.md).

The forward is read with ``torch.fx.symbolic_trace`` in train mode; anything the trace cannot read
(control flow on values, unsupported calls), any op outside the pattern, and any module hook
(which the trace does not see) leave the module on the generic path. A match is then checked
numerically on a batch of the training data before it is used: the outputs, the gradient and a
block Hessian-vector product of the hand-derived chain against the module's own through torch.func
(a ``torch.no_grad`` block inside a forward changes derivatives but not outputs). ``param_layout``
keeps the user's parameter names. ``Problem(recipe, model_backend="func")`` keeps torch.func
derivatives for every module (the oracle in tests); a verified chain is still marked
(``model.chain``) so that its structural sigma = 1 directions are derived.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

_ACT_FUNCS = {torch.tanh: "tanh", F.tanh: "tanh", torch.relu: "relu", F.relu: "relu"}
_ACT_METHODS = {"tanh": "tanh", "relu": "relu"}
_FLATTEN_METHODS = ("reshape", "view", "flatten")


def _act_of(node, mods) -> str | None:
    if node.op == "call_module":
        m = mods.get(node.target)
        if isinstance(m, nn.GELU):
            return "gelu_tanh" if m.approximate == "tanh" else None
        if isinstance(m, nn.Tanh):
            return "tanh"
        if isinstance(m, nn.ReLU):
            return "relu"
        return None
    if node.op == "call_function":
        if node.target is F.gelu:
            approx = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
            extra = set(node.kwargs) - {"approximate"}
            return "gelu_tanh" if approx == "tanh" and not extra and len(node.args) <= 2 else None
        if node.target in (F.relu,) and (node.kwargs.get("inplace") or len(node.args) > 1):
            return None
        return _ACT_FUNCS.get(node.target) if len(node.args) == 1 else None
    if node.op == "call_method" and len(node.args) == 1 and not node.kwargs:
        return _ACT_METHODS.get(node.target)
    return None


def _linear_of(node, mods):
    """The nn.Linear a node applies, or None."""
    if node.op == "call_module" and isinstance(mods.get(node.target), nn.Linear):
        return mods[node.target]
    return None


def _is_flatten(node, mods, x) -> bool:
    """A flatten of the input to (batch, features): checked numerically afterwards."""
    if node.op == "call_module":
        m = mods.get(node.target)
        return isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1
    if node.op == "call_method" and node.target in _FLATTEN_METHODS:
        return bool(node.args) and node.args[0] is x
    if node.op == "call_function" and node.target is torch.flatten:
        return bool(node.args) and node.args[0] is x
    return False


def mlp_chain(module: nn.Module) -> tuple[tuple[int, ...], str] | None:
    """(widths, activation) if ``module``'s forward is an MLP chain (module docstring), else None.
    Purely structural: :func:`matches` checks the numbers."""
    import torch.fx

    if any(True for _ in module.buffers()) or _hooked(module):
        return None
    named = list(module.named_parameters())
    if not named or not all(p.requires_grad for _, p in named):
        return None
    was = module.training
    try:
        module.train()  # the mode training runs in
        gm = torch.fx.symbolic_trace(module)
    except Exception:  # noqa: BLE001 - anything fx cannot read stays on the generic path
        return None
    finally:
        module.train(was)
    mods = dict(gm.named_modules())
    nodes = [n for n in gm.graph.nodes]
    xs = [n for n in nodes if n.op == "placeholder"]
    if len(xs) != 1:
        return None
    x = xs[0]
    shape_ops = {n for n in nodes if n.op == "call_function" and n.target in (
        getattr, operator.getitem) or (n.op == "call_method" and n.target == "size")}
    for n in shape_ops:  # only x.shape[0] / x.size(0) and the like, read from the input
        if not n.args or n.args[0] is not x and n.args[0] not in shape_ops:
            return None
    chain = [n for n in nodes if n.op not in ("placeholder", "output") and n not in shape_ops]
    out = [n for n in nodes if n.op == "output"]
    cur, i = x, 0
    if chain and _is_flatten(chain[0], mods, x):
        cur, i = chain[0], 1
    linears, acts, used = [], [], set()
    want_linear = True
    for n in chain[i:]:
        if not n.args or n.args[0] is not cur or n.all_input_nodes != [cur]:
            return None
        lin = _linear_of(n, mods) if want_linear else None
        if want_linear:
            if lin is None or lin.bias is None or id(lin) in used or len(n.args) != 1:
                return None
            used.add(id(lin))
            linears.append(lin)
        else:
            a = _act_of(n, mods)
            if a is None:
                return None
            acts.append(a)
        cur, want_linear = n, not want_linear
    if want_linear or not linears or len(out) != 1 or out[0].args != (cur,):
        return None  # must end on a Linear, whose output is returned
    if len(set(acts)) > 1:
        return None
    order = [p for lin in linears for p in (lin.weight, lin.bias)]
    if len(order) != len(named) or any(a is not b for a, (_, b) in zip(order, named)):
        return None  # parameters registered in chain order: theta's layout is the MLP's
    widths = (linears[0].in_features, *(lin.out_features for lin in linears))
    if any(a.out_features != b.in_features for a, b in zip(linears, linears[1:])):
        return None
    return widths, (acts[0] if acts else "tanh")


_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _hooked(module: nn.Module) -> bool:
    """Whether a hook (on any submodule, or global) or an overridden ``__call__`` could change
    what the module computes behind the trace's back."""
    from torch.nn.modules import module as M

    if any(getattr(M, g, None) for g in ("_global_forward_hooks", "_global_forward_pre_hooks",
                                          "_global_backward_hooks",
                                          "_global_backward_pre_hooks")):
        return True
    for m in module.modules():
        if type(m).__call__ is not nn.Module.__call__:
            return True
        if any(getattr(m, h, None) for h in _HOOKS):
            return True
    return False


def _close(a, b, rtol) -> bool:
    if a.shape != b.shape or not bool(torch.isfinite(a).all()):
        return False
    scale = float(b.abs().max()) or 1.0
    return float((a - b).abs().max()) <= rtol * scale


def matches(model, x: torch.Tensor, theta: torch.Tensor, y: torch.Tensor | None = None, *,
            rtol: float | None = None) -> bool:
    """Whether the hand-derived chain (``model`` an MLPModel) computes what the module does on a
    batch x (labels y): its outputs, and with y its gradient and the HVPs of two random
    directions, against torch.func's of the module. ``rtol`` defaults to 1e3 eps of the dtype."""
    if rtol is None:
        rtol = 1e3 * torch.finfo(theta.dtype).eps
    try:
        with torch.no_grad():
            want = model.forward(theta, x)
            ps = model.unflatten(theta)
            got = model._forward(ps, x, [None] * (len(model.widths) - 2))[2]
        if not _close(got, want, rtol):
            return False
        if y is None:
            return True
        return grad_hvp_matches(model, theta, x, y, rtol)
    except Exception:  # noqa: BLE001 - shapes the chain does not fit: not an MLP after all
        return False


def grad_hvp_matches(model, theta, x, y, rtol) -> bool:
    """Whether ``model.grad_hvp`` (hand-derived) gives torch.func's gradient and the HVPs of two
    random directions (seeded) through the module on the batch (x, y), to ``rtol`` of the largest
    entry; each direction alone too (a block of one may take other paths), once through
    ``grad_hvp`` and once through ``hvp``. Shared by the MLP chain's and the traced plan's
    checks."""
    from .base import Model

    gen = torch.Generator(device=theta.device).manual_seed(0)
    V = torch.randn(2, theta.numel(), generator=gen, dtype=theta.dtype, device=theta.device)
    g, hv = model.grad_hvp(theta, x, y, V)
    g_ref, hv_ref = Model.grad_hvp(model, theta, x, y, V)  # torch.func, through the module
    return (_close(g, g_ref, rtol) and _close(hv, hv_ref, rtol)
            and _close(model.grad_hvp(theta, x, y, V[:1])[1], hv_ref[:1], rtol)
            and _close(model.hvp(theta, x, y, V[1:]), hv_ref[1:], rtol))
