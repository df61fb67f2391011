r"""Block replays: how a block of k tangents (JVP) or cotangents (VJP) is carried through training.

Every backend computes the same J V and J^T W of the same run; the suite holds each to the eager
path at ~1e-12 relative (they differ only in the order of floating-point sums).

``eager``
    The model's ``grad_hvp`` on (k, P) blocks and the optimizer's elementwise tangent/adjoint maps.
    Any model family (the CNN and transformer go through ``torch.func``).
``fused``
    MLPs without dropout. Tangents are held **block-major**: every parameter's (k, *shape) block is
    contiguous, and the tangent activations are feature-major (k, width, batch). Then the two products
    per layer that dominate the cost, dW a^T and dDelta a, are each *one* GEMM of (k*width) rows instead
    of k small ones; the Hessian-vector product is written straight into the tangent state with the
    GEMM's beta (for SGD the momentum factor: dm <- mu dm + H dtheta costs no extra pass) and nothing of
    size k x P is allocated per step. The primal half of each step (forward, backward) is computed
    once per trajectory and kept (with ``checkpoint="all"``, when it fits in a quarter of the free
    memory), so every later replay, JVP or VJP, of any width does only the tangent work.
``compiled``
    ``torch.compile`` (inductor) of the eager JVP and VJP steps; needs a C++ compiler on CPU and
    compiles once per block width (20-70 s here), so it pays for long solves: 3-6x faster than
    eager for the CNN and transformer (torch.func) JVPs. Its first product in each direction is
    checked against eager; a wrong graph (the transformer's VJP on torch 2.13) falls back to eager.
    Chosen only by :func:`autotune` (which measures it) or by name.

:func:`make` builds one by name; ``"auto"`` is ``fused`` where it applies, else ``eager``.
"""

from __future__ import annotations

import logging
import time
import types
import weakref

import torch

from . import optim
from .models import MLP
from .trajectory import Problem, Trajectory, available_bytes

log = logging.getLogger(__name__)

BACKENDS = ("eager", "fused", "compiled")


class Unsupported(ValueError):
    """This backend cannot replay this recipe (the message says why)."""


class CompileMismatch(RuntimeError):
    """A compiled replay disagreed with the eager one."""


class EagerReplay:
    name = "eager"

    def __init__(self, problem, trajectory):
        self.problem, self.trajectory = problem, trajectory

    def jvp(self, V, steps: int | None = None):  # V: (k, P) rows are tangents of theta_0
        """Tangents of theta after ``steps`` steps (default: all, i.e. J V)."""
        prob, opt = self.problem, self.problem.optimizer
        state = opt.init(self.trajectory.theta0)
        ds = (V.contiguous(),) + tuple(torch.zeros_like(V) for _ in state[1:])
        with torch.no_grad():
            for t in range(_steps(prob, steps)):
                g, hv = prob.grad_hvp(state[0], ds[0], t)
                state, ds = opt.jvp(state, g, ds, hv, t)
        return ds[0]

    def vjp(self, W):  # W: (k, P) rows are cotangents of theta_T
        prob, opt = self.problem, self.problem.optimizer
        bs = (W.contiguous(),) + tuple(torch.zeros_like(W) for _ in opt.state_names[1:])
        with torch.no_grad():
            for t, state in self.trajectory.reversed_states():
                g = prob.grad(state[0], t) if opt.needs_grad_for_vjp else None
                bs, bg = opt.vjp(state, g, bs, t)
                _, hbg = prob.grad_hvp(state[0], bg, t)
                bs = (bs[0] + hbg,) + bs[1:]
        return bs[0]


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
        self._verified: set = set()
        self.fallback: dict = {}  # direction -> reason it runs eagerly

    def _padded(self, V, fn):
        # one layout for every call: graphs are specialised on strides too (a (1, P) view of a
        # (P, 1) column has stride 1 where a copy has P), and each recompile costs a full compile
        k = V.shape[0]
        if self._width is None or k > self._width:
            self._width = k
        X = V.new_zeros(self._width, V.shape[1])
        X[:k] = V
        return fn(X)[:k]

    def jvp(self, V, steps: int | None = None):
        if "jvp" in self.fallback:
            return super().jvp(V, steps)
        out = self._padded(V, lambda X: self._jvp(X, steps))
        return self._verify("jvp", out, lambda: super(CompiledReplay, self).jvp(V, steps),
                            partial=steps is not None and steps < self.problem.num_steps)

    def vjp(self, W):
        if "vjp" in self.fallback:
            return super().vjp(W)
        out = self._padded(W, self._vjp)
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

    def scalar(v):
        return torch.tensor(v, dtype=torch.float64, device=dev)

    lrs = [scalar(opt.lr(t)) for t in range(problem.num_steps)]
    bcs = [(scalar(1 - opt.b1 ** (t + 1)), scalar(1 - opt.b2 ** (t + 1)))
           if isinstance(opt, optim.Adam) else None for t in range(problem.num_steps)]

    def jvp_step(state, ds, x, y, lr, bc):
        g, hv = model.grad_hvp(state[0], x, y, ds[0])
        return opt.jvp(state, g, ds, hv, 0, lr=lr, bc=bc)

    def vjp_step(state, bs, x, y, lr, bc):
        g = model.grad(state[0], x, y) if opt.needs_grad_for_vjp else None
        bs, bg = opt.vjp(state, g, bs, 0, lr=lr, bc=bc)
        _, hbg = model.grad_hvp(state[0], x, y, bg)
        return (bs[0] + hbg,) + tuple(bs[1:])

    def own_code(f):
        return types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__,
                                  f.__defaults__, f.__closure__)

    hit = _COMPILED[problem] = (torch.compile(own_code(jvp_step), dynamic=False),
                                torch.compile(own_code(vjp_step), dynamic=False), lrs, bcs)
    return hit


class FusedMLPReplay:
    """Block-major, allocation-free tangent propagation for MLPs (see the module docstring).

    The k-independent half of every step (forward, backward, transposed operands) is cached per
    step when the trajectory keeps every state (``checkpoint="all"``) and all T steps fit in
    ``cache_fraction`` of the free memory (:meth:`_primal`); later replays of the trajectory skip it.
    Every width goes through this path, so the arithmetic (and every bit of the result) does not
    depend on the checkpoint policy or on whether the cache fits. One vector, JVP: 0.36-0.45x
    eager's time with the cache, 1.05-1.34x without it (paper recipe and 1e5 net).
    """

    name = "fused"
    cache_fraction = 0.25  # of the free memory the per-step primal cache may take (0: never)

    def __init__(self, problem, trajectory):
        _require(problem, self.name)
        self.problem, self.trajectory, self.model = problem, trajectory, problem.model
        self.opt = problem.optimizer
        self.layout = self.model.layout
        o = self.opt
        # plain (heavy-ball) SGD: the momentum factor rides in the GEMMs' beta
        self.plain_sgd = isinstance(o, optim.SGD) and not o.nesterov and not o.wd
        self._n = len(self.layout) // 2
        self._ws: dict = {}
        # step -> _primal(...); None: undecided, False: not kept. Only when the trajectory keeps
        # every state: a checkpointed one was asked to save memory, and the cache would outweigh it
        self._cache = None if trajectory.interval == 1 else False

    # -- layout ---------------------------------------------------------------------------------
    def _views(self, buf, k):
        return [buf[k * p.offset:k * (p.offset + p.size)].view(k, *p.shape) for p in self.layout]

    def _to_bm(self, V):
        k, P = V.shape
        buf = V.new_empty(k * P)
        for p, view in zip(self.layout, self._views(buf, k)):
            view.copy_(V[:, p.offset:p.offset + p.size].view(k, *p.shape))
        return buf

    def _from_bm(self, buf, k):
        P = self.model.num_params
        out = buf.new_empty(k, P)
        for p, view in zip(self.layout, self._views(buf, k)):
            out[:, p.offset:p.offset + p.size] = view.reshape(k, p.size)
        return out

    def _param_slices(self, x):
        return [x[p.offset:p.offset + p.size].view(p.shape) for p in self.layout]

    # -- the block Hessian-vector product -------------------------------------------------------
    def _buf(self, name, shape, like):
        """A workspace tensor reused across steps (fresh (k, width, B) blocks every step would be
        page-faulted in by the allocator each time: measured ~20% of a step)."""
        b = self._ws.get(name)
        if b is None or b.shape != shape or b.dtype != like.dtype or b.device != like.device:
            b = self._ws[name] = like.new_empty(shape)
        return b

    def _primal(self, theta, t):
        """Step t's k-independent half of the HVP (forward, softmax, backward and the transposed
        operands the GEMMs read), kept per step when all T of them fit in ``cache_fraction`` of
        the free memory: every later replay of this trajectory, JVP or VJP, skips the primal pass
        (measured 8-23% of a block replay; 136 MB for the paper recipe, 1.5 GB for the 1e5 net)."""
        hit = self._cache.get(t) if self._cache else None
        if hit is not None:
            return hit
        model, n = self.model, self._n
        x, y = self.problem.batch(t)
        B = len(y)
        ps = model.unflatten(theta)
        acts, derivs, z = model._forward(ps, x, [None] * (n - 1))
        p = torch.softmax(z, -1)
        delta = p.clone()
        delta[torch.arange(B, device=y.device), y] -= 1.0
        grads, deltas = model._backward(ps, acts, derivs, delta / B)
        d1T = [d[0].T.contiguous() for d in derivs]
        # d(phi'(z)) term of the backward tangent: (delta_i W_i)^T * phi''(z_{i-1})
        cs = [((deltas[i] @ ps[2 * i]).T * derivs[i - 1][1].T).contiguous() for i in range(1, n)]
        pT, deltaTs = p.T.contiguous(), [d.T.contiguous() for d in deltas]
        g = torch.cat([gi.reshape(-1) for gi in grads])
        out = (acts, d1T, cs, pT, deltas, deltaTs, g)
        if self._cache is None:  # first step: decide whether all T steps fit
            held = [*acts[1:], *d1T, *cs, pT, *deltas, *deltaTs, g]  # acts[0] is the batch itself
            size = sum(a.numel() * a.element_size() for a in held)
            fits = size * self.problem.num_steps <= self.cache_fraction * available_bytes(theta.device)
            self._cache = {} if fits else False
        if self._cache is not False:
            self._cache[t] = out
        return out

    def _hvp(self, theta, t, dps, outs, beta: float):
        """outs_i <- beta * outs_i + (H_t dtheta)_i for every parameter block; returns the gradient g.

        ``dps``/``outs`` are block-major views (k, *shape); tangent activations are (k, width, B)."""
        acts, d1T, cs, pT, deltas, deltaTs, g = self._primal(theta, t)
        B, n, k = acts[0].shape[0], self._n, dps[0].shape[0]
        ps = self.model.unflatten(theta)
        dzs, das = [], [None]
        for i in range(n):
            W = ps[2 * i]
            out_, in_ = W.shape
            dz = self._buf(f"dz{i}", (k, out_, B), theta)
            torch.mm(dps[2 * i].reshape(k * out_, in_), acts[i].T, out=dz.view(k * out_, B))
            dz += dps[2 * i + 1][:, :, None]
            if das[i] is not None:
                dz.baddbmm_(W.expand(k, out_, in_), das[i])
            dzs.append(dz)
            if i < n - 1:
                das.append(torch.mul(dz, d1T[i], out=self._buf(f"da{i + 1}", dz.shape, theta)))
        pdz = dzs[-1] * pT
        ddelta = (pdz - pT * pdz.sum(1, keepdim=True)) / B
        for i in reversed(range(n)):
            W = ps[2 * i]
            out_, in_ = W.shape
            deltaT = deltaTs[i]
            outs[2 * i].view(k * out_, in_).addmm_(ddelta.reshape(k * out_, B), acts[i], beta=beta)
            wide = out_ >= 32
            if das[i] is not None and wide:  # + delta^T da, k GEMMs of full size
                outs[2 * i].baddbmm_(deltaT.expand(k, out_, B), das[i].transpose(1, 2))
            elif das[i] is not None:  # narrow: one GEMM (k*in, B) @ (B, out), added transposed
                dT = torch.mm(das[i].view(k * in_, B), deltas[i])
                outs[2 * i] += dT.view(k, in_, out_).transpose(1, 2)
            hb = ddelta.sum(-1)
            if beta == 0:
                outs[2 * i + 1].copy_(hb)
            else:
                outs[2 * i + 1].mul_(beta).add_(hb)
            if i > 0:
                # d(delta W)^T = dW^T delta^T + W^T dDelta^T: k GEMMs each, straight into the
                # (k, in, B) block, for the narrow output layer too (paper recipe, k = 64: 3-9% off a
                # JVP + VJP against one GEMM into an (in, k, B) buffer plus two transposes)
                nd = self._buf(f"dd{i - 1}", (k, in_, B), theta)
                torch.bmm(dps[2 * i].transpose(1, 2), deltaT.expand(k, out_, B), out=nd)
                nd.baddbmm_(W.T.expand(k, in_, out_), ddelta)
                nd.mul_(d1T[i - 1])
                nd.addcmul_(cs[i - 1], dzs[i - 1])
                ddelta = nd
        return g

    # -- products -------------------------------------------------------------------------------
    def jvp(self, V, steps: int | None = None):
        k = V.shape[0]
        opt = self.opt
        state = opt.init(self.trajectory.theta0)
        ds = [self._to_bm(V)] + [V.new_zeros(V.numel()) for _ in state[1:]]
        dsv = [self._views(b, k) for b in ds]
        hv = None if self.plain_sgd else V.new_empty(V.numel())
        hvv = None if hv is None else self._views(hv, k)
        with torch.no_grad():
            for t in range(_steps(self.problem, steps)):
                if self.plain_sgd:  # dm <- mu dm + H dtheta (in the GEMMs), dtheta <- dtheta - eta dm
                    g = self._hvp(state[0], t, dsv[0], dsv[1], beta=opt.mu)
                    ds[0].add_(ds[1], alpha=-opt.lr(t))
                else:
                    g = self._hvp(state[0], t, dsv[0], hvv, beta=0.0)
                    self._tangent_map(state, g, ds, dsv, hvv, t)
                state = opt.update(state, g, t)
        return self._from_bm(ds[0], k)

    def _tangent_map(self, state, g, ds, dsv, hvv, t):
        """ds <- dU/ds ds + dU/dg hv, parameter by parameter (the maps are elementwise)."""
        sp = [self._param_slices(s) for s in state]
        gp = self._param_slices(g)
        for j in range(len(self.layout)):
            _, new = self.opt.jvp(tuple(s[j] for s in sp), gp[j], tuple(d[j] for d in dsv),
                                  hvv[j], t)
            for d, nd in zip(dsv, new):
                d[j].copy_(nd)

    def vjp(self, W):
        k = W.shape[0]
        opt, prob = self.opt, self.problem
        bs = [self._to_bm(W)] + [W.new_zeros(W.numel()) for _ in opt.state_names[1:]]
        bsv = [self._views(b, k) for b in bs]
        bg = None if self.plain_sgd else W.new_empty(W.numel())
        bgv = None if bg is None else self._views(bg, k)
        with torch.no_grad():
            for t, state in self.trajectory.reversed_states():
                if self.plain_sgd:  # bm <- bm - eta btheta (= bg); btheta += H bg; bm <- mu bm
                    bs[1].add_(bs[0], alpha=-opt.lr(t))
                    self._hvp(state[0], t, bsv[1], bsv[0], beta=1.0)
                    bs[1].mul_(opt.mu)
                    continue
                g = prob.grad(state[0], t) if opt.needs_grad_for_vjp else None
                sp = [self._param_slices(s) for s in state]
                gp = self._param_slices(g) if g is not None else [None] * len(self.layout)
                for j in range(len(self.layout)):
                    new, bgj = opt.vjp(tuple(s[j] for s in sp), gp[j], tuple(b[j] for b in bsv), t)
                    for b, nb in zip(bsv, new):
                        b[j].copy_(nb)
                    bgv[j].copy_(bgj)
                self._hvp(state[0], t, bgv, bsv[0], beta=1.0)
        return self._from_bm(bs[0], k)


def _steps(problem, steps):
    return problem.num_steps if steps is None else min(int(steps), problem.num_steps)


_CLASSES = {"eager": EagerReplay, "fused": FusedMLPReplay, "compiled": CompiledReplay}


def compiler_available() -> bool:
    """Whether torch.compile's CPU backend (inductor) can build kernels: it needs a C++ compiler."""
    import shutil

    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


def supported(problem, name: str) -> str | None:
    """None if backend ``name`` can replay this problem, else the reason it cannot."""
    if name == "fused":
        m = problem.model
        if not isinstance(m, MLP) or m.backend != "manual":
            return f"the fused backend handles the MLP family only, not {problem.recipe.model.family!r}"
        if m.stochastic:
            return "the fused backend refuses dropout"
    if name == "compiled" and problem.model.stochastic:
        return "the compiled backend refuses dropout (random masks inside a graph)"
    if name == "compiled" and problem.device.type == "cpu" and not compiler_available():
        return "the compiled backend needs a C++ compiler (g++, c++ or clang++) on CPU"
    return None


def _require(problem, name: str) -> None:
    why = supported(problem, name)
    if why:
        raise Unsupported(why)


def resolve(problem, name: str) -> str:
    if name == "auto":
        return "fused" if supported(problem, "fused") is None else "eager"
    if name not in BACKENDS:
        raise ValueError(f"unknown replay backend {name!r}; expected 'auto' or one of {BACKENDS}")
    _require(problem, name)
    return name


def make(problem, trajectory, name: str = "auto"):
    return _CLASSES[resolve(problem, name)](problem, trajectory)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def autotune(prob: Problem, *, blocks=(8, 16, 32, 64, 128), backends=None, steps: int = 10,
             compile_threshold_s: float = 1.0, trajectory=None) -> dict:
    """Pick the replay backend and block width with the lowest measured cost per vector-step.

    Each (backend, block) pair runs ``steps`` JVP steps on the recipe's first batches (after one
    warm-up pass). ``compiled`` is measured only at the best width found for the others, only
    when a C++ compiler is present, and only when one replay of the best so far is projected above
    ``compile_threshold_s`` (below that its compile time, 20-70 s here, can't pay off). Returns
    ``{"backend", "block", "seconds_per_vector_step": {backend: {block: s}}, "skipped": {...}}``;
    the runner stores it in the run's provenance and reuses it on resume;
    :meth:`tjac.TrainingJacobian.autotune` applies it to an operator."""
    skipped: dict = {}
    if backends is None:
        backends = []
        for b in BACKENDS:
            why = supported(prob, b)
            if why:
                skipped[b] = why
            else:
                backends.append(b)
    for b in backends:
        resolve(prob, b)  # unknown or unsupported names raise here
    steps = max(1, min(steps, prob.num_steps))
    if trajectory is None:  # the JVPs below start from theta_0 and need nothing else
        trajectory = Trajectory.start_only(prob, prob.init_theta())
    table: dict = {}

    def measure(name, k):
        rp = make(prob, trajectory, name)
        gen = torch.Generator().manual_seed(0)  # not zeros: `compiled` checks itself against eager
        V = torch.randn(k, prob.num_params, generator=gen, dtype=torch.float64).to(prob.device,
                                                                                 prob.dtype)
        rp.jvp(V, steps=steps)  # warm-up: compiles `compiled`, fills `fused`'s primal cache
        # (every replay of a run after its first reads that cache: time the steady state)
        _sync(prob.device)
        t = time.perf_counter()
        rp.jvp(V, steps=steps)
        _sync(prob.device)
        return (time.perf_counter() - t) / (k * steps)

    for name in [b for b in backends if b != "compiled"]:
        table[name] = {str(k): measure(name, k) for k in blocks}
    best = min(((b, k) for b in table for k in table[b]), key=lambda bk: table[bk[0]][bk[1]],
               default=None)
    if "compiled" in backends:
        k = int(best[1]) if best else max(blocks)
        per_replay = table[best[0]][best[1]] * k * prob.num_steps if best else float("inf")
        if per_replay < compile_threshold_s:
            skipped["compiled"] = (f"one replay takes {per_replay:.2f} s < {compile_threshold_s} s: "
                                   f"compiling would not pay off")
        else:
            try:
                table["compiled"] = {str(k): measure("compiled", k)}
            except Exception as e:  # noqa: BLE001 - inductor failures are environment problems
                skipped["compiled"] = f"torch.compile failed: {type(e).__name__}: {e}"[:300]
            else:
                if best is None or table["compiled"][str(k)] < table[best[0]][best[1]]:
                    best = ("compiled", str(k))
    return {"backend": best[0], "block": int(best[1]), "steps": steps,
            "seconds_per_vector_step": table, "skipped": skipped}


__all__ = ["BACKENDS", "autotune", "EagerReplay", "FusedMLPReplay", "CompiledReplay", "CompileMismatch",
           "Unsupported", "compiler_available", "make", "resolve", "supported"]
