r"""One model protocol: any ``torch.nn.Module`` seen as a function of one flat parameter vector.

theta is the trainable parameters (``requires_grad``) in ``named_parameters()`` order, flattened
and concatenated; ``layout`` gives every tensor's (name, shape, offset). A :class:`Model` provides

* ``loss(theta, x, y)``                 the batch-mean loss of one minibatch,
* ``grad(theta, x, y)``                 its gradient g,
* ``grad_hvp(theta, x, y, V[k, P])``    (g, H V) with H the minibatch Hessian (symmetric),
* ``hvp(theta, x, y, V[k, P])``         H V alone (by default grad_hvp's),

through ``torch.func.functional_call`` (forward-over-reverse, vmapped over the block so the primal
is computed once). :class:`~tjac.models.graph.GraphModel` replaces ``grad_hvp`` with hand-derived
rules where it can read the module; MLP chains get :class:`~tjac.models.mlp.MLPModel`. Frozen parameters and buffers are constants of the replays: J is taken with
respect to theta only. BatchNorm in train mode normalises with batch statistics, a deterministic
function of theta and the batch; its running statistics are carried alongside training
(:meth:`Model.update_buffers`) for evaluation and never differentiated. Dropout layers are replaced
by :class:`~tjac.models.layers.SeededDropout`, keyed per step (:meth:`Model.set_step`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, jvp, vmap
from torch.func import grad as func_grad

from .layers import SeededDropout, step_key
from .losses import cross_entropy


class ModelError(ValueError):
    """A model that cannot be used (the message says which rule it breaks)."""


@dataclass(frozen=True)
class ParamInfo:
    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def size(self) -> int:
        return math.prod(self.shape)


_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)


def seed_dropouts(module: nn.Module) -> list[SeededDropout]:
    """Replace every ``nn.Dropout``/``Dropout1d/2d/3d`` in ``module`` (in place) by a
    :class:`SeededDropout` of the same p; return all seeded dropouts in module order."""
    for name, child in list(module.named_children()):
        if isinstance(child, (nn.AlphaDropout, nn.FeatureAlphaDropout)):
            raise ModelError(f"{type(child).__name__} at {name!r} is not supported (its masks "
                             f"cannot be replayed); use nn.Dropout")
        if isinstance(child, _DROPOUTS):
            setattr(module, name, SeededDropout(child.p, channelwise=not isinstance(child, nn.Dropout)))
        else:
            seed_dropouts(child)
    return [m for m in module.modules() if isinstance(m, SeededDropout)]


def _describe(name: str, module: nn.Module, root: nn.Module) -> str:
    return f"{name} ({type(module).__name__})" if name else f"the model's own forward ({type(root).__name__})"


class Model:
    """A module, its loss and one flat parameter vector (see the module docstring).

    Parameters
    ----------
    module : nn.Module
        Built by the caller (its parameters are theta_0); cast to ``dtype``/``device`` here.
    loss : callable
        ``loss(outputs, targets)`` -> batch mean.
    seed : int
        Keys the dropout masks: step t uses ``step_key(seed, t, layer)``.
    allow_downcast : bool
        The built-in families draw theta_0 in float64 and cast it to a float32 recipe; a user's
        float64 parameters under a float32 recipe are refused instead.
    """

    def __init__(self, module: nn.Module, loss=cross_entropy, *, seed: int = 0,
                 dtype=torch.float64, device="cpu", allow_downcast: bool = False):
        if not isinstance(module, nn.Module):
            raise ModelError(f"expected a torch.nn.Module, got {type(module).__name__}")
        self.loss_fn, self.seed = loss, int(seed)
        self.chain = None  # (widths, activation) of a verified MLP chain (tjac.models.chain)
        self.dtype, self.device = dtype, torch.device(device)
        self.dropouts = seed_dropouts(module)
        for name, p in module.named_parameters():
            if (not allow_downcast and p.dtype.is_floating_point
                    and torch.finfo(p.dtype).bits > torch.finfo(dtype).bits):
                raise ModelError(f"parameter {name!r} is {p.dtype} but the recipe is {dtype}; "
                                 f"refusing to downcast silently (use dtype='float64')")
        module = module.to(device=self.device, dtype=dtype).train()
        self.module = module
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        if not named:
            raise ModelError(f"the model ({type(module).__name__}) has no trainable parameters "
                             f"(requires_grad=True)")
        layout, off = [], 0
        for n, p in named:
            layout.append(ParamInfo(n, tuple(p.shape), off))
            off += p.numel()
        self.layout = tuple(layout)
        with torch.no_grad():
            self._theta0 = torch.cat([p.detach().reshape(-1) for _, p in named])  # a copy
        # the copy that derivatives go through: BatchNorm uses batch statistics and neither reads
        # nor writes running statistics there (in-place updates cannot run inside torch.func)
        self._fmodule = copy.deepcopy(module)
        torch.func.replace_all_batch_norm_modules_(self._fmodule)
        self._fdropouts = [m for m in self._fmodule.modules() if isinstance(m, SeededDropout)]
        self.running = {n: b for n, b in module.named_buffers()}  # carried, not differentiated
        self._tracks = any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
                           for m in module.modules())

    # -- layout ---------------------------------------------------------------------------------
    @property
    def num_params(self) -> int:
        last = self.layout[-1]
        return last.offset + last.size

    @property
    def stochastic(self) -> bool:
        """Whether training draws random numbers (seeded dropout: replayable)."""
        return any(d.p > 0 for d in self.dropouts)

    @property
    def has_running_buffers(self) -> bool:
        return self._tracks

    def theta0(self) -> torch.Tensor:
        return self._theta0.clone()

    def unflatten(self, theta: torch.Tensor) -> list[torch.Tensor]:
        return [theta[..., p.offset:p.offset + p.size].reshape(*theta.shape[:-1], *p.shape)
                for p in self.layout]

    def params(self, theta) -> dict:
        return {p.name: t for p, t in zip(self.layout, self.unflatten(theta))}

    # -- randomness -------------------------------------------------------------------------------
    def set_step(self, t: int) -> None:
        """Key every dropout layer for step t (a pure function of (seed, t, layer))."""
        for i, (a, b) in enumerate(zip(self.dropouts, self._fdropouts)):
            a.key = b.key = step_key(self.seed, t, i)

    # -- the function -----------------------------------------------------------------------------
    def forward(self, theta, x):
        """Model outputs for a batch, parameters from theta (train mode)."""
        return functional_call(self._fmodule, self.params(theta), (x,))

    def loss(self, theta, x, y):
        return self.loss_fn(self.forward(theta, x), y)

    def _loss_of(self, x, y):
        return lambda params: self.loss_fn(functional_call(self._fmodule, params, (x,)), y)

    def _flat(self, tensors: dict, lead: tuple = ()) -> torch.Tensor:
        return torch.cat([tensors[p.name].reshape(*lead, -1) for p in self.layout], -1)

    def grad(self, theta, x, y):
        # derivatives are taken with respect to the parameter tensors, not the flat theta: the
        # backward of slicing theta would fill a zero P-vector per tensor (measured: 25% of an HVP)
        return self._flat(func_grad(self._loss_of(x, y))(self.params(theta)))

    def grad_hvp(self, theta, x, y, V):
        g_fn = func_grad(self._loss_of(x, y))
        g, hv = vmap(lambda v: jvp(g_fn, (self.params(theta),), (v,)),
                     randomness="same")(self.params(V))
        return self._flat({n: t[0] for n, t in g.items()}), self._flat(hv, (V.shape[0],))

    def hvp(self, theta, x, y, V):
        """H V alone (a VJP's HVPs discard the gradient); models that can skip the gradient's own
        products override it."""
        return self.grad_hvp(theta, x, y, V)[1]

    def grad_hvp_reverse(self, theta, x, y, V):
        """(g, H V) as :meth:`grad_hvp`, by reverse-over-reverse: autograd's double backward, the
        second one batched over the block (``is_grads_batched``). The same numbers to round-off
        (H is symmetric); faster than forward-over-reverse where torch.func's batched tangents of
        elementwise derivatives dominate (measured: plain-module MLPs and convolutions), slower
        for attention. Used by the ``double-backward`` replay backend."""
        k = V.shape[0]
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in self.unflatten(theta)]
            params = {p.name: t for p, t in zip(self.layout, leaves)}
            loss = self.loss_fn(functional_call(self._fmodule, params, (x,)), y)
            # a parameter the loss does not use has g = 0; one whose gradient does not depend on
            # theta (a linear path) has a g without a graph: both contribute no H V
            g = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True,
                                    materialize_grads=True)
            live = [i for i, gi in enumerate(g) if gi.requires_grad]
            vs = self.unflatten(V)
            hv = (torch.autograd.grad([g[i] for i in live], leaves, [vs[i] for i in live],
                                      is_grads_batched=True, allow_unused=True)
                  if live else [None] * len(leaves))
        return (torch.cat([t.detach().reshape(-1) for t in g]),
                torch.cat([(h.detach() if h is not None
                            else V.new_zeros((k,) + tuple(t.shape))).reshape(k, -1)
                           for h, t in zip(hv, leaves)], 1))

    # -- state carried alongside training ---------------------------------------------------------
    def initial_buffers(self) -> dict:
        return {n: b.clone() for n, b in self.running.items()}

    def update_buffers(self, theta, x, buffers: dict) -> None:
        """Advance running statistics (BatchNorm) in place by one training step's forward."""
        if not self._tracks:
            return
        with torch.no_grad():
            functional_call(self.module, {**self.params(theta), **buffers}, (x,))

    def eval_outputs(self, theta, x, buffers: dict | None = None):
        """Outputs in eval mode (dropout off, BatchNorm on the running statistics ``buffers``)."""
        self.module.eval()
        try:
            with torch.no_grad():
                state = {**self.params(theta), **(buffers if buffers is not None else {})}
                return functional_call(self.module, state, (x,))
        finally:
            self.module.train()

    # -- diagnosis --------------------------------------------------------------------------------
    def unseeded_randomness(self, theta, x) -> str | None:
        """Run the forward twice with the same theta, batch and step key, and name the module that
        draws unseeded random numbers: the first (in order of completion, so the innermost) whose
        inputs agree between the two runs but whose outputs do not. None if both runs agree."""
        names = {m: n for n, m in self._fmodule.named_modules()}
        seen: list[dict] = [{}, {}]
        done: list[list] = [[], []]
        run = [0]

        def tensors(obj):
            if isinstance(obj, torch.Tensor):
                return [obj.detach().clone()]
            if isinstance(obj, (tuple, list)):
                return [t for o in obj for t in tensors(o)]
            return []

        def pre(mod, inp):
            seen[run[0]].setdefault(id(mod), []).append(tensors(inp))

        def post(mod, inp, out):
            done[run[0]].append((mod, len(seen[run[0]][id(mod)]) - 1, tensors(out)))

        def same(a, b):
            return len(a) == len(b) and all(u.shape == v.shape and torch.equal(u, v)
                                            for u, v in zip(a, b))

        handles = [h for m in self._fmodule.modules()
                   for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
        try:
            with torch.no_grad():
                for r in (0, 1):
                    run[0] = r
                    self.forward(theta, x)
        finally:
            for h in handles:
                h.remove()
        for (mod, call, out_a), (_, _, out_b) in zip(*done):
            if same(seen[0][id(mod)][call], seen[1][id(mod)][call]) and not same(out_a, out_b):
                return _describe(names[mod], mod, self._fmodule)
        return None

    def probe(self, theta, x):
        """One train-mode forward without gradients: (outputs, the buffers it changed). BatchNorm's
        running statistics are not among this copy's buffers, so any change is one tjac cannot
        follow."""
        before = {n: b.clone() for n, b in self._fmodule.named_buffers()}
        with torch.no_grad():
            out = self.forward(theta, x)
        return out, [n for n, b in self._fmodule.named_buffers()
                     if n in before and not torch.equal(before[n], b)]
