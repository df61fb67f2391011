"""A recipe made concrete: model, data on the device, batch order, loss and optimizer.

:class:`Problem` exposes ``loss(theta, t)``, ``grad(theta, t)``, ``grad_hvp(theta, V, t)``,
``hvp(theta, V, t)`` and ``step(state, t)`` as fixed functions of the step index t (the batch, the
dropout masks and the learning rate are all functions of t), so every replay of the same theta_0
sees the same sequence of matrices. ``param_filter`` selects the coordinates J acts on
(:attr:`Problem.selection`).
"""

from __future__ import annotations

import fnmatch
import logging
import math
import os

import torch

from . import _checks, data, models, optim
from .models import ModelError
from .recipe import Recipe

log = logging.getLogger(__name__)


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
    """A recipe made concrete (see the module docstring).

    ``model_backend="func"`` makes the built-in MLP use torch.func derivatives instead of its
    hand-derived ones (the oracle in tests)."""

    def __init__(self, recipe: Recipe, *, model_backend: str = "manual"):
        self.recipe = recipe
        self.dtype = _checks.resolve_dtype(recipe.dtype)
        self.device = _checks.resolve_device(recipe.device)
        if self.device.type == "cuda":
            cuda_determinism()
        self.data = data.load(recipe.data, dtype=self.dtype, device=self.device)
        n = self.data.x_train.shape[0]
        self.order = data.BatchOrder(n, recipe.batch_size, recipe.data.shuffle,
                                     recipe.data.shuffle_seed, self.device,
                                     drop_last=recipe.data.drop_last)
        self.num_steps = self.order.per_epoch * recipe.epochs
        if self.order.dropped:
            log.warning("%s", dropped_note(n, recipe.batch_size, self.order.dropped))
        _refuse_oversized(recipe, models.count_params(recipe, self.data, self.dtype), self.dtype,
                          self.device)  # before a single parameter is allocated
        self.model = models.build(recipe, self.data, dtype=self.dtype, device=self.device,
                                  backend=model_backend)
        self.optimizer = optim.build(recipe.optim, self.num_steps)
        self.optimizer.init(self.model.theta0())  # a user optimizer learns its state layout here
        check_fits(self, checkpoint=None, block=0)
        self._fixed = recipe.data.shuffle == "none"
        if self._fixed:  # slice once: the same tensors every replay
            self._batches = [self._slice(self.order.indices(b)) for b in range(self.order.per_epoch)]
        self._check_model()
        self.selection, self.selected_layout = _select(self.model.layout, recipe.param_filter,
                                                       self.device)

    # -- checks before any training ---------------------------------------------------------------
    def _check_model(self) -> None:
        """Outputs that fit the targets, labels in range, no buffer mutated outside BatchNorm."""
        x, y = self.at(0)
        theta = self.model.theta0()
        try:
            out, changed = self.model.probe(theta, x)
        except Exception as e:  # noqa: BLE001 - a user's forward failed on the data
            raise ModelError(f"the model's forward failed on a batch of inputs of shape "
                             f"{tuple(x.shape)}: {type(e).__name__}: {e}") from None
        if not isinstance(out, torch.Tensor):
            raise ModelError(f"the model must return a tensor, got {type(out).__name__}")
        name = self.recipe.loss
        if name == "cross_entropy":
            if out.ndim != 2 or out.shape[0] != x.shape[0]:
                raise ModelError(f"cross_entropy needs outputs of shape (batch, classes); the model "
                                 f"gives {tuple(out.shape)} for targets of shape {tuple(y.shape)}")
            if self.data.n_classes is None:
                raise ModelError("cross_entropy needs integer class labels; the data has float "
                                 "targets (use loss='mse')")
            ymax = int(max(self.data.y_train.max(), self.data.y_test.max()))
            ymin = int(min(self.data.y_train.min(), self.data.y_test.min()))
            if ymin < 0 or ymax >= out.shape[1]:
                raise ModelError(f"labels must lie in [0, {out.shape[1]}) for a model with "
                                 f"{out.shape[1]} outputs; the data has labels in [{ymin}, {ymax}]")
        elif name == "mse":
            if out.shape != y.shape and not (out.numel() == y.numel() and out.shape[0] == y.shape[0]
                                             and out.shape[1:] in ((1,), ()) and y.ndim <= 1):
                raise ModelError(f"mse needs outputs shaped like the targets; the model gives "
                                 f"{tuple(out.shape)} for targets of shape {tuple(y.shape)}")
            if not y.dtype.is_floating_point:
                y = y.to(self.dtype)
        with torch.no_grad():
            value = self.model.loss_fn(out, y)
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise ModelError(f"loss {name!r} must return a scalar (the batch mean), got "
                             f"{getattr(value, 'shape', type(value).__name__)}")
        if changed:
            raise ModelError(f"the model's forward changes the buffers {changed} outside BatchNorm's "
                             f"running statistics; tjac carries buffers as constants of the "
                             f"replay and cannot follow that")
        self._check_derivatives(theta, x, y)

    def _check_derivatives(self, theta, x, y) -> None:
        """One HVP and one optimizer step, tangent and adjoint, before any training: what every
        product needs must run (forward-over-reverse through the model and loss; torch.func through
        a user's optimizer), and a user's update must not modify tensors in place (the stored
        trajectory would change under it)."""
        gen = torch.Generator().manual_seed(0)
        V = torch.randn(1, theta.numel(), generator=gen, dtype=torch.float64).to(theta)
        try:
            g, hv = self.model.grad_hvp(theta, x, y, V)
        except Exception as e:  # noqa: BLE001 - reported as bad input, with torch's reason
            raise ModelError(f"the model and loss {self.recipe.loss!r} cannot be differentiated "
                             f"twice (forward-over-reverse, which every product of J needs): "
                             f"{type(e).__name__}: {_first_line(e)}") from None
        opt = self.optimizer
        state = opt.init(theta.clone())
        versions = [t._version for t in state]
        try:
            opt.update(state, g, 0)
            if any(t._version != v for t, v in zip(state, versions)):
                raise ModelError(f"optimizer {self.recipe.optim.factory!r}: update() modifies its "
                                 f"state or params in place; return new tensors instead")
            zeros = tuple(torch.zeros_like(V) for _ in state)
            opt.jvp(state, g, zeros, hv, 0)
            opt.vjp(state, g, zeros, 0)
        except ModelError:
            raise
        except Exception as e:  # noqa: BLE001
            raise ModelError(f"optimizer {self.recipe.optim.factory or self.recipe.optim.name!r}: "
                             f"one step or its tangent/adjoint map failed: {type(e).__name__}: "
                             f"{_first_line(e)}") from None

    # -- properties -------------------------------------------------------------------------------
    @property
    def stochastic(self) -> bool:
        return self.model.stochastic or self.recipe.data.shuffle == "unseeded"

    @property
    def num_params(self) -> int:
        return self.model.num_params

    @property
    def layout(self):
        return self.model.layout

    # -- the steps --------------------------------------------------------------------------------
    def _slice(self, idx):
        return self.data.x_train[idx], self.data.y_train[idx]

    def batch(self, t: int):
        if self._fixed:
            return self._batches[t % self.order.per_epoch]
        return self._slice(self.order.indices(t))

    def init_theta(self) -> torch.Tensor:
        return self.model.theta0()

    def at(self, t: int):
        """Step t's batch, with the model's dropout keyed for step t."""
        if self.model.dropouts:
            self.model.set_step(t)
        return self.batch(t)

    def loss(self, theta, t):
        return self.model.loss(theta, *self.at(t))

    def grad(self, theta, t):
        return self.model.grad(theta, *self.at(t))

    def grad_hvp(self, theta, V, t, *, reverse: bool = False):
        """(g, H V) on step t's batch; ``reverse``: by double backward
        (:meth:`tjac.models.base.Model.grad_hvp_reverse`) instead of forward-over-reverse."""
        x, y = self.at(t)
        if reverse:
            return self.model.grad_hvp_reverse(theta, x, y, V)
        return self.model.grad_hvp(theta, x, y, V)

    def hvp(self, theta, V, t, *, reverse: bool = False):
        """H V alone on step t's batch (the gradient is not wanted: a VJP's HVPs)."""
        if reverse:
            return self.grad_hvp(theta, V, t, reverse=True)[1]
        return self.model.hvp(theta, *self.at(t), V)

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

    def evaluate(self, theta, buffers: dict | None = None) -> dict:
        """Loss (and accuracy, for classification) on the full train and test sets, in eval mode
        (dropout off; BatchNorm on the running statistics ``buffers`` of the trajectory)."""
        out = {}
        chunk = max(1024, 8 * self.recipe.batch_size)  # bounded memory on large data sets
        for split in ("train", "test"):
            x, y = getattr(self.data, f"x_{split}"), getattr(self.data, f"y_{split}")
            loss = hits = 0.0
            for i in range(0, len(x), chunk):
                z = self.model.eval_outputs(theta, x[i:i + chunk], buffers)
                yi = y[i:i + chunk]
                with torch.no_grad():  # the loss is a batch mean: weight it by the chunk's size
                    loss += float(self.model.loss_fn(z, yi)) * len(yi)
                if self.data.n_classes is not None and z.ndim == 2:
                    hits += float((z.argmax(-1) == yi).to(torch.float64).sum())
                else:
                    hits = float("nan")
            out[f"{split}_loss"] = loss / len(x)
            out[f"{split}_acc"] = hits / len(x)
        return out


def dropped_note(n: int, batch_size: int, dropped: int) -> str:
    """The one-line notice that ``dropped`` of ``n`` training examples are left out of every epoch."""
    return (f"{dropped} of the {n} training examples are dropped every epoch: batch size "
            f"{batch_size} leaves a partial last batch ({n // batch_size} full batches, "
            f"{n // batch_size * batch_size} examples, per epoch); drop_last=False "
            f"(--no-drop-last) trains on them as a smaller last batch")


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def _select(layout, patterns, device):
    """Indices of theta matched by ``param_filter`` (names or glob patterns), or (None, layout)."""
    if not patterns:
        return None, layout
    chosen, unmatched = [], []
    for pat in patterns:
        hit = [p for p in layout if fnmatch.fnmatchcase(p.name, pat)]
        if not hit:
            unmatched.append(pat)
        chosen.extend(hit)
    if unmatched:
        raise ValueError(f"param_filter {unmatched} matches no parameter; the parameters are "
                         f"{', '.join(p.name for p in layout)}")
    keep = [p for p in layout if p in set(chosen)]  # theta order, no duplicates
    idx = torch.cat([torch.arange(p.offset, p.offset + p.size) for p in keep]).to(device)
    sub, off = [], 0
    for p in keep:
        sub.append(models.ParamInfo(p.name, p.shape, off))
        off += p.size
    return idx, tuple(sub)


# -- memory ----------------------------------------------------------------------------------------
def checkpoint_interval(policy, num_steps: int) -> int:
    if policy == "all":
        return 1
    if policy == "sqrt":
        return max(1, math.ceil(math.sqrt(num_steps)))
    if isinstance(policy, int) and not isinstance(policy, bool) and policy > 0:
        return policy
    raise ValueError(f"`checkpoint` must be 'all', 'sqrt' or a positive integer, got {policy!r}")


def memory_estimate(prob: Problem, *, checkpoint="all", block: int = 128, basis: int = 0) -> int:
    """Bytes for: stored states (checkpoints + a segment buffer) + a block's tangents and one
    step's work + a Krylov basis (2 x basis vectors).

    A step's work: once measured (``prob.activation``, a
    :class:`tjac.memory.ActivationEstimate` set by :meth:`tjac.TrainingJacobian.check` or
    :meth:`~tjac.TrainingJacobian.measure_activation`), the held tangents (state x k) plus the
    measured peak of one step at width k (the model's intermediates included); before that, the
    tangents and two more P x k arrays (gradient and HVP), without the model's intermediates."""
    P = prob.num_params
    item = torch.empty((), dtype=prob.dtype).element_size()
    n_state = len(prob.optimizer.state_names)
    if checkpoint is None:  # training only: the current state and its gradient
        stored = 2
    else:
        interval = checkpoint_interval(checkpoint, prob.num_steps)
        stored = -(-prob.num_steps // interval) + (interval if interval > 1 else 0)
    return item * (P * n_state * stored + 2 * P * basis) + step_bytes(prob, block)


def step_bytes(prob: Problem, block: int) -> int:
    """Bytes of one replay step of ``block`` vectors beside the stored states: the held tangents
    (state x block) and the measured peak of the step (``prob.activation``), or, before that is
    measured, the tangents and two more P x block arrays (gradient and HVP)."""
    P = prob.num_params
    item = torch.empty((), dtype=prob.dtype).element_size()
    n_state = len(prob.optimizer.state_names)
    act = getattr(prob, "activation", None)
    return (item * P * n_state * block + act.at(block) if act is not None
            else item * P * (n_state + 2) * block)


def _refuse_oversized(recipe, P, dtype, device) -> None:
    """The training-only footprint (theta, gradient and optimizer state), checked from the
    parameter count before the model is built."""
    if P is None:
        return
    n_state = 3 if recipe.optim.name in ("adam", "adamw") else 2
    need = torch.empty((), dtype=dtype).element_size() * P * (n_state + 2)
    have = _checks.available_bytes(device)  # None: unknown, nothing refused
    if have is not None and need > 0.9 * have:
        raise MemoryError(f"this recipe needs about {need / 2**30:.1f} GiB for P={P} parameters "
                          f"({n_state + 2} vectors of P: optimizer state, gradient, workspace) but {have / 2**30:.1f} GiB are "
                          f"available on {device}; use a smaller model")


def check_fits(prob: Problem, *, checkpoint="all", block: int = 128, basis: int = 0) -> None:
    need = memory_estimate(prob, checkpoint=checkpoint, block=block, basis=basis)
    have = _checks.available_bytes(prob.device)  # None: unknown, nothing refused
    if have is not None and need > 0.9 * have:
        raise MemoryError(
            f"this recipe needs about {need / 2**30:.1f} GiB (P={prob.num_params} x "
            f"{len(prob.optimizer.state_names)} state tensors x (checkpoints + block {block})"
            f"{' + measured step work' if getattr(prob, 'activation', None) else ''}"
            f"{f' + basis {basis}' if basis else ''}) but {have / 2**30:.1f} GiB are available on "
            f"{prob.device}; use checkpoint='sqrt', a smaller block or a smaller model")
