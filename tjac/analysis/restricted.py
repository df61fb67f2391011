r"""Training restricted to a subspace (the paper's experiment 2).

Only c trains in theta = theta_0 + B c, with the recipe's optimizer and schedule acting on c (the
same batches, learning rates and momentum; weight decay, if any, therefore decays c, not theta):

    g_c(t) = B^T grad L_t(theta_0 + B c_t),   (c_{t+1}, opt state) = update((c_t, opt state), g_c, t).

B is a (P, k) orthonormal basis, or :class:`Complement` (Q): training in the orthogonal complement
of span Q with B = I - Q Q^T (c in R^P; only its component outside span Q moves theta). At large P
the bulk is not available as explicit vectors: the complement of the computed top and bottom
subspaces stands for it and random k-planes inside that complement for its k-dimensional pieces
(:func:`tjac.analysis.experiments.complement_basis`); the stored attributes say which was used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .. import optim
from ..trajectory import TrainingDivergedError
from .experiments import AnalysisResult, as_numpy, check_basis
from .response import problem_of, restrict, selected_P, shifted

METRICS = ("train_loss", "test_loss", "train_acc", "test_acc")


@dataclass(frozen=True)
class Complement:
    """The orthogonal complement of span Q (Q: (P, m) orthonormal) as a training subspace."""
    Q: object


@dataclass(frozen=True)
class Whole:
    """All columns of an orthonormal basis B at once (trained once in a sweep, not per k)."""
    B: object


def restricted_training(recipe, basis, *, theta0=None) -> dict:
    r"""Train only c in theta = theta_0 + B c (module doc) and return the final
    ``train_loss``, ``test_loss``, ``train_acc``, ``test_acc`` (full sets, eval mode), ``k`` (the
    subspace's dimension), ``c`` (numpy) and ``thetaT`` (full, torch). Training that produces
    non-finite parameters raises :class:`tjac.TrainingDivergedError`."""
    prob = problem_of(recipe)
    P = selected_P(prob)
    if isinstance(basis, Whole):
        basis = basis.B
    if isinstance(basis, Complement):
        Q = torch.from_numpy(check_basis(basis.Q, P, "Q")).to(prob.device, prob.dtype)
        proj = lambda x: x - Q @ (Q.T @ x)  # noqa: E731 - B = B^T = I - Q Q^T
        embed, pull, n_c, k = proj, proj, P, P - Q.shape[1]
    else:
        B = torch.from_numpy(check_basis(basis, P, "basis")).to(prob.device, prob.dtype)
        embed, pull, n_c, k = (lambda c: B @ c), (lambda g: B.T @ g), B.shape[1], B.shape[1]
    theta0 = prob.validate_theta0(theta0)
    opt = optim.build(prob.recipe.optim, prob.num_steps)
    state = opt.init(torch.zeros(n_c, dtype=prob.dtype, device=prob.device))
    buffers = prob.model.initial_buffers()
    track = prob.model.has_running_buffers
    with torch.no_grad():
        for t in range(prob.num_steps):
            theta = shifted(prob, theta0, embed(state[0]))
            if track:
                prob.model.update_buffers(theta, prob.at(t)[0], buffers)
            g = pull(restrict(prob, prob.grad(theta, t)))
            state = opt.update(state, g, t)
            if not bool(torch.isfinite(state[0]).all()):
                raise TrainingDivergedError(t)
    theta = shifted(prob, theta0, embed(state[0]))
    out = prob.evaluate(theta, buffers)
    out.update(k=int(k), c=state[0].cpu().numpy(), thetaT=theta)
    return out


def restricted_sweep(recipe, subspaces: dict, ks=(1, 2, 4, 8, 16, 32), *, theta0=None,
                     notes: dict | None = None, name: str = "restricted") -> AnalysisResult:
    r"""Restricted training for each named subspace and each k.

    ``subspaces`` maps a name to a (P, K) orthonormal basis, trained on its first k columns for
    every k <= K in ``ks`` (NaN for k > K), or to a :class:`Complement` or :class:`Whole` (trained
    once; its results go to attrs ``fixed``). Also trains the unrestricted recipe for reference (attrs ``full``).
    ``notes`` (JSON) records how each subspace was obtained (e.g. the large-P approximations).

    Returns arrays ``<metric>`` (subspace, k) for each of train/test loss and accuracy and
    ``k`` (k,); attrs ``subspaces`` (row names), ``fixed``, ``full``, ``notes``, ``diverged``.
    """
    from ..trajectory import train

    prob = problem_of(recipe)
    P = selected_P(prob)
    if not isinstance(subspaces, dict) or not subspaces:
        raise ValueError("`subspaces` must be a non-empty dict {name: basis, Whole(B) or "
                         "Complement(Q)}")
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"`ks` must hold positive integers, got {ks}")
    swept = {n: check_basis(B, P, f"subspaces[{n!r}]") for n, B in subspaces.items()
             if not isinstance(B, (Complement, Whole))}
    fixed_in = {n: B for n, B in subspaces.items() if isinstance(B, (Complement, Whole))}
    res = {m: np.full((len(swept), len(ks)), np.nan) for m in METRICS}
    diverged = []
    for i, (n, B) in enumerate(swept.items()):
        for j, k in enumerate(ks):
            if k > B.shape[1]:
                continue
            try:
                r = restricted_training(prob, B[:, :k], theta0=theta0)
            except TrainingDivergedError:
                diverged.append([n, k])
                continue
            for m in METRICS:
                res[m][i, j] = r[m]
    fixed = {}
    for n, C in fixed_in.items():
        try:
            r = restricted_training(prob, C, theta0=theta0)
            fixed[n] = {"k": r["k"], **{m: r[m] for m in METRICS}}
        except TrainingDivergedError:
            diverged.append([n, None])
    full = train(prob, theta0)
    arrays = {m: (a, ("subspace", "k")) for m, a in res.items()}
    arrays["k"] = (np.asarray(ks, np.int64), ("k",))
    attrs = {"subspaces": list(swept), "fixed": _finite(fixed), "P": P,
             "full": _finite({m: getattr(full, m) for m in METRICS}),
             "notes": notes or {}, "diverged": diverged}
    return AnalysisResult(name, arrays, attrs)


def _finite(d):
    """NaN accuracies (regression) become None in JSON attributes."""
    if isinstance(d, dict):
        return {k: _finite(v) for k, v in d.items()}
    if isinstance(d, float) and not math.isfinite(d):
        return None
    return d


def as_basis(x, P: int, what: str) -> np.ndarray:
    """Public helper: validate a (P, k) orthonormal basis (one-line ValueError otherwise)."""
    return check_basis(as_numpy(x, what), P, what)
