r"""What moving along a singular direction does: to training (1) and to the trained net's outputs (3).

* :func:`perturbation_response` — retrain from theta_0 + eps v for eps on a grid and split the
  change of theta_T into its component along u (the linear prediction is eps sigma, from
  J v = sigma u) and the norm of the rest; the paper finds linear response far past small eps
  for bulk directions.
* :func:`ood_kl` — perturb theta_T by unit directions and measure max over inputs of
  KL(p_orig || p_pert) on training, test, N(0, 1) noise and inverted (1 - x) inputs, per region:
  bulk directions barely change the function on the data but do change it off the data.

Both go through the recipe's own model, loss and optimizer (:class:`tjac.problem.Problem`), so they
hold for every model family; under ``param_filter`` directions live in the selected coordinates.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..problem import Problem
from ..recipe import Recipe
from ..trajectory import TrainingDivergedError, train
from .experiments import (REGION_NAMES, AnalysisResult, as_numpy, check_basis, check_eps,
                          check_eps_grid, regions_of)

EPS_GRID = tuple(10.0 ** e for e in range(-3, 4))  # the paper's 1e-3 ... 1e3


def problem_of(recipe) -> Problem:
    if isinstance(recipe, Problem):
        return recipe
    if not isinstance(recipe, Recipe):
        raise TypeError(f"`recipe` must be a tjac.Recipe or Problem, got {type(recipe).__name__}")
    return Problem(recipe)


def selected_P(prob: Problem) -> int:
    return prob.num_params if prob.selection is None else int(prob.selection.numel())


def restrict(prob: Problem, theta: torch.Tensor) -> torch.Tensor:
    return theta if prob.selection is None else theta[..., prob.selection]


def shifted(prob: Problem, theta: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """theta + d with d in J's coordinates (the selected parameters under ``param_filter``)."""
    out = theta.clone()
    if prob.selection is None:
        out += d
    else:
        out[prob.selection] += d
    return out


def _tensor(prob, x: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(x, dtype=prob.dtype, device=prob.device)


def perturbation_response(recipe, v, u, sigma: float, eps_grid=EPS_GRID, *, theta0=None,
                          linear_rtol: float = 0.1, name: str = "perturbation") -> AnalysisResult:
    r"""Retrain from theta_0 + eps v for each eps; compare with the linear response eps sigma u.

    Parameters
    ----------
    recipe : Recipe or Problem
    v, u : (P,) unit vectors, a right and left singular vector (J v = sigma u).
    sigma : float, their singular value.
    eps_grid : positive values (default 1e-3 ... 1e3, one per decade).
    theta0 : the full initial parameters (default: the recipe's seeded init).

    Returns arrays over ``eps``: ``along`` u . (theta_T(eps) - theta_T), ``complement`` the norm
    of the rest of that change, ``linear`` = eps sigma, ``test_loss``, ``train_loss``,
    ``test_acc`` (NaN where training diverged) and ``diverged``; attrs ``linear_up_to``: the
    largest eps up to which every grid point has |along - eps sigma| <= ``linear_rtol`` eps sigma
    and complement <= ``linear_rtol`` eps sigma (None if not even the smallest), and the
    unperturbed run's losses.
    """
    prob = problem_of(recipe)
    P = selected_P(prob)
    v = torch.from_numpy(check_basis(v, P, "v")[:, 0]).to(prob.device, prob.dtype)
    u = torch.from_numpy(check_basis(u, P, "u")[:, 0]).to(prob.device, prob.dtype)
    sigma = check_eps(sigma, "sigma")
    grid = check_eps_grid(eps_grid)
    theta0 = prob.validate_theta0(theta0)
    base = train(prob, theta0)
    ref = restrict(prob, base.thetaT)
    n = grid.size
    along, comp = np.full(n, np.nan), np.full(n, np.nan)
    losses = {k: np.full(n, np.nan) for k in ("test_loss", "train_loss", "test_acc")}
    diverged = np.zeros(n, np.int8)
    for i, eps in enumerate(grid):
        try:
            r = train(prob, shifted(prob, theta0, float(eps) * v))
        except TrainingDivergedError:
            diverged[i] = 1
            continue
        d = restrict(prob, r.thetaT) - ref
        a = float(u @ d)
        along[i], comp[i] = a, float((d - a * u).norm())
        for k in losses:
            losses[k][i] = getattr(r, k)
        if not all(math.isfinite(getattr(r, k)) for k in ("test_loss", "train_loss")):
            diverged[i] = 1
    linear = grid * sigma
    ok = (np.abs(along - linear) <= linear_rtol * linear) & (comp <= linear_rtol * linear)
    upto = None
    for i in np.argsort(grid):
        if not ok[i]:
            break
        upto = float(grid[i])
    arrays = {"eps": (grid, ("eps",)), "along": (along, ("eps",)),
              "complement": (comp, ("eps",)), "linear": (linear, ("eps",)),
              "diverged": (diverged, ("eps",)), **{k: (a, ("eps",)) for k, a in losses.items()}}
    attrs = {"sigma": sigma, "linear_rtol": linear_rtol, "linear_up_to": upto, "P": P,
             "base_test_loss": base.test_loss, "base_train_loss": base.train_loss,
             "base_test_acc": base.test_acc, "n_diverged": int(diverged.sum())}
    return AnalysisResult(name, arrays, attrs)


# -- 3. in- vs out-of-distribution ------------------------------------------------------------------
def default_inputs(prob: Problem, rng: int = 0) -> dict:
    """train, test, N(0, 1) noise (shaped like the test inputs, seeded by ``rng``) and inverted
    test inputs 1 - x (the paper's out-of-distribution sets)."""
    x = prob.data.x_test
    gen = torch.Generator().manual_seed(int(rng))
    noise = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x)
    return {"train": prob.data.x_train, "test": x, "noise": noise, "inverted": 1 - x}


def _log_probs(prob: Problem, theta, x, chunk: int = 2048) -> torch.Tensor:
    out = []
    for i in range(0, x.shape[0], chunk):
        z = prob.model.eval_outputs(theta, x[i:i + chunk])
        if z.ndim != 2:
            raise ValueError(f"ood_kl needs class scores of shape (batch, classes); the model "
                             f"gives {tuple(z.shape)}")
        out.append(torch.log_softmax(z.double(), -1))
    return torch.cat(out)


def ood_kl(recipe, thetaT, directions, inputs: dict | None = None, *, sigma=None,
           eps: float = 1e-3, scale: float = 1.0, rng: int = 0,
           name: str = "ood") -> AnalysisResult:
    r"""max over inputs of KL(p(. | x, theta_T) || p(. | x, theta_T + scale v_i)) per direction.

    Parameters
    ----------
    recipe : Recipe or Problem (a classifier: ``cross_entropy``).
    thetaT : the trained parameters (full, or in J's coordinates under ``param_filter``, then
        retrained to recover the rest), or None to train here.
    directions : (P, k) unit columns (right singular vectors).
    inputs : {name: inputs shaped like the data}; default :func:`default_inputs` (train, test,
        noise, inverted).
    sigma : (k,) singular values of the directions: adds per-region means.
    scale : the step length along each unit direction (the paper: 1).

    Returns arrays ``kl_max`` and ``kl_mean`` (direction, input_set); attrs ``input_sets`` and, with
    ``sigma``, ``region_kl_max`` {region: {input set: mean over the region's directions}}.
    """
    prob = problem_of(recipe)
    if prob.recipe.loss != "cross_entropy":
        raise ValueError(f"ood_kl compares class probabilities: it needs loss 'cross_entropy', "
                         f"not {prob.recipe.loss!r}")
    P = selected_P(prob)
    V = torch.from_numpy(check_basis(directions, P, "directions", orthonormal=False)).to(
        prob.device, prob.dtype)
    scale = check_eps(scale, "scale")
    eps = check_eps(eps)
    theta = _full_thetaT(prob, thetaT)
    sets = default_inputs(prob, rng) if inputs is None else dict(inputs)
    if not sets:
        raise ValueError("`inputs` is empty")
    xs = {}
    for key, x in sets.items():
        x = x if isinstance(x, torch.Tensor) else _tensor(prob, as_numpy(x, f"inputs[{key!r}]"))
        if tuple(x.shape[1:]) != prob.data.input_shape:
            raise ValueError(f"inputs[{key!r}] must have shape (n, {', '.join(map(str, prob.data.input_shape))}),"
                             f" got {tuple(x.shape)}")
        xs[key] = x.to(prob.device, prob.dtype)
    base = {key: _log_probs(prob, theta, x) for key, x in xs.items()}
    k = V.shape[1]
    kl_max, kl_mean = np.zeros((k, len(xs))), np.zeros((k, len(xs)))
    for i in range(k):
        th = shifted(prob, theta, scale * V[:, i])
        for j, (key, x) in enumerate(xs.items()):
            lp = base[key]
            kl = (lp.exp() * (lp - _log_probs(prob, th, x))).sum(-1).clamp_min(0)
            kl_max[i, j], kl_mean[i, j] = float(kl.max()), float(kl.mean())
    keys = list(xs)
    arrays = {"kl_max": (kl_max, ("direction", "input_set")),
              "kl_mean": (kl_mean, ("direction", "input_set"))}
    attrs = {"input_sets": keys, "scale": scale, "rng": rng, "n_directions": k,
             "kl_max_overall": {key: float(kl_max[:, j].mean()) for j, key in enumerate(keys)}}
    if sigma is not None:
        s = as_numpy(sigma, "sigma").reshape(-1)
        if s.size != k:
            raise ValueError(f"`sigma` must have one value per direction ({k}), got {s.size}")
        reg = regions_of(s, eps)
        arrays["sigma"] = (s, ("direction",))
        arrays["region"] = (reg, ("direction",))
        attrs["eps"] = eps
        attrs["region_kl_max"] = {n: {key: float(kl_max[reg == r, j].mean())
                                      for j, key in enumerate(keys)}
                                  for r, n in enumerate(REGION_NAMES) if (reg == r).any()}
    return AnalysisResult(name, arrays, attrs)


def _full_thetaT(prob: Problem, thetaT) -> torch.Tensor:
    if thetaT is None:
        return train(prob).thetaT
    t = torch.as_tensor(as_numpy(thetaT, "thetaT")).to(prob.device, prob.dtype).reshape(-1)
    if t.numel() == prob.num_params:
        return t
    if prob.selection is not None and t.numel() == selected_P(prob):
        full = train(prob).thetaT
        if not torch.allclose(restrict(prob, full), t, rtol=0, atol=1e-12 * (1 + float(t.abs().max()))):
            raise ValueError("`thetaT` (selected parameters) does not match this recipe's training")
        return full
    raise ValueError(f"`thetaT` must have P = {prob.num_params} entries, got {t.numel()}")
