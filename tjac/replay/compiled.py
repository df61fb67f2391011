"""The eager JVP and VJP steps under ``torch.compile`` (inductor), checked against eager."""

from __future__ import annotations

import logging
import time
import types
import weakref

import torch

from .. import optim
from .eager import EagerReplay
from .support import CompileMismatch, _require, _steps

log = logging.getLogger(__name__)


class CompiledReplay(EagerReplay):
    """The eager JVP and VJP steps under ``torch.compile`` (inductor). The learning rate and Adam's
    bias corrections enter as 0-d tensors, so one graph serves every step; a block narrower than
    the first one compiled is zero-padded to it rather than compiled again. The compiled steps
    belong to the problem (:func:`_compiled_steps`): every replay of one problem shares one compile.

    torch.compile around torch.func transforms has silently produced wrong tangents (seen here: the
    transformer's compiled VJP off by 9%), so the first product in each direction is also computed
    eagerly and compared; on a mismatch that direction stays eager for good (``self.fallback`` says
    why, and a warning is logged) and a partial replay (the autotuner's) raises instead."""

    name = "compiled"
    rtol = {torch.float64: 1e-9, torch.float32: 1e-3}

    def __init__(self, problem, trajectory):
        super().__init__(problem, trajectory)
        _require(problem, self.name)
        self._jvp_c, self._vjp_c, self._lr, self._bc = _compiled_steps(problem)
        self._width = None
        # (direction, width) compiled for this problem (every replay of it shares the graphs)
        self._compiled = _SEEN.setdefault(problem, set())
        self._verified: set = set()
        self.fallback: dict = {}  # direction -> reason it runs eagerly

    def _padded(self, V, fn, direction):
        # one layout for every call: graphs are specialised on strides too (a (1, P) view of a
        # (P, 1) column has stride 1 where a copy has P), and each recompile costs a full compile
        k = V.shape[0]
        if self._width is None or k > self._width:
            self._width = k
        X = V.new_zeros(self._width, V.shape[1])
        X[:k] = V
        key = (direction, self._width)
        if key in self._compiled:
            return fn(X)[:k]
        log.info("torch.compile: compiling the %s step at width %d (20-70 s on CPU) ...",
                 direction.upper(), self._width)
        t = time.perf_counter()
        out = fn(X)[:k]
        self._compiled.add(key)
        log.info("torch.compile: %s step at width %d compiled, first replay done in %.1f s",
                 direction.upper(), self._width, time.perf_counter() - t)
        return out

    def jvp(self, V, steps: int | None = None):
        if "jvp" in self.fallback:
            return super().jvp(V, steps)
        out = self._padded(V, lambda X: self._jvp(X, steps), "jvp")
        return self._verify("jvp", out, lambda: super(CompiledReplay, self).jvp(V, steps),
                            partial=steps is not None and steps < self.problem.num_steps)

    def vjp(self, W):
        if "vjp" in self.fallback:
            return super().vjp(W)
        out = self._padded(W, self._vjp, "vjp")
        return self._verify("vjp", out, lambda: super(CompiledReplay, self).vjp(W), partial=False)

    def _verify(self, direction, out, eager, *, partial):
        key = (direction, partial)
        if key in self._verified:
            return out
        ref = eager()
        err = float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-300))
        if not err <= self.rtol.get(ref.dtype, 1e-9):
            why = (f"torch.compile gave a wrong {direction.upper()} for this recipe (relative error "
                   f"{err:.1e} against eager)")
            if partial:
                raise CompileMismatch(why)
            self.fallback[direction] = why
            log.warning("%s; %ss run eagerly from now on", why, direction.upper())
            return ref
        self._verified.add(key)
        return out

    def _jvp(self, V, steps):
        prob = self.problem
        state = prob.optimizer.init(self.trajectory.theta0)
        ds = (V.contiguous(),) + tuple(torch.zeros_like(V) for _ in state[1:])
        with torch.no_grad():
            for t in range(_steps(prob, steps)):
                state, ds = self._jvp_c(state, ds, *prob.batch(t), self._lr[t], self._bc[t])
        return ds[0]

    def _vjp(self, W):
        prob = self.problem
        bs = (W.contiguous(),) + tuple(torch.zeros_like(W) for _ in prob.optimizer.state_names[1:])
        with torch.no_grad():
            for t, state in self.trajectory.reversed_states():
                bs = self._vjp_c(state, bs, *prob.batch(t), self._lr[t], self._bc[t])
        return bs[0]


_COMPILED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_SEEN: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _compiled_steps(problem):
    """The compiled JVP and VJP step functions of ``problem`` (built once per problem, shared by
    all its replays: the autotuner's compile is the operator's).

    dynamo keeps its graphs on the step function's *code object* and stops compiling (running
    eagerly, silently slower) after ``recompile_limit`` (8) graphs per code object. A closure
    defined here would share one code object across every problem in the process (a benchmark
    sweeping recipes and widths hit the limit), so each problem gets its own copy of the code."""
    hit = _COMPILED.get(problem)
    if hit is not None:
        return hit
    opt, model = problem.optimizer, problem.model
    dev = problem.device
    # a GraphModel's interpreter is not for dynamo: compile torch.func's products of the module
    grad_hvp = getattr(model, "compile_grad_hvp", model.grad_hvp)
    base = getattr(opt, "inner", opt)  # clipping wraps the optimizer whose constants these are

    def scalar(v):
        return torch.tensor(v, dtype=torch.float64, device=dev)

    lrs = [scalar(opt.lr(t)) for t in range(problem.num_steps)]
    bcs = [(scalar(1 - base.b1 ** (t + 1)), scalar(1 - base.b2 ** (t + 1)))
           if isinstance(base, optim.Adam) else None for t in range(problem.num_steps)]

    def jvp_step(state, ds, x, y, lr, bc):
        g, hv = grad_hvp(state[0], x, y, ds[0])
        return opt.jvp(state, g, ds, hv, 0, lr=lr, bc=bc)

    def vjp_step(state, bs, x, y, lr, bc):
        g = model.grad(state[0], x, y) if opt.needs_grad_for_vjp else None
        bs, bg = opt.vjp(state, g, bs, 0, lr=lr, bc=bc)
        _, hbg = grad_hvp(state[0], x, y, bg)
        return (bs[0] + hbg,) + tuple(bs[1:])

    def own_code(f):
        return types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__,
                                  f.__defaults__, f.__closure__)

    hit = _COMPILED[problem] = (torch.compile(own_code(jvp_step), dynamic=False),
                                torch.compile(own_code(vjp_step), dynamic=False), lrs, bcs)
    return hit
