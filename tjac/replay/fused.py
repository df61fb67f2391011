"""Block-major, allocation-free tangent propagation for the built-in MLP (see
:class:`FusedMLPReplay`)."""

from __future__ import annotations

import torch

from .. import optim
from .._checks import available_bytes
from ..models.losses import cross_entropy_adjoint
from .support import _require, _steps


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
        ps = model.unflatten(theta)
        acts, derivs, z = model._forward(ps, x, [None] * (n - 1))
        p, delta = cross_entropy_adjoint(z, y)
        grads, deltas = model._backward(ps, acts, derivs, delta)
        d1T = [d[0].T.contiguous() for d in derivs]
        # d(phi'(z)) term of the backward tangent: (delta_i W_i)^T * phi''(z_{i-1})
        cs = [((deltas[i] @ ps[2 * i]).T * derivs[i - 1][1].T).contiguous() for i in range(1, n)]
        pT, deltaTs = p.T.contiguous(), [d.T.contiguous() for d in deltas]
        g = torch.cat([gi.reshape(-1) for gi in grads])
        out = (acts, d1T, cs, pT, deltas, deltaTs, g)
        if self._cache is None:  # first step: decide whether all T steps fit
            held = [*acts[1:], *d1T, *cs, pT, *deltas, *deltaTs, g]  # acts[0] is the batch itself
            size = sum(a.numel() * a.element_size() for a in held)
            have = available_bytes(theta.device)  # None: unknown, kept
            fits = have is None or size * self.problem.num_steps <= self.cache_fraction * have
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
