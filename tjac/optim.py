r"""Functional optimizer steps, their tangent (JVP) and adjoint (VJP) maps, and schedules.

A state is a tuple ``(theta, m)`` (SGD) or ``(theta, m, v)`` (Adam); tangent and cotangent states are
tuples of ``(k, P)`` blocks. With the step  s' = U_t(s, g),  g = grad L_t(theta):

* ``update(s, g, t)``                  -> s'
* ``jvp(s, g, ds, dg, t)``             -> (s', ds')        ds' = dU/ds ds + dU/dg dg
* ``vjp(s, g, bs', t)``                -> (bs, bg)         bs = (dU/ds)^T bs',  bg = (dU/dg)^T bs'

Each takes keyword overrides ``lr`` (eta_t) and ``bc`` (Adam's bias corrections (c1, c2)): the
compiled replay passes them as 0-d tensors so one graph serves every step.

The caller adds the Hessian term: dg = H dtheta (JVP) and btheta += H bg (VJP). The maps are
hand-derived (elementwise, no autodiff overhead) and tested against ``torch.func`` in the suite.
SGD is linear in g, so its ``vjp`` and the tangent half of its ``jvp`` never read g
(``needs_grad_for_vjp = False``): the reverse sweep then needs only the stored theta_t (with
c = bm' - eta btheta', btheta = btheta' + H_t c and bm = mu c), and so does the eager JVP where
every state is stored.
"""

from __future__ import annotations

import math

import torch
from torch.func import jvp as func_jvp
from torch.func import vjp as func_vjp
from torch.func import vmap

from .recipe import OptimSpec


def learning_rate(spec: OptimSpec, t: int, total: int) -> float:
    """eta_t for step t = 0..total-1 (a Python float: the same on every device)."""
    if spec.schedule == "cosine":
        lr = spec.lr * 0.5 * (1.0 + math.cos(math.pi * t / total))
    else:
        lr = spec.lr
    if spec.warmup_steps and t < spec.warmup_steps:
        lr *= (t + 1) / spec.warmup_steps
    return lr


class SGD:
    """m' = mu m + g + wd theta;  d = m' (or g + wd theta + mu m' with Nesterov);  theta' = theta - eta d."""

    needs_grad_for_vjp = False
    elementwise = True  # the maps act coordinate by coordinate (the fused replay relies on it)
    state_names = ("theta", "m")

    def __init__(self, spec: OptimSpec, total_steps: int):
        self.spec, self.total = spec, total_steps
        self.mu, self.wd, self.nesterov = spec.momentum, spec.weight_decay, spec.nesterov

    def init(self, theta):
        return (theta, theta.new_zeros(theta.shape))

    def lr(self, t):
        return learning_rate(self.spec, t, self.total)

    def update(self, s, g, t, *, lr=None, bc=None):
        theta, m = s
        if self.wd:
            g = g + self.wd * theta
        m = self.mu * m + g if self.mu else g
        d = g + self.mu * m if self.nesterov else m
        return (theta - (self.lr(t) if lr is None else lr) * d, m)

    def jvp(self, s, g, ds, dg, t, *, lr=None, bc=None):
        dtheta, dm = ds
        eta = self.lr(t) if lr is None else lr
        if self.wd:
            dg = dg + self.wd * dtheta
        dm = self.mu * dm + dg if self.mu else dg
        dd = dg + self.mu * dm if self.nesterov else dm
        return self.update(s, g, t, lr=eta), (dtheta - eta * dd, dm)

    def vjp(self, s, g, bs, t, *, lr=None, bc=None):
        btheta, bm = bs
        bd = -(self.lr(t) if lr is None else lr) * btheta
        if self.nesterov:
            bg, bm_tot = bd, bm + self.mu * bd
            bg = bg + bm_tot
        else:
            bm_tot = bm + bd
            bg = bm_tot
        bm_prev = self.mu * bm_tot
        if self.wd:
            btheta = btheta + self.wd * bg
        return (btheta, bm_prev), bg


class Adam:
    """Bias-corrected Adam with eps_root inside the root (optax's form); ``decoupled`` = AdamW.

    m' = b1 m + (1-b1) ge;  v' = b2 v + (1-b2) ge^2;  ge = g (+ wd theta unless decoupled)
    d  = (m'/c1) / (sqrt(v'/c2 + eps_root) + eps),  c_i = 1 - b_i^(t+1)
    theta' = theta - eta (d + wd theta if decoupled)
    eps_root > 0 keeps the tangent finite where v = 0 (always-zero inputs give g = 0 forever).
    """

    needs_grad_for_vjp = True
    elementwise = True
    state_names = ("theta", "m", "v")

    def __init__(self, spec: OptimSpec, total_steps: int, *, decoupled: bool):
        self.spec, self.total, self.decoupled = spec, total_steps, decoupled
        self.b1, self.b2, self.eps, self.eps_root = spec.beta1, spec.beta2, spec.eps, spec.eps_root
        self.wd = spec.weight_decay

    def init(self, theta):
        return (theta, theta.new_zeros(theta.shape), theta.new_zeros(theta.shape))

    def lr(self, t):
        return learning_rate(self.spec, t, self.total)

    def _parts(self, s, g, t, bc=None):
        theta, m, v = s
        ge = g + self.wd * theta if (self.wd and not self.decoupled) else g
        m = self.b1 * m + (1 - self.b1) * ge
        v = self.b2 * v + (1 - self.b2) * ge * ge
        c1, c2 = (1 - self.b1 ** (t + 1), 1 - self.b2 ** (t + 1)) if bc is None else bc
        root = (v / c2 + self.eps_root).sqrt()
        den = root + self.eps
        return ge, m, v, c1, c2, root, den

    def update(self, s, g, t, *, lr=None, bc=None):
        theta = s[0]
        ge, m, v, c1, c2, root, den = self._parts(s, g, t, bc)
        d = (m / c1) / den
        if self.wd and self.decoupled:
            d = d + self.wd * theta
        return (theta - (self.lr(t) if lr is None else lr) * d, m, v)

    def jvp(self, s, g, ds, dg, t, *, lr=None, bc=None):
        theta = s[0]
        dtheta, dm, dv = ds
        ge, m, v, c1, c2, root, den = self._parts(s, g, t, bc)
        if self.wd and not self.decoupled:
            dg = dg + self.wd * dtheta
        dm = self.b1 * dm + (1 - self.b1) * dg
        dv = self.b2 * dv + 2 * (1 - self.b2) * ge * dg
        mh = m / c1
        dd = (dm / c1) / den - mh * (dv / c2) / (2 * root * den * den)
        d = mh / den
        if self.wd and self.decoupled:
            d, dd = d + self.wd * theta, dd + self.wd * dtheta
        eta = self.lr(t) if lr is None else lr
        return (theta - eta * d, m, v), (dtheta - eta * dd, dm, dv)

    def vjp(self, s, g, bs, t, *, lr=None, bc=None):
        btheta, bm, bv = bs
        ge, m, v, c1, c2, root, den = self._parts(s, g, t, bc)
        eta = self.lr(t) if lr is None else lr
        bd = -eta * btheta
        if self.wd and self.decoupled:
            btheta = btheta + self.wd * bd
        bm_tot = bm + (bd / den) / c1
        bv_tot = bv - (bd * (m / c1) / (2 * root * den * den)) / c2
        bg = (1 - self.b1) * bm_tot + 2 * (1 - self.b2) * ge * bv_tot
        if self.wd and not self.decoupled:
            btheta = btheta + self.wd * bg
        return (btheta, self.b1 * bm_tot, self.b2 * bv_tot), bg


class Clipped:
    r"""Gradient clipping by global norm in front of another optimizer: g_c = s g with
    s = min(1, c/||g||). Where ||g|| > c its tangent map is not the identity:
    dg_c = (c/||g||) (dg - g (g . dg)/||g||^2), a symmetric map, so the adjoint is the same formula.
    Written with ``torch.where`` (no host sync, one graph under ``torch.compile``)."""

    needs_grad_for_vjp = True
    elementwise = False

    def __init__(self, inner, clip_norm: float):
        self.inner, self.c = inner, float(clip_norm)
        self.lr = inner.lr

    @property
    def state_names(self):
        return self.inner.state_names

    def init(self, theta):
        return self.inner.init(theta)

    def _clip(self, g):
        n = g.norm()
        over = n > self.c
        scale = torch.where(over, self.c / n, torch.ones_like(n))
        return g * scale, n, over, scale

    def _dclip(self, g, n, over, scale, dg):  # dg: (k, P)
        coef = torch.where(over, self.c / (n * n * n), torch.zeros_like(n))
        return scale * dg - coef * (dg @ g)[:, None] * g

    def update(self, s, g, t, **kw):
        return self.inner.update(s, self._clip(g)[0], t, **kw)

    def jvp(self, s, g, ds, dg, t, **kw):
        gc, n, over, scale = self._clip(g)
        return self.inner.jvp(s, gc, ds, self._dclip(g, n, over, scale, dg), t, **kw)

    def vjp(self, s, g, bs, t, **kw):
        gc, n, over, scale = self._clip(g)
        bs, bgc = self.inner.vjp(s, gc, bs, t, **kw)
        return bs, self._dclip(g, n, over, scale, bgc)


class FuncOptimizer:
    """A user's optimizer in the optax/torchopt style, over flat tensors:
    ``init(params) -> state`` (a tensor or a tuple of tensors shaped like params) and
    ``update(grads, state, params, step) -> (updates, state)``; theta' = theta + updates.
    Its tangent and adjoint maps come from ``torch.func`` (``jvp``/``vjp`` of one step, vmapped
    over the block), so ``update`` must be written in torch operations."""

    needs_grad_for_vjp = True
    elementwise = False

    def __init__(self, transform, name: str):
        init = getattr(transform, "init", None)
        update = getattr(transform, "update", None)
        if init is None and isinstance(transform, (tuple, list)) and len(transform) == 2:
            init, update = transform
        if not callable(init) or not callable(update):
            raise ValueError(f"optimizer {name!r} must provide init(params) and "
                             f"update(grads, state, params, step) (an object with those two "
                             f"functions, or a pair)")
        self._init, self._update, self.name = init, update, name
        self.state_names = None  # known after init()

    @staticmethod
    def _tuple(state):
        return (state,) if isinstance(state, torch.Tensor) else tuple(state)

    def init(self, theta):
        raw = self._init(theta)
        self._single = isinstance(raw, torch.Tensor)
        rest = self._tuple(raw)
        for i, r in enumerate(rest):
            if not isinstance(r, torch.Tensor) or r.shape != theta.shape or r.dtype != theta.dtype \
                    or r.device != theta.device:
                raise ValueError(f"optimizer {self.name!r}: init() must return tensors shaped like "
                                 f"params ({tuple(theta.shape)}, {theta.dtype}, {theta.device}); state {i} is "
                                 f"{getattr(r, 'shape', type(r).__name__)}")
        self.state_names = ("theta",) + tuple(f"state{i}" for i in range(len(rest)))
        return (theta,) + rest

    def lr(self, t):  # the user's update owns its schedule
        return 0.0

    def _step(self, t):
        def step(s, g):
            upd, new = self._update(g, s[1] if self._single else s[1:], s[0], t)
            new = self._tuple(new)
            if len(new) != len(s) - 1:
                raise ValueError(f"optimizer {self.name!r}: update() returned {len(new)} state "
                                 f"tensors, init() gave {len(s) - 1}")
            return (s[0] + upd,) + new
        return step

    def update(self, s, g, t, **kw):
        return self._step(t)(tuple(s), g)

    def jvp(self, s, g, ds, dg, t, **kw):
        step, s = self._step(t), tuple(s)
        new = step(s, g)
        tan = vmap(lambda d, e: func_jvp(step, (s, g), (d, e))[1])(tuple(ds), dg)
        return new, tan

    def vjp(self, s, g, bs, t, **kw):
        _, pull = func_vjp(self._step(t), tuple(s), g)
        bs_prev, bg = vmap(pull)(tuple(bs))
        return bs_prev, bg


def build(spec: OptimSpec, total_steps: int):
    if spec.name == "custom":
        from ._imports import resolve

        factory = resolve(spec.factory, what="optimizer")
        try:
            transform = factory(**spec.kwargs) if callable(factory) else factory
        except Exception as e:  # noqa: BLE001 - the user's factory failed
            raise ValueError(f"optimizer {spec.factory!r} raised {type(e).__name__}: {e}") from None
        opt = FuncOptimizer(transform, spec.factory)
    elif spec.name == "sgd":
        opt = SGD(spec, total_steps)
    elif spec.name in ("adam", "adamw"):
        opt = Adam(spec, total_steps, decoupled=spec.name == "adamw")
    else:  # pragma: no cover (spec checks it)
        raise ValueError(f"unknown optimizer {spec.name!r}")
    return Clipped(opt, spec.clip_norm) if spec.clip_norm is not None else opt
