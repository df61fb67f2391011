"""What each replay backend can handle, and the errors they share."""

from __future__ import annotations

BACKENDS = ("eager", "fused", "compiled", "double-backward")


class Unsupported(ValueError):
    """This backend cannot replay this recipe (the message says why)."""


class CompileMismatch(RuntimeError):
    """A compiled replay disagreed with the eager one."""


def _steps(problem, steps):
    return problem.num_steps if steps is None else min(int(steps), problem.num_steps)


def compiler_available() -> bool:
    """Whether torch.compile's CPU backend (inductor) can build kernels: it needs a C++ compiler."""
    import shutil

    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


def supported(problem, name: str) -> str | None:
    """None if backend ``name`` can replay this problem, else the reason it cannot."""
    from ..models import MLPModel

    opt = problem.optimizer
    if name == "fused":
        m = problem.model
        if not isinstance(m, MLPModel) or m.backend != "manual":
            what = problem.recipe.model.factory or problem.recipe.model.family
            return (f"the fused backend handles the built-in MLP with cross-entropy only, not "
                    f"{what!r} with loss {problem.recipe.loss!r}")
        if m.stochastic:
            return "the fused backend refuses dropout"
        if not getattr(opt, "elementwise", False):
            return ("the fused backend needs an elementwise optimizer (sgd, adam, adamw without "
                    "clip_norm)")
    if name == "compiled" and not hasattr(getattr(opt, "inner", opt), "spec"):
        return "the compiled backend handles the built-in optimizers only"
    if name == "compiled" and problem.model.stochastic:
        return "the compiled backend refuses dropout (random masks inside a graph)"
    if name == "compiled" and problem.device.type == "cpu" and not compiler_available():
        return "the compiled backend needs a C++ compiler (g++, c++ or clang++) on CPU"
    return None


def _require(problem, name: str) -> None:
    why = supported(problem, name)
    if why:
        raise Unsupported(why)


