"""Training as a pure function of theta_0, the stored trajectory, and segment replay.

A :class:`~tjac.problem.Problem` gives ``step(state, t)`` as a fixed function of the step index t.

:class:`Trajectory` runs training once and keeps the optimizer state at checkpoints (policy ``all``:
every step; ``sqrt``: every ceil(sqrt(T)) steps; an int c: every c steps). ``reversed_states()``
walks t = T-1..0, recomputing each segment forward into a buffer; the recomputed states are the
same computation as the stored ones, so they agree bit for bit (``check()`` verifies it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .problem import Problem, check_fits, checkpoint_interval, memory_estimate  # noqa: F401
from .recipe import Recipe

log = logging.getLogger(__name__)


class TrainingDivergedError(FloatingPointError):
    """Training produced NaN/inf; ``step`` is the first step whose result is not finite."""

    def __init__(self, step: int, what: str = "parameters"):
        super().__init__(f"training produced non-finite {what} at step {step}")
        self.step = step


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


def run_segment(problem: Problem, state, t0: int, t1: int, *, keep: bool, check_finite: bool = True,
                buffers: dict | None = None):
    """Steps t0..t1-1 from ``state`` (= s_t0). Returns s_t1 and, with ``keep``, [s_t0..s_t1-1].
    ``buffers`` (running statistics) are advanced in place alongside, when given."""
    kept = []
    track = buffers is not None and problem.model.has_running_buffers
    with torch.no_grad():
        for t in range(t0, t1):
            if keep:
                kept.append(state)
            if track:
                problem.model.update_buffers(state[0], problem.at(t)[0], buffers)
            state = problem.step(state, t)
            if check_finite and not _finite(state[0]):
                raise TrainingDivergedError(t)
    return state, kept


@dataclass(frozen=True)
class TrainResult:
    """Outcome of one training run (float metrics are on the full train/test sets)."""

    theta0: torch.Tensor
    thetaT: torch.Tensor
    train_loss: float
    test_loss: float
    train_acc: float
    test_acc: float
    num_steps: int


def train(recipe: Recipe | Problem, theta0: torch.Tensor | None = None) -> TrainResult:
    """Run the recipe's training from ``theta0`` (default: the recipe's seeded init)."""
    problem = recipe if isinstance(recipe, Problem) else Problem(recipe)
    theta0 = problem.validate_theta0(theta0)
    state = problem.optimizer.init(theta0)
    buffers = problem.model.initial_buffers()
    state, _ = run_segment(problem, state, 0, problem.num_steps, keep=False, buffers=buffers)
    return TrainResult(theta0=theta0, thetaT=state[0], num_steps=problem.num_steps,
                       **problem.evaluate(state[0], buffers))


class Trajectory:
    """One training run with its optimizer states kept every ``interval`` steps."""

    def __init__(self, problem: Problem, theta0: torch.Tensor, *, checkpoint="all"):
        self.problem = problem
        self.num_steps = problem.num_steps
        self.interval = checkpoint_interval(checkpoint, self.num_steps)
        self.policy = checkpoint
        state = problem.optimizer.init(theta0)
        self.buffers = problem.model.initial_buffers()  # running statistics at theta_T (eval)
        self.checkpoints: dict[int, tuple] = {}
        for t0 in range(0, self.num_steps, self.interval):
            t1 = min(t0 + self.interval, self.num_steps)
            if self.interval == 1:
                self.checkpoints[t0] = state
            else:
                self.checkpoints[t0] = tuple(x.clone() for x in state)
            state, _ = run_segment(problem, state, t0, t1, keep=False, buffers=self.buffers)
        self.final_state = state

    @classmethod
    def start_only(cls, problem: Problem, theta0: torch.Tensor) -> "Trajectory":
        """Only the initial state, without training: enough for JVPs (which start from theta_0
        and replay training themselves); anything needing later states raises."""
        self = cls.__new__(cls)
        self.problem, self.num_steps, self.policy = problem, problem.num_steps, "start"
        self.interval = problem.num_steps
        self.checkpoints = {0: problem.optimizer.init(theta0)}
        self.final_state = None
        self.buffers = problem.model.initial_buffers()
        return self

    @property
    def theta0(self):
        return self.checkpoints[0][0]

    @property
    def thetaT(self):
        if self.final_state is None:
            raise RuntimeError("this Trajectory holds only theta_0 (start_only): no theta_T")
        return self.final_state[0]

    @property
    def stored_states(self) -> int:
        """States held at once during a reverse sweep: checkpoints + one segment buffer."""
        return len(self.checkpoints) + (self.interval if self.interval > 1 else 0)

    def segments(self):
        return [(t0, min(t0 + self.interval, self.num_steps)) for t0 in sorted(self.checkpoints)]

    def reversed_states(self):
        """Yield (t, s_t) for t = T-1, ..., 0, replaying one segment at a time."""
        if self.final_state is None:
            raise RuntimeError("this Trajectory holds only theta_0 (start_only): no reverse sweep")
        for t0, t1 in reversed(self.segments()):
            if self.interval == 1:
                yield t0, self.checkpoints[t0]
                continue
            _, buf = run_segment(self.problem, self.checkpoints[t0], t0, t1, keep=True)
            for t in range(t1 - 1, t0 - 1, -1):
                yield t, buf[t - t0]

    def verify_replay(self) -> None:
        """Replay every segment and require the result to equal the next checkpoint bit for bit."""
        segs = self.segments()
        for i, (t0, t1) in enumerate(segs):
            end, _ = run_segment(self.problem, self.checkpoints[t0], t0, t1, keep=False)
            ref = self.checkpoints[segs[i + 1][0]] if i + 1 < len(segs) else self.final_state
            for name, a, b in zip(self.problem.optimizer.state_names, end, ref):
                if not torch.equal(a, b):
                    raise NondeterminismError(
                        f"replaying steps {t0}..{t1 - 1} gave a different {name} than the stored "
                        f"trajectory (max diff {float((a - b).abs().max()):.3e})"
                        + _cause(self.problem))
        log.debug("replay of %d segments matches the stored trajectory bit for bit", len(segs))


class NondeterminismError(RuntimeError):
    """Two replays of the same recipe disagree: J is not a well-defined matrix."""


def _cause(problem: Problem) -> str:
    causes = []
    if problem.recipe.data.shuffle == "unseeded":
        causes.append("unseeded batch shuffling (data.shuffle='unseeded')")
    try:
        x, _ = problem.at(0)
        culprit = problem.model.unseeded_randomness(problem.model.theta0(), x)
    except Exception:  # noqa: BLE001 - diagnosis only
        culprit = None
    if culprit:
        causes.append(f"unseeded randomness in {culprit}: draw random numbers only through "
                      f"nn.Dropout (tjac seeds it per step)")
    if causes:
        return "; cause: " + " and ".join(causes)
    return "; cause unknown (non-deterministic kernels? set torch.use_deterministic_algorithms)"
