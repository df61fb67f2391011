r"""Hand-derived block HVPs for a user's module built from common layers.

A module whose forward ``torch.fx`` can trace, and whose every op on parameter-dependent values is
one :mod:`tjac.models.rules` knows (Linear, Conv2d, BatchNorm, LayerNorm, Embedding, ReLU, GELU,
tanh, sigmoid, SiLU, softmax, max pooling, dropout, +, -, *, / by a constant, matmul, masked_fill,
reshapes, transposes, slices, split/chunk, sums and means), gets :class:`GraphModel`: the gradient
and the block Hessian-vector product (g, H V) of each minibatch come from one forward, one tangent
forward and one backward that carries each adjoint together with its k tangents, with the block
folded into convolution batches and broadcast through matmuls. torch.func's forward-over-reverse
computes the same numbers through vmap's batching rules and an elementwise backward of every
normalisation; the two are measured side by side in ``benchmarks/bench_hand.py`` (BENCHMARKS.md
"Hand-derived rules for user modules").

Ops on values that do not depend on theta (the input's reshape, masks, position indices, shape
arithmetic) run as the module runs them. Anything else (an op without a rule, control flow the
trace cannot read, a hook, a loss other than cross-entropy or MSE) leaves the module on the generic
path. A recognised module is then checked numerically on a batch of the training data before it is
used (outputs, gradient and the HVPs of two random directions, as a block and each alone,
against torch.func's, to 1e3 eps of the dtype), as MLP chains are (:mod:`tjac.models.chain`).
Training itself keeps torch.func's gradient, so trained trajectories do not change.
``Problem(recipe, model_backend="func")`` keeps torch.func for everything (the oracle in tests).
"""

from __future__ import annotations

import builtins
import operator

import torch
import torch.nn.functional as F
from torch import nn

from . import rules as R
from .base import Model
from .chain import _hooked, grad_hvp_matches
from .layers import LayerNorm as TjacLayerNorm
from .layers import SeededDropout
from .losses import cross_entropy_adjoint, cross_entropy_adjoint_tangent


class Unsupported(Exception):
    """The module has an op without a hand-derived rule (the message names it)."""


class _Tracer(torch.fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return isinstance(m, (TjacLayerNorm, SeededDropout)) or super().is_leaf_module(m, qualname)


_UNARY_F = {F.relu: "relu", torch.relu: "relu", torch.tanh: "tanh", F.tanh: "tanh",
            torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", F.silu: "silu"}
_UNARY_M = {"relu": "relu", "tanh": "tanh", "sigmoid": "sigmoid"}
_UNARY_MOD = {nn.ReLU: "relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.SiLU: "silu"}
_RESHAPE_M = ("reshape", "view", "flatten", "unsqueeze", "squeeze", "contiguous")
_RESHAPE_F = (torch.reshape, torch.flatten, torch.unsqueeze, torch.squeeze)
_SHAPE_ATTRS = ("shape", "dtype", "device", "ndim", "is_cuda")


class Step:
    """One op of the plan: ``rule`` applied to ``srcs`` (fx nodes, ('p', name) parameters or
    constants) with constant arguments ``attrs`` (fx nodes inside are read at run time)."""

    __slots__ = ("node", "rule", "srcs", "attrs")

    def __init__(self, node, rule, srcs, attrs=None):
        self.node, self.rule, self.srcs, self.attrs = node, rule, srcs, attrs or {}


class _Dropout:
    @staticmethod
    def fwd(xs, a):
        m = a["mod"]
        if not m.training or m.p == 0.0:
            return xs[0], None
        mask = m.mask(xs[0].shape, dtype=xs[0].dtype, device=xs[0].device)
        return xs[0] * mask, mask

    @staticmethod
    def jvp(xs, dxs, y, ctx, a):
        return dxs[0] if ctx is None else dxs[0] * ctx

    @staticmethod
    def bwd(xs, dxs, y, dy, ctx, a, gy, dgy, need):
        return [(gy, dgy) if ctx is None else (gy * ctx, dgy * ctx)]


class _Pick:  # an element of a split's tuple (the interpreter routes its adjoint)
    pass


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class Plan:
    """The ops of a traced module (see the module docstring); :meth:`run` evaluates them."""

    def __init__(self, module: nn.Module, loss: str):
        if loss not in ("cross_entropy", "mse"):
            raise Unsupported(f"loss {loss!r}")
        self.loss = loss
        self.module = module
        try:
            graph = _Tracer().trace(module)
        except Exception as e:  # noqa: BLE001 - anything fx cannot read stays generic
            raise Unsupported(f"torch.fx cannot trace the module: {type(e).__name__}: "
                              f"{e}") from None
        self.mods = dict(module.named_modules())
        self.pid = {id(p): n for n, p in module.named_parameters() if p.requires_grad}
        self.live: set = set()
        self.param_nodes: set = set()
        self.steps: list = []
        self.output = None
        self.input = None
        for node in graph.nodes:
            self._plan(node)
        if self.output is None or self.output not in self.live:
            raise Unsupported("the output does not depend on the parameters")

    # -- planning -------------------------------------------------------------------------------
    def _param(self, p):
        """A module's parameter as a source: ('p', name) if trainable, else the tensor."""
        if p is None:
            return None
        name = self.pid.get(id(p))
        return ("p", name) if name is not None else p

    def _live(self, s) -> bool:
        return (isinstance(s, torch.fx.Node) and s in self.live) or isinstance(s, tuple) and (
            len(s) == 2 and s[0] == "p")

    def _add(self, node, rule, srcs, attrs=None):
        self.steps.append(Step(node, rule, srcs, attrs))
        self.live.add(node)

    def _plan(self, node):
        op, args = node.op, node.args
        if op == "placeholder":
            if self.input is not None:
                raise Unsupported("more than one input")
            self.input = node
            self.steps.append(Step(node, "input", []))
            return
        if op == "output":
            if not isinstance(args[0], torch.fx.Node):
                raise Unsupported("the output is not one tensor")
            self.output = args[0]
            return
        if op == "get_attr":
            obj = self.module
            for part in node.target.split("."):
                obj = getattr(obj, part)
            src = self._param(obj) if isinstance(obj, nn.Parameter) else None
            if isinstance(src, tuple):
                self._add(node, "param", [src])
                self.param_nodes.add(node)
            else:
                self.steps.append(Step(node, "const", [], {"value": obj}))
            return
        inputs = node.all_input_nodes
        live_in = any(n in self.live for n in inputs)
        if op == "call_module":
            m = self.mods[node.target]
            if any(p.requires_grad for p in m.parameters()) or live_in:
                return self._module(node, m)
        elif live_in:
            return self._function(node)
        self.steps.append(Step(node, "eval", []))  # a constant of the replay, run as written

    def _module(self, node, m):
        x = node.args[0] if node.args else None
        if len(node.args) != 1 or node.kwargs or not isinstance(x, torch.fx.Node):
            raise Unsupported(f"{type(m).__name__} called with extra arguments")
        if isinstance(m, nn.Linear):
            return self._add(node, R.Linear, [x, self._param(m.weight), self._param(m.bias)])
        if isinstance(m, nn.Conv2d):
            if m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str):
                raise Unsupported("Conv2d with groups, a padding mode or string padding")
            return self._add(node, R.Conv2d, [x, self._param(m.weight), self._param(m.bias)],
                             dict(stride=list(m.stride), padding=list(m.padding),
                                  dilation=list(m.dilation)))
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if m.training is False or m.running_mean is not None:
                raise Unsupported("BatchNorm on running statistics")
            return self._add(node, R.BatchNorm, [x, self._param(m.weight), self._param(m.bias)],
                             dict(eps=m.eps))
        if isinstance(m, nn.LayerNorm):
            if len(m.normalized_shape) != 1:
                raise Unsupported("LayerNorm over more than the last dim")
            return self._add(node, R.LayerNorm, [x, self._param(m.weight), self._param(m.bias)],
                             dict(eps=m.eps))
        if isinstance(m, TjacLayerNorm):
            return self._add(node, R.LayerNorm, [x, self._param(m.gain), self._param(m.shift)],
                             dict(eps=m.eps))
        if isinstance(m, nn.Embedding):
            if m.max_norm is not None or m.scale_grad_by_freq or m.sparse:
                raise Unsupported("Embedding with max_norm, scale_grad_by_freq or sparse")
            return self._add(node, R.Embedding, [x, self._param(m.weight)],
                             dict(padding_idx=m.padding_idx))
        if any(p.requires_grad for p in m.parameters()):
            raise Unsupported(f"{type(m).__name__} has parameters and no rule")
        if type(m) in _UNARY_MOD:
            return self._add(node, R.Unary, [x], dict(fn=_UNARY_MOD[type(m)]))
        if isinstance(m, nn.GELU):
            return self._add(node, R.Unary, [x], dict(
                fn="gelu_tanh" if m.approximate == "tanh" else "gelu"))
        if isinstance(m, nn.Softmax):
            if m.dim is None:
                raise Unsupported("Softmax without dim")
            return self._add(node, R.Softmax, [x], dict(dim=m.dim))
        if isinstance(m, SeededDropout):
            return self._add(node, _Dropout, [x], dict(mod=m))
        if isinstance(m, nn.Identity):
            return self._add(node, R.Reshape, [x], dict(fn=lambda t: t))
        if isinstance(m, nn.Flatten):
            return self._add(node, R.Reshape, [x], dict(fn=m))
        if isinstance(m, nn.MaxPool2d):
            if m.return_indices:
                raise Unsupported("MaxPool2d with return_indices")
            return self._add(node, R.MaxPool2d, [x], dict(
                kernel=m.kernel_size, stride=m.stride or m.kernel_size, padding=m.padding,
                dilation=m.dilation, ceil=m.ceil_mode))
        if isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size in (1, (1, 1)):
            return self._add(node, R.Reduce, [x], dict(dims=(-2, -1), keepdim=True, mean=True))
        raise Unsupported(f"no rule for {type(m).__name__}")

    def _function(self, node):
        t, args, kw = node.target, node.args, dict(node.kwargs)
        m = node.op == "call_method"
        x = args[0] if args else None
        rest = args[1:]

        def one(name, default=None, pos=0):
            return kw.get(name, rest[pos] if len(rest) > pos else default)

        if t in (operator.add, torch.add) or m and t == "add":
            if kw or len(args) != 2:
                raise Unsupported("add with alpha")
            return self._add(node, R.Add, list(args), dict(alpha=1))
        if t in (operator.sub, torch.sub) or m and t == "sub":
            if kw or len(args) != 2:
                raise Unsupported("sub with alpha")
            return self._add(node, R.Add, list(args), dict(alpha=-1))
        if t in (operator.mul, torch.mul) or m and t == "mul":
            return self._add(node, R.Mul, list(args))
        if t in (operator.truediv, torch.div) or m and t == "div":
            if kw or self._live(args[1]):
                raise Unsupported("division by a parameter-dependent value")
            return self._add(node, R.Div, list(args))
        if t in (operator.neg, torch.neg) or m and t == "neg":
            return self._add(node, R.Neg, [x])
        if t in (operator.matmul, torch.matmul, torch.bmm) or m and t == "matmul":
            return self._add(node, R.MatMul, list(args))
        if t is F.linear:
            w, b = one("weight", pos=0), one("bias", pos=1)
            if self._live(b) is False and b is not None and not isinstance(b, torch.fx.Node):
                raise Unsupported("linear with a constant bias")
            return self._add(node, R.Linear, [x, w, b])
        if t is F.conv2d:
            w, b = one("weight", pos=0), one("bias", pos=1)
            stride, pad = one("stride", 1, 2), one("padding", 0, 3)
            dil, groups = one("dilation", 1, 4), one("groups", 1, 5)
            if groups != 1 or isinstance(pad, str):
                raise Unsupported("conv2d with groups or string padding")
            two = (lambda v: list(v) if isinstance(v, (tuple, list)) else [v, v])
            return self._add(node, R.Conv2d, [x, w, b],
                             dict(stride=two(stride), padding=two(pad), dilation=two(dil)))
        if t in _UNARY_F or m and t in _UNARY_M:
            if len(args) != 1 or kw.get("inplace"):
                raise Unsupported(f"{t} with extra arguments")
            return self._add(node, R.Unary, [x], dict(fn=_UNARY_F.get(t) or _UNARY_M[t]))
        if t is F.gelu or m and t == "gelu":
            approx = one("approximate", "none")
            return self._add(node, R.Unary, [x],
                             dict(fn="gelu_tanh" if approx == "tanh" else "gelu"))
        if t in (torch.softmax, F.softmax) or m and t == "softmax":
            dim = one("dim")
            if dim is None or kw.get("dtype") is not None or len(rest) > 1:
                raise Unsupported("softmax without dim or with dtype")
            return self._add(node, R.Softmax, [x], dict(dim=dim))
        if t is F.layer_norm:
            shape = one("normalized_shape")
            if not (isinstance(shape, int) or len(shape) == 1):
                raise Unsupported("layer_norm over more than the last dim")
            return self._add(node, R.LayerNorm, [x, one("weight", pos=1), one("bias", pos=2)],
                             dict(eps=one("eps", 1e-5, 3)))
        if t is F.embedding:
            if any(one(n, d, i) != d for n, d, i in (("max_norm", None, 2),
                                                      ("scale_grad_by_freq", False, 4),
                                                      ("sparse", False, 5))):
                raise Unsupported("embedding with max_norm, scale_grad_by_freq or sparse")
            return self._add(node, R.Embedding, [x, one("weight", pos=0)],
                             dict(padding_idx=one("padding_idx", None, 1)))
        if t is F.max_pool2d:
            ks = one("kernel_size", pos=0)
            if one("return_indices", False, 5):
                raise Unsupported("max_pool2d with return_indices")
            return self._add(node, R.MaxPool2d, [x], dict(
                kernel=ks, stride=one("stride", None, 1) or ks, padding=one("padding", 0, 2),
                dilation=one("dilation", 1, 3), ceil=one("ceil_mode", False, 4)))
        if t is F.adaptive_avg_pool2d and one("output_size") in (1, (1, 1)):
            return self._add(node, R.Reduce, [x], dict(dims=(-2, -1), keepdim=True, mean=True))
        if t is torch.masked_fill or m and t == "masked_fill":
            mask, value = one("mask", pos=0), one("value", pos=1)
            if self._live(mask) or not _is_number(value):
                raise Unsupported("masked_fill with a parameter-dependent mask or value")
            return self._add(node, R.MaskedFill, [x, mask], dict(value=value))
        if t in _RESHAPE_F or m and t in _RESHAPE_M:
            fn_args, fn_kw = rest, kw
            if m:
                return self._add(node, R.Reshape, [x], dict(
                    fn=_method(t), args=fn_args, kw=fn_kw))
            return self._add(node, R.Reshape, [x], dict(fn=t, args=fn_args, kw=fn_kw))
        if t in (torch.transpose,) or m and t == "transpose":
            return self._add(node, R.Transpose, [x], dict(d0=one("dim0", pos=0),
                                                          d1=one("dim1", pos=1)))
        if t is builtins.getattr and args[1] in ("T", "mT"):
            return self._add(node, R.Transpose, [x], dict(d0=-2, d1=-1, two_d=args[1] == "T"))
        if t is builtins.getattr and args[1] in _SHAPE_ATTRS:
            self.steps.append(Step(node, "eval", []))
            return None
        if m and t in ("size", "dim"):
            self.steps.append(Step(node, "eval", []))
            return None
        if t is torch.permute or m and t == "permute":
            dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
            return self._add(node, R.Permute, [x], dict(dims=tuple(kw.get("dims", dims))))
        if t in (torch.split, torch.chunk) or m and t in ("split", "chunk"):
            how = "split" if t in (torch.split, "split") else "chunk"
            size = one("split_size_or_sections" if how == "split" else "chunks", pos=0)
            if not isinstance(size, int):
                raise Unsupported(f"{how} into unequal sections")
            return self._add(node, R.Split, [x], dict(how=how, size=size, dim=one("dim", 0, 1)))
        if t is operator.getitem:
            src = args[0]
            if isinstance(src, torch.fx.Node) and self._is_split(src):
                if not isinstance(args[1], int):
                    raise Unsupported("a slice of a split")
                return self._add(node, _Pick, [src], dict(i=args[1]))
            idx = args[1] if isinstance(args[1], tuple) else (args[1],)
            if not all(i is None or i is Ellipsis or isinstance(i, (int, slice)) for i in idx):
                raise Unsupported("advanced indexing")
            return self._add(node, R.Index, [x], dict(idx=idx))
        if t in (torch.mean, torch.sum) or m and t in ("mean", "sum"):
            if kw.get("dtype") is not None:
                raise Unsupported(f"{t} with dtype")
            dims = kw.get("dim", rest[0] if rest else None)
            if isinstance(dims, int):
                dims = (dims,)
            keep = kw.get("keepdim", rest[1] if len(rest) > 1 else False)
            return self._add(node, R.Reduce, [x], dict(
                dims=None if dims is None else tuple(dims), keepdim=bool(keep),
                mean=t in (torch.mean, "mean")))
        raise Unsupported(f"no rule for {getattr(t, '__name__', t)}")

    def _is_param(self, s) -> bool:
        """A trainable parameter as a source: ('p', name), or a get_attr node that reads one."""
        return isinstance(s, tuple) or s in self.param_nodes

    def _is_split(self, node) -> bool:
        return any(s.node is node and s.rule is R.Split for s in self.steps)

    # -- running ----------------------------------------------------------------------------------
    def run(self, ps: dict, dps: dict, x, y, *, grad: bool = True):
        """(outputs, gradient dict, HVP dict) for the parameters ``ps`` (name -> tensor), the
        block of tangents ``dps`` (name -> (k, *shape)) and the batch (x, y). ``grad`` False:
        the gradient is not wanted (a VJP's HVPs), and the rules skip the products that only it
        needs (the gradient dict is then partial)."""
        env, tan, rec = {}, {}, {}

        def val(s):
            if isinstance(s, torch.fx.Node):
                return env[s]
            if isinstance(s, tuple) and len(s) == 2 and s[0] == "p":
                return ps[s[1]]
            return s

        def dval(s):
            if isinstance(s, torch.fx.Node):
                return tan.get(s)
            if isinstance(s, tuple) and len(s) == 2 and s[0] == "p":
                return dps[s[1]]
            return None

        for st in self.steps:
            n, rule = st.node, st.rule
            if rule == "input":
                env[n] = x
            elif rule == "const":
                env[n] = st.attrs["value"]
            elif rule == "eval":
                env[n] = _evaluate(n, env, self.mods)
            elif rule == "param":
                env[n], tan[n] = val(st.srcs[0]), dval(st.srcs[0])
            elif rule is _Pick:
                i = st.attrs["i"]
                env[n], tan[n] = env[st.srcs[0]][i], tan[st.srcs[0]][i]
            else:
                xs = [val(s) for s in st.srcs]
                dxs = [dval(s) for s in st.srcs]
                a = torch.fx.node.map_arg(st.attrs, lambda v: env[v])
                if a.get("two_d") and xs[0].ndim != 2:
                    raise Unsupported(".T of a tensor that is not 2-D")
                yv, ctx = rule.fwd(xs, a)
                env[n] = yv
                tan[n] = rule.jvp(xs, dxs, yv, ctx, a)
                rec[n] = (xs, dxs, ctx, a)
        out, dout = env[self.output], tan[self.output]
        g0, dg0 = self._loss_adjoint(out, dout, y)
        grads, hvs = {}, {}
        adj = {self.output: [g0, dg0]}
        for st in reversed(self.steps):
            n = st.node
            if n not in adj or n not in self.live:
                continue
            gy, dgy = adj.pop(n)
            if st.rule == "param":
                self._acc(grads, hvs, st.srcs[0][1], gy, dgy)
                continue
            if st.rule is _Pick:
                slot = adj.setdefault(st.srcs[0], [[None] * len(env[st.srcs[0]]),
                                                   [None] * len(env[st.srcs[0]])])
                i = st.attrs["i"]
                slot[0][i] = gy if slot[0][i] is None else slot[0][i] + gy
                slot[1][i] = dgy if slot[1][i] is None else slot[1][i] + dgy
                continue
            xs, dxs, ctx, a = rec[n]
            need = [self._live(s) and (grad or not self._is_param(s) or R.TANGENT)
                    for s in st.srcs]
            res = st.rule.bwd(xs, dxs, env[n], tan[n], ctx, a, gy, dgy, need)
            for s, r in zip(st.srcs, res):
                if r is None or not self._live(s):
                    continue
                if isinstance(s, tuple):
                    self._acc(grads, hvs, s[1], *r)
                elif s in adj:
                    adj[s][0] = R._add(adj[s][0], r[0])
                    adj[s][1] = adj[s][1] + r[1]
                else:
                    adj[s] = [r[0], r[1]]
        return out, grads, hvs

    @staticmethod
    def _acc(grads, hvs, name, g, dg):
        if name in hvs:
            if g is not None:
                grads[name] = g if grads.get(name) is None else grads[name] + g
            hvs[name] = hvs[name] + dg
        else:
            grads[name], hvs[name] = g, dg

    def _loss_adjoint(self, z, dz, y):
        """The loss's gradient in the outputs and its tangent (batch mean)."""
        if self.loss == "cross_entropy":
            if z.ndim != 2:
                raise Unsupported("cross-entropy on outputs that are not (batch, classes)")
            p, g = cross_entropy_adjoint(z, y)
            return g, cross_entropy_adjoint_tangent(p, dz)
        t = y.reshape(z.shape) if y.shape != z.shape else y
        n = z.numel()
        return 2.0 * (z - t) / n, 2.0 * dz / n


def _method(name):
    return lambda t, *a, **k: getattr(t, name)(*a, **k)


def _evaluate(node, env, mods):
    args = torch.fx.node.map_arg(node.args, lambda v: env[v])
    kw = torch.fx.node.map_arg(node.kwargs, lambda v: env[v])
    if node.op == "call_module":
        return mods[node.target](*args, **kw)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kw)
    return node.target(*args, **kw)


class GraphModel(Model):
    """A :class:`Model` whose ``grad_hvp`` is the plan's (module docstring); ``grad`` (training)
    stays torch.func's."""

    def __init__(self, module: nn.Module, loss, *, loss_name: str, **kw):
        super().__init__(module, loss, **kw)
        if _hooked(self._fmodule):
            raise Unsupported("a hook or an overridden __call__")
        self.plan = Plan(self._fmodule, loss_name)

    def compile_grad_hvp(self, theta, x, y, V):
        """torch.func's (g, H V), for the compiled backend to compile."""
        return Model.grad_hvp(self, theta, x, y, V)

    def grad_hvp(self, theta, x, y, V):
        out, grads, hvs = self.plan.run(self.params(theta), self.params(V), x, y)
        g = torch.cat([grads[p.name].reshape(-1) if p.name in grads
                       else theta.new_zeros(p.size) for p in self.layout])
        return g, self._flat_hv(hvs, V)

    def hvp(self, theta, x, y, V):
        """H V alone: the plan's backward skips the products only the gradient needs."""
        _, _, hvs = self.plan.run(self.params(theta), self.params(V), x, y, grad=False)
        return self._flat_hv(hvs, V)

    def _flat_hv(self, hvs: dict, V):
        """The plan's HVP dict as a (k, P) block in layout order (zeros where H V is zero)."""
        k = V.shape[0]
        return torch.cat([hvs[p.name].reshape(k, -1) if p.name in hvs
                          else V.new_zeros(k, p.size) for p in self.layout], 1)


def matches(model: GraphModel, x, theta, y, *, rtol: float | None = None) -> bool:
    """Whether the plan computes what the module does on the batch (x, y): the gradient and the
    HVPs of two random directions (as a block and each alone) against torch.func's, to ``rtol``
    (default 1e3 eps of the dtype) of the largest entry
    (:func:`tjac.models.chain.grad_hvp_matches`)."""
    if rtol is None:
        rtol = 1e3 * torch.finfo(theta.dtype).eps
    try:
        return grad_hvp_matches(model, theta, x, y, rtol)
    except Exception:  # noqa: BLE001 - shapes or ops the plan does not fit: the generic path
        return False
