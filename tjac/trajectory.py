"""Training as a pure function of theta_0, the stored trajectory, and segment replay.

:class:`Problem` binds a model, data, batch order and optimizer: ``loss(theta, t)``,
``grad(theta, t)``, ``grad_hvp(theta, V, t)`` and ``step(state, t)`` are fixed functions of the step
index t, so every replay of the same theta_0 sees the same sequence of matrices.

:class:`Trajectory` runs training once and keeps the optimizer state at checkpoints (policy ``all``:
every step; ``sqrt``: every ceil(sqrt(T)) steps; an int c: every c steps). ``reversed_states()``
walks t = T-1..0, recomputing each segment forward into a buffer; the recomputed states are the
same computation as the stored ones, so they agree bit for bit (``check()`` verifies it).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import torch

from . import _checks, data, models, optim
from .recipe import Recipe

log = logging.getLogger(__name__)


class TrainingDivergedError(FloatingPointError):
    """Training produced NaN/inf; ``step`` is the first step whose result is not finite."""

    def __init__(self, step: int, what: str = "parameters"):
        super().__init__(f"training produced non-finite {what} at step {step}")
        self.step = step


def cuda_determinism() -> None:
    """Bitwise-reproducible replays on CUDA: deterministic kernels, no TF32 anywhere (TF32 would
    round float32 matmuls to 10 mantissa bits and blur sigma = 1 +- 1e-6), cuBLAS workspace pinned.
    CUBLAS_WORKSPACE_CONFIG must be set before cuBLAS initialises: tjac sets it at import."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


class Problem:
    """A recipe made concrete: model, data on the device, batch order, optimizer, number of steps."""

    def __init__(self, recipe: Recipe, *, model_backend: str = "manual"):
        self.recipe = recipe
        self.dtype = _checks.resolve_dtype(recipe.dtype)
        self.device = _checks.resolve_device(recipe.device)
        if self.device.type == "cuda":
            cuda_determinism()
        self.data = data.load(recipe.data, dtype=self.dtype, device=self.device)
        self.model = models.build(recipe.model, self.data.n_features, self.data.n_classes,
                                  backend=model_backend)
        n = self.data.x_train.shape[0]
        self.order = data.BatchOrder(n, recipe.batch_size, recipe.data.shuffle,
                                     recipe.data.shuffle_seed, self.device)
        self.num_steps = self.order.per_epoch * recipe.epochs
        self.optimizer = optim.build(recipe.optim, self.num_steps)
        check_fits(self, checkpoint=None, block=0)  # refuse before allocating theta_0
        self._fixed = recipe.data.shuffle == "none"
        if self._fixed:  # slice once: the same tensors every replay
            self._batches = [self._slice(self.order.indices(b)) for b in range(self.order.per_epoch)]

    @property
    def stochastic(self) -> bool:
        return self.model.stochastic or self.recipe.data.shuffle == "unseeded"

    @property
    def num_params(self) -> int:
        return self.model.num_params

    @property
    def layout(self):
        return self.model.layout

    def _slice(self, idx):
        return self.data.x_train[idx], self.data.y_train[idx]

    def batch(self, t: int):
        if self._fixed:
            return self._batches[t % self.order.per_epoch]
        return self._slice(self.order.indices(t))

    def init_theta(self) -> torch.Tensor:
        return self.model.init(self.recipe.seed, dtype=self.dtype, device=self.device)

    def loss(self, theta, t):
        return self.model.loss(theta, *self.batch(t))

    def grad(self, theta, t):
        return self.model.grad(theta, *self.batch(t))

    def grad_hvp(self, theta, V, t):
        return self.model.grad_hvp(theta, *self.batch(t), V)

    def step(self, state, t):
        return self.optimizer.update(state, self.grad(state[0], t), t)

    def validate_theta0(self, theta0) -> torch.Tensor:
        if theta0 is None:
            return self.init_theta()
        if not isinstance(theta0, torch.Tensor):
            raise TypeError(f"`theta0` must be a torch.Tensor, got {type(theta0).__name__}")
        if theta0.shape != (self.num_params,):
            raise ValueError(f"`theta0` must have shape ({self.num_params},) (see param_layout), "
                             f"got {tuple(theta0.shape)}")
        if theta0.dtype != self.dtype:
            raise TypeError(f"`theta0` must have dtype {self.dtype} (the recipe's), got {theta0.dtype}")
        return theta0.detach().to(self.device).clone()

    def evaluate(self, theta):
        with torch.no_grad():
            out = {}
            for split in ("train", "test"):
                x, y = getattr(self.data, f"x_{split}"), getattr(self.data, f"y_{split}")
                z = self.model.logits(theta, x) if not self.model.stochastic else \
                    _eval_logits(self.model, theta, x)
                out[f"{split}_loss"] = float(models.cross_entropy(z, y))
                out[f"{split}_acc"] = float((z.argmax(-1) == y).to(torch.float64).mean())
            return out


def _eval_logits(model, theta, x):
    masks = [None] * (len(model.widths) - 2)
    return model.logits(theta, x, masks)


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


def run_segment(problem: Problem, state, t0: int, t1: int, *, keep: bool, check_finite: bool = True):
    """Steps t0..t1-1 from ``state`` (= s_t0). Returns s_t1 and, with ``keep``, [s_t0..s_t1-1]."""
    kept = []
    with torch.no_grad():
        for t in range(t0, t1):
            if keep:
                kept.append(state)
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
    state, _ = run_segment(problem, state, 0, problem.num_steps, keep=False)
    return TrainResult(theta0=theta0, thetaT=state[0], num_steps=problem.num_steps,
                       **problem.evaluate(state[0]))


def checkpoint_interval(policy, num_steps: int) -> int:
    if policy == "all":
        return 1
    if policy == "sqrt":
        return max(1, math.ceil(math.sqrt(num_steps)))
    if isinstance(policy, int) and not isinstance(policy, bool) and policy > 0:
        return policy
    raise ValueError(f"`checkpoint` must be 'all', 'sqrt' or a positive integer, got {policy!r}")


def available_bytes(device) -> int:
    if torch.device(device).type == "cuda":
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover
        pass
    return 1 << 62


def memory_estimate(prob: Problem, *, checkpoint="all", block: int = 128, basis: int = 0) -> int:
    """Bytes for: stored states (checkpoints + a segment buffer) + block tangents (state x k, and
    the model's per-step intermediates ~ 4 x batch x widest layer x k) + a Krylov basis."""
    P = prob.num_params
    item = torch.empty((), dtype=prob.dtype).element_size()
    n_state = len(prob.optimizer.state_names)
    if checkpoint is None:  # training only: the current state and its gradient
        stored = 2
    else:
        interval = checkpoint_interval(checkpoint, prob.num_steps)
        stored = -(-prob.num_steps // interval) + (interval if interval > 1 else 0)
    return item * (P * n_state * stored + P * (n_state + 2) * block + 2 * P * basis)


def check_fits(prob: Problem, *, checkpoint="all", block: int = 128, basis: int = 0) -> None:
    need = memory_estimate(prob, checkpoint=checkpoint, block=block, basis=basis)
    have = available_bytes(prob.device)
    if need > 0.9 * have:
        raise MemoryError(
            f"this recipe needs about {need / 2**30:.1f} GiB (P={prob.num_params} x "
            f"{len(prob.optimizer.state_names)} state tensors x (checkpoints + block {block})"
            f"{f' + basis {basis}' if basis else ''}) but {have / 2**30:.1f} GiB are available on "
            f"{prob.device}; use checkpoint='sqrt', a smaller block or a smaller model")


class Trajectory:
    """One training run with its optimizer states kept every ``interval`` steps."""

    def __init__(self, problem: Problem, theta0: torch.Tensor, *, checkpoint="all"):
        self.problem = problem
        self.num_steps = problem.num_steps
        self.interval = checkpoint_interval(checkpoint, self.num_steps)
        self.policy = checkpoint
        state = problem.optimizer.init(theta0)
        self.checkpoints: dict[int, tuple] = {}
        for t0 in range(0, self.num_steps, self.interval):
            t1 = min(t0 + self.interval, self.num_steps)
            if self.interval == 1:
                self.checkpoints[t0] = state
            else:
                self.checkpoints[t0] = tuple(x.clone() for x in state)
            state, _ = run_segment(problem, state, t0, t1, keep=False)
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
    if problem.model.stochastic:
        causes.append(f"dropout={problem.recipe.model.dropout}")
    if problem.recipe.data.shuffle == "unseeded":
        causes.append("unseeded batch shuffling (data.shuffle='unseeded')")
    if causes:
        return "; cause: " + " and ".join(causes)
    return "; cause unknown (non-deterministic kernels? set torch.use_deterministic_algorithms)"
