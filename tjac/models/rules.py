r"""Hand-derived tangent and adjoint rules of the ops :mod:`tjac.models.graph` interprets.

Every rule is a class with three static methods over one op y = f(x_1, ..., x_n):

``fwd(xs, a)``
    the primal value y and whatever the other two reuse (``ctx``);
``jvp(xs, dxs, y, ctx, a)``
    the tangent dy = sum_i (df/dx_i) dx_i for a block of k tangents: ``dxs[i]`` is (k, *x_i.shape),
    or None where x_i does not depend on theta (a zero tangent);
``bwd(xs, dxs, y, dy, ctx, a, gy, dgy, need)``
    the adjoints of the inputs, gx_i = (df/dx_i)^T gy, *and their tangents*
    dgx_i = (df/dx_i)^T dgy + (d/dtheta (df/dx_i)^T)[dtheta] gy (the second-order term: zero for
    ops linear in each input), as a list of (gx_i, dgx_i) pairs, None where ``need[i]`` is False.
    gy is the primal adjoint (shape of y); dgy its block of tangents (k, *y.shape).
    ``need[i]`` is :data:`TANGENT` where x_i is a parameter whose gradient the caller discards
    (a VJP's HVPs): only dgx_i is needed, and rules whose gx_i costs a product of its own
    (Linear, Conv2d, MatMul, Embedding) return None for it.

``a`` holds the op's constant arguments. With these, one forward, one tangent forward and one
backward carrying (adjoint, tangent of the adjoint) give the gradient and the block
Hessian-vector product H V of a loss, as :meth:`tjac.models.mlp.MLPModel.grad_hvp` does for MLPs.
The tangent passes fold the block into the batch (convolutions, pooling) or broadcast over it
(matmuls), so k tangents cost one call per term instead of k.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_SQRT1_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_C = math.sqrt(2.0 / math.pi)
_A = 0.044715


# -- broadcasting helpers ------------------------------------------------------------------------
def lift(d: torch.Tensor, ndim: int) -> torch.Tensor:
    """A tangent block (k, *s) viewed as (k, 1, ..., 1, *s) with ``ndim`` dims after k, so that it
    broadcasts against (k, *out) the way s broadcasts against out."""
    extra = ndim - (d.ndim - 1)
    return d if extra <= 0 else d.reshape(d.shape[0], *([1] * extra), *d.shape[1:])


def sum_to(t: torch.Tensor, shape, batched: bool) -> torch.Tensor:
    """``t`` (with a leading block dim when ``batched``) summed down to ``shape`` (broadcasting's
    adjoint)."""
    o = 1 if batched else 0
    lead = t.ndim - o - len(shape)
    if lead > 0:
        t = t.sum(tuple(range(o, o + lead)))
    dims = tuple(i + o for i, n in enumerate(shape) if n == 1 and t.shape[i + o] != 1)
    if dims:
        t = t.sum(dims, keepdim=True)
    return t


TANGENT = "tangent"  # see the module docstring: dgx_i only


def _primal(need_i) -> bool:
    """Whether the adjoint gx_i itself is wanted (``need[i]`` True, not :data:`TANGENT`)."""
    return need_i is True


def _shape(x):
    return x.shape if isinstance(x, torch.Tensor) else ()


def _add(a, b):
    if a is None:
        return b
    return a if b is None else a + b


# -- linear maps with parameters -----------------------------------------------------------------
class Linear:
    """y = x W^T + b over the last dim of x."""

    @staticmethod
    def fwd(xs, a):
        x, W, b = xs
        return F.linear(x, W, b), None

    @staticmethod
    def jvp(xs, dxs, y, ctx, a):
        x, W, b = xs
        dx, dW, db = dxs
        out = None
        if dx is not None:
            out = dx @ W.T
        if dW is not None:
            k = dW.shape[0]
            out = _add(out, torch.matmul(x.reshape(-1, x.shape[-1]), dW.mT).view(k, *y.shape))
        if db is not None:
            out = _add(out, lift(db, y.ndim))
        return out

    @staticmethod
    def bwd(xs, dxs, y, dy, ctx, a, gy, dgy, need):
        x, W, b = xs
        dx, dW, db = dxs
        k, n_out, n_in = dgy.shape[0], y.shape[-1], x.shape[-1]
        gy2, dgy2, x2 = gy.reshape(-1, n_out), dgy.reshape(k, -1, n_out), x.reshape(-1, n_in)
        res = [None, None, None]
        if need[0]:
            dgx = dgy @ W
            if dW is not None:
                dgx = dgx + torch.matmul(gy2, dW).view(k, *x.shape)
            res[0] = (gy @ W, dgx)
        if need[1]:
            dgW = dgy2.mT @ x2
            if dx is not None:
                dgW = dgW + gy2.T @ dx.reshape(k, -1, n_in)
            res[1] = (gy2.T @ x2 if _primal(need[1]) else None, dgW)
        if need[2]:
            res[2] = (gy2.sum(0) if _primal(need[2]) else None, dgy2.sum(1))
        return res


def _conv_backward(go, inp, w, a, groups, mask):
    return torch.ops.aten.convolution_backward(go, inp, w, None, a["stride"], a["padding"],
                                               a["dilation"], False, [0, 0], groups, mask)


class Conv2d:
    """y = conv2d(x, W) + b (zero padding, one group). The block's tangents are folded into the
    batch (dx) or into the output channels (dW), so each term is one convolution."""

    @staticmethod
    def fwd(xs, a):
        x, W, b = xs
        return F.conv2d(x, W, b, a["stride"], a["padding"], a["dilation"]), None

    @staticmethod
    def jvp(xs, dxs, y, ctx, a):
        x, W, b = xs
        dx, dW, db = dxs
        out = None
        if dx is not None:
            k = dx.shape[0]
            out = F.conv2d(dx.flatten(0, 1), W, None, a["stride"], a["padding"],
                           a["dilation"]).view(k, *y.shape)
        if dW is not None:
            k, B, C = dW.shape[0], y.shape[0], y.shape[1]
            t = F.conv2d(x, dW.flatten(0, 1), None, a["stride"], a["padding"], a["dilation"])
            out = _add(out, t.view(B, k, C, *y.shape[2:]).transpose(0, 1))
        if db is not None:
            out = _add(out, db[:, None, :, None, None])
        return out

    @staticmethod
    def bwd(xs, dxs, y, dy, ctx, a, gy, dgy, need):
        x, W, b = xs
        dx, dW, db = dxs
        k, B, Cin, Cout = dgy.shape[0], x.shape[0], x.shape[1], y.shape[1]
        res = [None, None, None]
        mask = (bool(need[0]), _primal(need[1]), False)
        gx, gW, gb = _conv_backward(gy, x, W, a, 1, mask) if any(mask) else (None,) * 3
        dgx = dgW = None
        # dgy's terms: the input adjoint with the block folded into the batch, the weight
        # adjoint with the block folded into the output channels
        if need[0]:
            shape = (k * B, *x.shape[1:])
            dgx = _conv_backward(dgy.flatten(0, 1), dgy.new_empty(1).expand(shape), W, a, 1,
                                 (True, False, False))[0].view(k, *x.shape)
        if need[1]:
            go = dgy.transpose(0, 1).reshape(B, k * Cout, *y.shape[2:])
            dgW = _conv_backward(go, x, W.new_empty(1).expand(k * Cout, *W.shape[1:]), a, 1,
                                 (False, True, False))[1].view(k, *W.shape)
        # dW's and dx's terms against gy: one grouped convolution (k groups) gives both
        if dW is not None and need[0] or dx is not None and need[1]:
            rep = gy.repeat(1, k, 1, 1)
            if dx is not None:
                inp = dx.transpose(0, 1).reshape(B, k * Cin, *x.shape[2:])
            else:
                inp = gy.new_empty(1).expand(B, k * Cin, *x.shape[2:])
            w = (dW.flatten(0, 1) if dW is not None
                 else W.new_empty(1).expand(k * Cout, *W.shape[1:]))
            mask = (dW is not None and bool(need[0]), dx is not None and bool(need[1]), False)
            cx, cW, _ = _conv_backward(rep, inp, w, a, k, mask)
            if mask[0]:
                dgx = dgx + cx.view(B, k, Cin, *x.shape[2:]).transpose(0, 1)
            if mask[1]:
                dgW = dgW + cW.view(k, *W.shape)
        if need[0]:
            res[0] = (gx, dgx)
        if need[1]:
            res[1] = (gW, dgW)
        if need[2]:
            res[2] = (gy.sum((0, 2, 3)) if _primal(need[2]) else None, dgy.sum((1, 3, 4)))
        return res


class _Norm:
    """Shared by :class:`BatchNorm` and :class:`LayerNorm`: y = gain * xh + shift with
    xh = (x - mean) / sqrt(var + eps) (biased variance) over the op's reduction dims; gain and
    shift optional. With rs = 1/sqrt(var + eps) and M the mean over those dims, a tangent dx gives
    dxh = rs dx + c1 xh + c0, c1 = -rs M[dx xh], c0 = -rs M[dx]; the rules below expand every
    product of the backward and its tangent into a few passes over the (k, ...) blocks."""

    @classmethod
    def fwd(cls, xs, a):
        x, gain, shift = xs
        xh, mean, rs = cls.normalize(x, a["eps"])  # torch's fused kernel: one statistics pass
        if gain is not None and shift is not None:
            y = torch.addcmul(cls.pview(shift, x), xh, cls.pview(gain, x))
        elif gain is not None:
            y = xh * cls.pview(gain, x)
        else:
            y = xh if shift is None else xh + cls.pview(shift, x)
        return y, {"dims": cls.dims(x), "rs": rs, "xh": xh, "mean": mean}

    @classmethod
    def _c(cls, dx, ctx):
        """(c0, c1) of the module docstring, per group and tangent."""
        bd = tuple(d + 1 for d in ctx["dims"])
        rs = ctx["rs"]
        return -rs * dx.mean(bd, keepdim=True), -rs * (dx * ctx["xh"]).mean(bd, keepdim=True)


class BatchNorm(_Norm):
    """Batch norm in train mode: statistics over every dim but the channel dim 1, one gain and
    shift per channel."""

    @staticmethod
    def dims(x):
        return (0, *range(2, x.ndim))

    @staticmethod
    def _fused_bwd(t, x, gain, ctx, a, mask):
        """torch's fused batch-norm backward of ``t``: (rs g (t - M[t] - xh M[t xh]) or None,
        sum(t xh), sum(t)) per ``mask``. ``t`` is expanded to x's shape first (the kernel reads it
        as x-shaped; a tangent may be broadcast-shaped, e.g. a frozen convolution's bias term);
        ones stand in for a missing gain (the kernel's weight gradient needs one on CUDA)."""
        t = t if t.shape == x.shape else t.expand_as(x).contiguous()
        gain = gain if gain is not None else x.new_ones(x.shape[1])
        return torch.ops.aten.native_batch_norm_backward(
            t, x, gain, None, None, ctx["mean"], ctx["rs"].reshape(-1), True, a["eps"], mask)

    @staticmethod
    def normalize(x, eps):
        """(xh, mean, rs): mean (C,), rs shaped (1, C, 1, ..., 1)."""
        xh, mean, rs = torch.ops.aten.native_batch_norm(x, None, None, None, None, True, 0.0, eps)
        return xh, mean, rs.view(1, -1, *([1] * (x.ndim - 2)))

    @staticmethod
    def pview(p, x):  # (C,) -> (C, 1, ..., 1); a block (k, C) -> (k, 1, C, 1, ..., 1)
        if p.ndim == 1:
            return p.view(-1, *([1] * (x.ndim - 2)))
        return p.view(p.shape[0], 1, -1, *([1] * (x.ndim - 2)))

    @classmethod
    def jvp(cls, xs, dxs, y, ctx, a):
        x, gain, shift = xs
        dx, dgain, dshift = dxs
        xh, rs = ctx["xh"], ctx["rs"]
        g = 1.0 if gain is None else cls.pview(gain, x)
        k = next(d for d in dxs if d is not None).shape[0]
        if dx is not None and k == 1:
            # g dxh for one tangent is torch's fused batch-norm backward applied to dx, whose
            # two sums give c0 and c1
            n = x.numel() // x.shape[1]
            out, sdx, sd = cls._fused_bwd(dx[0], x, gain, ctx, a, [True, True, True])
            c0, c1 = -rs * (sd / n).view(rs.shape), -rs * (sdx / n).view(rs.shape)
            ctx["c"] = c0.unsqueeze(0), c1.unsqueeze(0)
            out = out.unsqueeze(0)
            if dgain is not None:
                out.addcmul_(xh, cls.pview(dgain, x))
            if dshift is not None:
                out.add_(cls.pview(dshift, x))
            return out
        c1 = c0 = 0.0
        if dx is not None:
            c0, c1 = ctx["c"] = cls._c(dx, ctx)
        coef1 = g * c1 + (0.0 if dgain is None else cls.pview(dgain, x))
        coef0 = g * c0 + (0.0 if dshift is None else cls.pview(dshift, x))
        out = torch.mul(xh, coef1) if isinstance(coef1, torch.Tensor) else None
        if out is None:
            out = xh.new_zeros(k, *y.shape)
        elif out.shape[0] != k or out.ndim != y.ndim + 1:
            out = out.expand(k, *y.shape).clone()
        if isinstance(coef0, torch.Tensor):
            out.add_(coef0)
        if dx is not None:
            out.addcmul_(dx, g * rs)
        return out

    @classmethod
    def bwd(cls, xs, dxs, y, dy, ctx, a, gy, dgy, need):
        x, gain, shift = xs
        dx, dgain, dshift = dxs
        xh, rs, dims = ctx["xh"], ctx["rs"], ctx["dims"]
        bd = tuple(d + 1 for d in dims)
        n = x.numel() // x.shape[1]
        k = dgy.shape[0]
        g = 1.0 if gain is None else cls.pview(gain, x)
        dg = 0.0 if dgain is None else cls.pview(dgain, x)
        # torch's fused batch-norm backward gives gx, sum(gy xh) and sum(gy) in one pass; for one
        # tangent also dgy's part of dgx, rs g (dgy - M[dgy] - xh M[dgy xh]), with its two sums
        gx, sgx, sgy = cls._fused_bwd(gy, x, gain, ctx, a, [bool(need[0]), True, True])
        Mgy, Mgx = (sgy / n).view(rs.shape), (sgx / n).view(rs.shape)
        if k == 1:
            dgx1, sdx, sdy = cls._fused_bwd(dgy[0], x, gain, ctx, a, [bool(need[0]), True, True])
            Mdgy, Mdgx = (sdy / n).view(1, *rs.shape), (sdx / n).view(1, *rs.shape)
        else:
            dgx1 = None
            Mdgy, Mdgx = dgy.mean(bd, keepdim=True), (dgy * xh).mean(bd, keepdim=True)
        c0, c1 = ctx.get("c", (0.0, 0.0))
        Mgdx = (gy * dx).mean(bd, keepdim=True) if dx is not None else 0.0
        res = [None, None, None]
        if need[0]:
            mh, mhx = g * Mgy, g * Mgx
            Mdh = g * Mdgy + dg * Mgy
            Mdhx = g * Mdgx + dg * Mgx
            Mhdxh = rs * g * Mgdx + c1 * mhx + c0 * mh
            aq = rs * c1
            ax = -rs * mhx * c1 - rs * (Mdhx + Mhdxh) - aq * mhx
            a0 = -rs * Mdh - rs * mhx * c0 - aq * mh
            if dgx1 is None:
                dgx = torch.mul(dgy, rs * g)
            else:  # dgy's terms are in dgx1: take them out of ax and a0
                dgx = dgx1.unsqueeze(0)
                ax, a0 = ax + rs * g * Mdgx, a0 + rs * g * Mdgy
            dgx.addcmul_(gy, rs * dg + aq * g).addcmul_(xh, ax).add_(a0)
            if dx is not None:
                dgx.addcmul_(dx, -rs * rs * mhx)
            res[0] = (gx, dgx)
        sq = (lambda t: t.reshape(t.shape[0], -1))  # (k, 1, C, 1, ..) -> (k, C)
        if need[1]:
            dgg = n * (Mdgx + rs * Mgdx + c1 * Mgx + c0 * Mgy)
            res[1] = (sgx, sq(dgg.expand(k, *Mgx.shape)))
        if need[2]:
            res[2] = (sgy, sq(n * Mdgy))
        return res


class LayerNorm(_Norm):
    """Layer norm over the last dim, a gain and shift per feature."""

    @staticmethod
    def dims(x):
        return (x.ndim - 1,)

    @staticmethod
    def normalize(x, eps):
        """(xh, mean, rs), mean and rs shaped (..., 1)."""
        return torch.ops.aten.native_layer_norm(x, [x.shape[-1]], None, None, eps)

    @staticmethod
    def pview(p, x):  # (d,) as it is; a block (k, d) -> (k, 1, ..., 1, d)
        return p if p.ndim == 1 else lift(p, x.ndim)

    @classmethod
    def jvp(cls, xs, dxs, y, ctx, a):
        x, gain, shift = xs
        dx, dgain, dshift = dxs
        xh, rs = ctx["xh"], ctx["rs"]
        k = next(d for d in dxs if d is not None).shape[0]
        if dx is not None:
            c0, c1 = cls._c(dx, ctx)
            dxh = torch.addcmul(c0, xh, c1).addcmul_(dx, rs)
            ctx["dxh"] = dxh
            out = dxh * gain if gain is not None else dxh.clone()
        else:
            out = xh.new_zeros(k, *y.shape)
        if dgain is not None:
            out.addcmul_(xh, cls.pview(dgain, x))
        if dshift is not None:
            out.add_(cls.pview(dshift, x))
        return out

    @classmethod
    def bwd(cls, xs, dxs, y, dy, ctx, a, gy, dgy, need):
        x, gain, shift = xs
        dx, dgain, dshift = dxs
        xh, rs = ctx["xh"], ctx["rs"]
        dxh = ctx.get("dxh")
        lead = tuple(range(x.ndim - 1))
        blead = tuple(d + 1 for d in lead)
        res = [None, None, None]
        if need[0]:
            h = gy * gain if gain is not None else gy
            mh, mhx = h.mean(-1, keepdim=True), (h * xh).mean(-1, keepdim=True)
            q = h - mh - xh * mhx
            dh = dgy * gain if gain is not None else dgy.clone()
            if dgain is not None:
                dh.addcmul_(gy, cls.pview(dgain, x))
            Mdh, Mdhx = dh.mean(-1, keepdim=True), (dh * xh).mean(-1, keepdim=True)
            s = Mdhx
            if dxh is not None:
                s = s + (dxh * h).mean(-1, keepdim=True)
            dq = dh.sub_(Mdh).addcmul_(xh, s, value=-1.0)
            if dxh is not None:
                dq.addcmul_(dxh, mhx, value=-1.0)
            dq.mul_(rs)
            if dxh is not None:
                c1 = -rs * (dx * xh).mean(-1, keepdim=True)
                dq.addcmul_(q, rs * c1)
            res[0] = (q * rs, dq)
        if need[1]:
            t = dgy * xh
            if dxh is not None:
                t.addcmul_(dxh, gy)
            res[1] = ((gy * xh).sum(lead), t.sum(blead))
        if need[2]:
            res[2] = (gy.sum(lead), dgy.sum(blead))
        return res


class Embedding:
    """y = E[idx] (idx not differentiable); the padding row, if any, gets no gradient."""

    @staticmethod
    def fwd(xs, a):
        idx, E = xs
        return F.embedding(idx, E, a["padding_idx"]), None

    @staticmethod
    def jvp(xs, dxs, y, ctx, a):
        idx, E = xs
        return dxs[1][:, idx]

    @staticmethod
    def bwd(xs, dxs, y, dy, ctx, a, gy, dgy, need):
        idx, E = xs
        flat, d, k = idx.reshape(-1), E.shape[-1], dgy.shape[0]
        g = torch.zeros_like(E).index_add_(0, flat, gy.reshape(-1, d)) if _primal(need[1]) else None
        dg = dgy.new_zeros(k, *E.shape).index_add_(1, flat, dgy.reshape(k, -1, d))
        if a["padding_idx"] is not None:
            if g is not None:
                g[a["padding_idx"]] = 0
            dg[:, a["padding_idx"]] = 0
        return [None, (g, dg)]


# -- elementwise nonlinearities ------------------------------------------------------------------
def _gelu_tanh(x):
    """(phi(x), phi'(x), phi''(x)) of the tanh-approximate GELU phi(x) = x (1 + t) / 2,
    t = tanh(u), u = C (x + A x^3), in a dozen passes over x: phi' = (1 + t) / 2 + x s u' / 2 and
    phi'' = s (C + 6 A C x^2 - x t u'^2) with s = 1 - t^2, u' = C (1 + 3 A x^2). One tanh serves
    all three; the temporaries are updated in place (each fresh (batch, width) buffer costs a
    page-fault pass of its own)."""
    x2 = x * x
    t = torch.mul(x2, _C * _A).add_(_C).mul_(x).tanh_()
    h = torch.add(t, 1.0).mul_(0.5)
    y = x * h
    s = torch.mul(t, t).neg_().add_(1.0)
    du = torch.mul(x2, 3.0 * _C * _A).add_(_C)
    d1 = torch.mul(s, du).mul_(x).mul_(0.5).add_(h)
    q = t.mul_(du).mul_(du).mul_(x)
    d2 = x2.mul_(6.0 * _C * _A).add_(_C).sub_(q).mul_(s)
    return y, d1, d2


def _gelu(x):
    """(phi, phi', phi'') of the exact GELU phi(x) = x Phi(x): phi' = Phi + x pdf and
    phi'' = pdf (2 - x^2), pdf the standard normal density."""
    x2 = x * x
    pdf = torch.mul(x2, -0.5).exp_().mul_(_INV_SQRT_2PI)
    cdf = torch.mul(x, _SQRT1_2).erf_().add_(1.0).mul_(0.5)
    y = x * cdf
    d1 = torch.addcmul(cdf, x, pdf)
    d2 = x2.neg_().add_(2.0).mul_(pdf)
    return y, d1, d2


def _relu_mask(t, y):
    """t where y = relu(x) > 0, else 0 (t may carry a leading block dim)."""
    return torch.ops.aten.threshold_backward(t, y, 0)


def _derivs(name, x, y):
    """(phi'(x), phi''(x)) given y = phi(x)."""
    if name == "tanh":
        s = 1.0 - y * y
        return s, -2.0 * y * s
    if name == "sigmoid":
        s = y * (1.0 - y)
        return s, s * (1.0 - 2.0 * y)
    if name == "silu":
        sg = torch.sigmoid(x)
        s = sg * (1.0 - sg)
        return sg + x * s, s * (2.0 + x * (1.0 - 2.0 * sg))
    raise KeyError(name)


_UNARY = {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "silu": F.silu}
_FUSED = {"gelu": _gelu, "gelu_tanh": _gelu_tanh}  # phi and both derivatives in one pass


class Unary:
    """y = phi(x) elementwise (``a["fn"]`` names phi)."""

    @staticmethod
    def fwd(xs, a):
        x, fn = xs[0], a["fn"]
        if fn in _FUSED:
            y, d1, d2 = _FUSED[fn](x)
            return y, (d1, d2)
        y = _UNARY[fn](x)
        if fn == "relu":  # phi' = [y > 0] is applied by torch's kernel; no mask is stored
            return y, None
        return y, _derivs(fn, x, y)

    @staticmethod
    def jvp(xs, dxs, y, ctx, a):
        if ctx is None:
            return _relu_mask(dxs[0], y)
        return ctx[0] * dxs[0]

    @staticmethod
    def bwd(xs, dxs, y, dy, ctx, a, gy, dgy, need):
        if ctx is None:
            return [(_relu_mask(gy, y), _relu_mask(dgy, y))]
        d1, d2 = ctx
        dgx = d1 * dgy
        if d2 is not None:
            dgx.addcmul_(d2 * gy, dxs[0])
        return [(d1 * gy, dgx)]


class Softmax:
    @staticmethod
    def fwd(xs, a):
        return torch.softmax(xs[0], a["dim"]), None

    @staticmethod
    def jvp(xs, dxs, y, ctx, a):
        d = a["dim"] % y.ndim + 1
        t = y * dxs[0]
        return t - y * t.sum(d, keepdim=True)

    @staticmethod
    def bwd(xs, dxs, y, dy, ctx, a, gy, dgy, need):
        dim = a["dim"] % y.ndim
        d = dim + 1
        r = gy - (y * gy).sum(dim, keepdim=True)
        dr = dgy - (dy * gy + y * dgy).sum(d, keepdim=True)
        return [(y * r, dy * r + y * dr)]


class MaxPool2d:
    """Max pooling: y = x at the recorded argmax (piecewise linear: no second-order term)."""

    @staticmethod
    def fwd(xs, a):
        y, idx = F.max_pool2d(xs[0], a["kernel"], a["stride"], a["padding"], a["dilation"],
                              ceil_mode=a["ceil"], return_indices=True)
        return y, idx.flatten(-2)

    @staticmethod
    def jvp(xs, dxs, y, ctx, a):
        dx = dxs[0]
        idx = ctx.expand(dx.shape[0], *ctx.shape)
        return torch.gather(dx.flatten(-2), -1, idx).view(dx.shape[0], *y.shape)

    @staticmethod
    def bwd(xs, dxs, y, dy, ctx, a, gy, dgy, need):
        x = xs[0]
        k = dgy.shape[0]
        gx = x.new_zeros(x.shape).flatten(-2).scatter_add_(-1, ctx, gy.flatten(-2))
        dgx = dgy.new_zeros(k, *x.shape).flatten(-2).scatter_add_(
            -1, ctx.expand(k, *ctx.shape), dgy.flatten(-2))
        return [(gx.view(x.shape), dgx.view(k, *x.shape))]


# -- arithmetic ----------------------------------------------------------------------------------
class Add:
    """y = x0 + alpha x1 (``a["alpha"]``: 1 for +, -1 for -); either may be a constant."""

    @staticmethod
    def fwd(xs, a):
        return (xs[0] + xs[1] if a["alpha"] == 1 else xs[0] - xs[1]), None

    @staticmethod
    def jvp(xs, dxs, y, ctx, a):
        d0, d1 = dxs
        if d1 is not None and a["alpha"] != 1:
            d1 = -d1
        return _add(d0 if d0 is None else lift(d0, y.ndim), d1 if d1 is None else lift(d1, y.ndim))

    @staticmethod
    def bwd(xs, dxs, y, dy, ctx, a, gy, dgy, need):
        res = [None, None]
        for i in (0, 1):
            if need[i]:
                s = _shape(xs[i])
                g, dg = sum_to(gy, s, False), sum_to(dgy, s, True)
                if i == 1 and a["alpha"] != 1:
                    g, dg = -g, -dg
                res[i] = (g, dg)
        return res


class Mul:
    """y = x0 * x1 (broadcasting); either may be a constant."""

    @staticmethod
    def fwd(xs, a):
        return xs[0] * xs[1], None

    @staticmethod
    def jvp(xs, dxs, y, ctx, a):
        (x0, x1), (d0, d1) = xs, dxs
        out = None if d0 is None else lift(d0, y.ndim) * x1
        return _add(out, None if d1 is None else x0 * lift(d1, y.ndim))

    @staticmethod
    def bwd(xs, dxs, y, dy, ctx, a, gy, dgy, need):
        (x0, x1), (d0, d1) = xs, dxs
        res = [None, None]
        for i, (o, do) in enumerate(((x1, d1), (x0, d0))):
            if need[i]:
                dg = dgy * o
                if do is not None:
                    dg = dg + gy * lift(do, y.ndim)
                res[i] = (sum_to(gy * o, _shape(xs[i]), False), sum_to(dg, _shape(xs[i]), True))
        return res


class Div:
    """y = x0 / c with c a constant (a number or a tensor that does not depend on theta)."""

    @staticmethod
    def fwd(xs, a):
        return xs[0] / xs[1], None

    @staticmethod
    def jvp(xs, dxs, y, ctx, a):
        return lift(dxs[0], y.ndim) / xs[1]

    @staticmethod
    def bwd(xs, dxs, y, dy, ctx, a, gy, dgy, need):
        s = _shape(xs[0])
        return [(sum_to(gy / xs[1], s, False), sum_to(dgy / xs[1], s, True)), None]


class Neg:
    @staticmethod
    def fwd(xs, a):
        return -xs[0], None

    @staticmethod
    def jvp(xs, dxs, y, ctx, a):
        return -dxs[0]

    @staticmethod
    def bwd(xs, dxs, y, dy, ctx, a, gy, dgy, need):
        return [(-gy, -dgy)]


class MatMul:
    """y = x0 @ x1 with batch dims broadcasting (both operands at least 2-D)."""

    @staticmethod
    def fwd(xs, a):
        return torch.matmul(xs[0], xs[1]), None

    @staticmethod
    def jvp(xs, dxs, y, ctx, a):
        (x0, x1), (d0, d1) = xs, dxs
        out = None if d0 is None else torch.matmul(lift(d0, y.ndim), x1)
        return _add(out, None if d1 is None else torch.matmul(x0, lift(d1, y.ndim)))

    @staticmethod
    def bwd(xs, dxs, y, dy, ctx, a, gy, dgy, need):
        (x0, x1), (d0, d1) = xs, dxs
        res = [None, None]
        if need[0]:
            dg = torch.matmul(dgy, x1.mT)
            if d1 is not None:
                dg = dg + torch.matmul(gy, lift(d1, y.ndim).mT)
            g = sum_to(torch.matmul(gy, x1.mT), x0.shape, False) if _primal(need[0]) else None
            res[0] = (g, sum_to(dg, x0.shape, True))
        if need[1]:
            dg = torch.matmul(x0.mT, dgy)
            if d0 is not None:
                dg = dg + torch.matmul(lift(d0, y.ndim).mT, gy)
            g = sum_to(torch.matmul(x0.mT, gy), x1.shape, False) if _primal(need[1]) else None
            res[1] = (g, sum_to(dg, x1.shape, True))
        return res


class MaskedFill:
    """y = x with the (constant) mask's entries set to a constant."""

    @staticmethod
    def fwd(xs, a):
        return xs[0].masked_fill(xs[1], a["value"]), None

    @staticmethod
    def jvp(xs, dxs, y, ctx, a):
        return dxs[0].masked_fill(xs[1], 0.0)

    @staticmethod
    def bwd(xs, dxs, y, dy, ctx, a, gy, dgy, need):
        return [(gy.masked_fill(xs[1], 0.0), dgy.masked_fill(xs[1], 0.0)), None]


# -- linear maps without parameters: shapes, slices, reductions ----------------------------------
def _nd(d, ndim):
    return d % ndim


class Reshape:
    """Any op that only reshapes (reshape, view, flatten, (un)squeeze, contiguous, nn.Flatten)."""

    @staticmethod
    def fwd(xs, a):
        return a["fn"](xs[0], *a.get("args", ()), **a.get("kw", {})), None

    @staticmethod
    def jvp(xs, dxs, y, ctx, a):
        return dxs[0].reshape(dxs[0].shape[0], *y.shape)

    @staticmethod
    def bwd(xs, dxs, y, dy, ctx, a, gy, dgy, need):
        x = xs[0]
        return [(gy.reshape(x.shape), dgy.reshape(dgy.shape[0], *x.shape))]


class Transpose:
    @staticmethod
    def fwd(xs, a):
        return xs[0].transpose(a["d0"], a["d1"]), None

    @staticmethod
    def jvp(xs, dxs, y, ctx, a):
        n = y.ndim
        return dxs[0].transpose(_nd(a["d0"], n) + 1, _nd(a["d1"], n) + 1)

    @staticmethod
    def bwd(xs, dxs, y, dy, ctx, a, gy, dgy, need):
        n = y.ndim
        return [(gy.transpose(a["d0"], a["d1"]),
                 dgy.transpose(_nd(a["d0"], n) + 1, _nd(a["d1"], n) + 1))]


class Permute:
    @staticmethod
    def fwd(xs, a):
        return xs[0].permute(*a["dims"]), None

    @staticmethod
    def jvp(xs, dxs, y, ctx, a):
        n = y.ndim
        return dxs[0].permute(0, *(_nd(d, n) + 1 for d in a["dims"]))

    @staticmethod
    def bwd(xs, dxs, y, dy, ctx, a, gy, dgy, need):
        n = y.ndim
        inv = [0] * n
        for i, d in enumerate(a["dims"]):
            inv[_nd(d, n)] = i
        return [(gy.permute(*inv), dgy.permute(0, *(i + 1 for i in inv)))]


class Index:
    """y = x[idx] with basic indexing only (ints, slices, None, Ellipsis)."""

    @staticmethod
    def fwd(xs, a):
        return xs[0][a["idx"]], None

    @staticmethod
    def jvp(xs, dxs, y, ctx, a):
        return dxs[0][(slice(None),) + a["idx"]]

    @staticmethod
    def bwd(xs, dxs, y, dy, ctx, a, gy, dgy, need):
        x = xs[0]
        g = gy.new_zeros(x.shape)
        g[a["idx"]] = gy
        dg = dgy.new_zeros(dgy.shape[0], *x.shape)
        dg[(slice(None),) + a["idx"]] = dgy
        return [(g, dg)]


class Reduce:
    """Sum or mean over ``a["dims"]`` (None: all), with ``a["keepdim"]``."""

    @staticmethod
    def _dims(x, a):
        return tuple(range(x.ndim)) if a["dims"] is None else tuple(_nd(d, x.ndim) for d in a["dims"])

    @staticmethod
    def fwd(xs, a):
        x = xs[0]
        dims = Reduce._dims(x, a)
        fn = torch.mean if a["mean"] else torch.sum
        return fn(x, dims, keepdim=a["keepdim"]), dims

    @staticmethod
    def jvp(xs, dxs, y, ctx, a):
        fn = torch.mean if a["mean"] else torch.sum
        return fn(dxs[0], tuple(d + 1 for d in ctx), keepdim=a["keepdim"])

    @staticmethod
    def bwd(xs, dxs, y, dy, ctx, a, gy, dgy, need):
        x = xs[0]
        k = dgy.shape[0]
        if not a["keepdim"]:
            for d in sorted(ctx):
                gy, dgy = gy.unsqueeze(d), dgy.unsqueeze(d + 1)
        scale = 1.0 / math.prod(x.shape[d] for d in ctx) if a["mean"] else 1.0
        return [((gy * scale).expand(x.shape) if a["mean"] else gy.expand(x.shape),
                 (dgy * scale).expand(k, *x.shape) if a["mean"] else dgy.expand(k, *x.shape))]


class Split:
    """torch.split / chunk: a tuple of views along ``a["dim"]`` (``a["sizes"]`` set by fwd)."""

    @staticmethod
    def fwd(xs, a):
        x = xs[0]
        parts = (torch.split(x, a["size"], a["dim"]) if a["how"] == "split"
                 else torch.chunk(x, a["size"], a["dim"]))
        return parts, [p.shape[_nd(a["dim"], x.ndim)] for p in parts]

    @staticmethod
    def jvp(xs, dxs, y, ctx, a):
        return torch.split(dxs[0], ctx, _nd(a["dim"], xs[0].ndim) + 1)

    @staticmethod
    def bwd(xs, dxs, y, dy, ctx, a, gy, dgy, need):
        # gy, dgy: lists with None for parts that received no adjoint
        x = xs[0]
        d = _nd(a["dim"], x.ndim)
        k = next(t for t in dgy if t is not None).shape[0]
        g = [t if t is not None else x.new_zeros(p.shape) for t, p in zip(gy, y)]
        dg = [t if t is not None else x.new_zeros(k, *p.shape) for t, p in zip(dgy, y)]
        return [(torch.cat(g, d), torch.cat(dg, d + 1))]
