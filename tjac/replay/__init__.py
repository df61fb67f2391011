r"""Block replays: how a block of k tangents (JVP) or cotangents (VJP) is carried through training.

Every backend computes the same J V and J^T W of the same run; the suite holds each to the eager
path at ~1e-12 relative (they differ only in the order of floating-point sums).

``eager``
    The model's ``grad_hvp`` on (k, P) blocks and the optimizer's elementwise tangent/adjoint maps.
    Any model family: a module :mod:`tjac.models.graph` reads (the built-in CNN and transformer,
    most users' CNNs and transformers) through hand-derived rules, anything else through
    ``torch.func``.
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
    eager for the CNN and transformer JVPs through torch.func (a module the hand-derived rules
    read is compiled through torch.func's path too). Its first product in each direction is
    checked against eager; a wrong graph (the transformer's VJP on torch 2.13) falls back to eager.
    Chosen only by :func:`autotune` (which measures it) or by name.
``double-backward``
    ``eager`` with every HVP by reverse-over-reverse (autograd's double backward, the second
    backward batched over the block) instead of torch.func's forward-over-reverse: the same
    products to round-off; measured 1.2x faster on a plain-module MLP, 3x slower per vector and
    step on a BatchNorm CNN (BENCHMARKS.md "User models"), so it is only kept where it times faster.
    Chosen by :func:`autotune` (measured at the best width of the others) or by name.

:func:`make` builds one by name; ``"auto"`` is ``fused`` where it applies, else ``eager``.
"""

from __future__ import annotations

from .compiled import CompiledReplay
from .eager import DoubleBackwardReplay, EagerReplay
from .fused import FusedMLPReplay
from .support import (BACKENDS, CompileMismatch, Unsupported, _require, compiler_available,
                      supported)

_CLASSES = {"eager": EagerReplay, "fused": FusedMLPReplay, "compiled": CompiledReplay,
            "double-backward": DoubleBackwardReplay}


def resolve(problem, name: str) -> str:
    if name == "auto":
        return "fused" if supported(problem, "fused") is None else "eager"
    if name not in BACKENDS:
        raise ValueError(f"unknown replay backend {name!r}; expected 'auto' or one of {BACKENDS}")
    _require(problem, name)
    return name


def make(problem, trajectory, name: str = "auto"):
    return _CLASSES[resolve(problem, name)](problem, trajectory)



from .autotune import autotune  # noqa: E402 (autotune builds replays through make)

__all__ = ["BACKENDS", "autotune", "DoubleBackwardReplay", "EagerReplay", "FusedMLPReplay", "CompiledReplay", "CompileMismatch",
           "Unsupported", "compiler_available", "make", "resolve", "supported"]
