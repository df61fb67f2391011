"""The eager replay: the model's ``grad_hvp`` on (k, P) blocks and the optimizer's tangent and
adjoint maps, step by step. Any model, any optimizer."""

from __future__ import annotations

import torch

from .support import _steps


class EagerReplay:
    name = "eager"
    reverse = False  # HVPs by forward-over-reverse (torch.func); True: double backward

    def __init__(self, problem, trajectory):
        self.problem, self.trajectory = problem, trajectory

    def jvp(self, V, steps: int | None = None):  # V: (k, P) rows are tangents of theta_0
        """Tangents of theta after ``steps`` steps (default: all, i.e. J V). Where every state
        is stored (``checkpoint="all"``) and the optimizer is linear in g (its tangent map never
        reads g: ``needs_grad_for_vjp`` False), theta_t is read from the trajectory and each step
        is an HVP alone, as in the reverse sweep; otherwise training is replayed beside the
        tangents, one (g, H V) per step."""
        prob, opt, traj = self.problem, self.problem.optimizer, self.trajectory
        stored = traj.interval == 1 and traj.final_state is not None and not opt.needs_grad_for_vjp
        state = opt.init(traj.theta0)
        ds = (V.contiguous(),) + tuple(torch.zeros_like(V) for _ in state[1:])
        with torch.no_grad():
            for t in range(_steps(prob, steps)):
                if stored:
                    state = traj.checkpoints[t]
                    hv = prob.hvp(state[0], ds[0], t, reverse=self.reverse)
                    _, ds = opt.jvp(state, state[0].new_zeros(()), ds, hv, t)
                    continue
                g, hv = prob.grad_hvp(state[0], ds[0], t, reverse=self.reverse)
                state, ds = opt.jvp(state, g, ds, hv, t)
        return ds[0]

    def vjp(self, W):  # W: (k, P) rows are cotangents of theta_T
        prob, opt = self.problem, self.problem.optimizer
        bs = (W.contiguous(),) + tuple(torch.zeros_like(W) for _ in opt.state_names[1:])
        with torch.no_grad():
            for t, state in self.trajectory.reversed_states():
                g = prob.grad(state[0], t) if opt.needs_grad_for_vjp else None
                bs, bg = opt.vjp(state, g, bs, t)
                hbg = prob.hvp(state[0], bg, t, reverse=self.reverse)
                bs = (bs[0] + hbg,) + bs[1:]
        return bs[0]


class DoubleBackwardReplay(EagerReplay):
    """The eager replay with every HVP by reverse-over-reverse (autograd's double backward, the
    second backward batched over the block): module-based models only."""

    name = "double-backward"
    reverse = True
