r"""Where the bulk comes from (8) and how it sits against the output Jacobian's near-null space (6).

**Prediction** (:func:`predict_bulk`). A first-layer weight row w acts on inputs only through
w . x, so its gradient along an input direction e is (dL/dz) (x . e): over a training run it is
driven by the second moment lambda_e = E[(x . e)^2] of the training inputs along e. Directions
with lambda_e = 0 give singular value exactly 1 (the structural zero-input directions,
:mod:`tjac.analysis.structural`); directions with a small second moment barely move, and J acts on
them as I - (sum_t eta_t_eff) lambda_e (...), so |sigma - 1| <~ eps when

    lambda_e <= threshold = eps / sum_t eta_t_eff,   eta_t_eff = eta_t / (1 - momentum)  (SGD),

an order-of-magnitude argument (the back-propagated factor dL/dz is O(1) on average). The
prediction is

    n_bulk ~ width_1 x #{e : lambda_e <= threshold}  +  the softmax-shift directions (SGD)

with the zero-input directions among the first term. Derived where the first parameter is a
weight matrix acting on the flattened input (MLPs, user modules that start with ``nn.Linear``)
and without weight decay; elsewhere only the structural count is predicted, and the attributes say
why. Under Adam the gradient is normalised per coordinate, so small second moments do not
mean small steps: the prediction is expected to fail there, which is worth measuring.

**Output-Jacobian near-null space** (:func:`output_jacobian_null`). G = d f(x_i; theta_T) / d theta
over the training inputs (f: log-probabilities under cross-entropy, else the outputs); its near-null space (the eigenvectors of G^T G with the smallest
eigenvalues) holds the directions that do not change the function on the data. Principal-angle
cosines between the first k bulk directions and the k-dimensional near-null space, against k, with
two baselines: G computed on white-noise inputs, and random k-planes.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .experiments import AnalysisResult, check_basis, check_eps, principal_cosines, random_basis
from .response import _full_thetaT, problem_of, selected_P
from .structural import structural_ones


def training_inputs(prob) -> torch.Tensor:
    """The training inputs that batches actually visit (a trailing partial batch is dropped)."""
    r = prob.recipe
    x = prob.data.x_train
    if r.data.shuffle == "none":
        x = x[: prob.order.per_epoch * r.batch_size]
    return x.reshape(x.shape[0], -1)


def effective_step_sum(prob) -> float:
    """sum_t eta_t / (1 - momentum) (SGD); sum_t eta_t for Adam (per-coordinate normalised)."""
    o = prob.optimizer
    lr = getattr(o, "inner", o)
    if not hasattr(lr, "lr") or prob.recipe.optim.name == "custom":
        return float("nan")
    s = sum(float(lr.lr(t)) for t in range(prob.num_steps))
    if prob.recipe.optim.name == "sgd" and prob.recipe.optim.momentum:
        s /= 1 - prob.recipe.optim.momentum
    return s


def predict_bulk(recipe, eps: float = 1e-3, *, threshold: float | None = None, measured=None,
                 name: str = "bulk") -> AnalysisResult:
    r"""Predict the bulk size at ``eps`` from the data and the architecture (module doc).

    ``threshold`` on the input second moment (default eps / sum_t eta_t_eff); ``measured``: the
    measured bulk count at ``eps`` (an int, or a ``Run.regions`` dict: its ``bulk`` or, for a partial
    spectrum, its bounds) to compare with.

    Returns arrays ``second_moment`` (eigenvalues of E[x x^T], ascending) and ``low`` (1 where
    <= threshold); attrs ``predicted`` and its breakdown ``zero_input``, ``low_variance_extra``,
    ``softmax_shift``, ``n_low_directions``, ``first_layer_width``, ``first_layer`` (derived or
    the reason not), and ``measured``/``error`` when given.
    """
    prob = problem_of(recipe)
    eps = check_eps(eps)
    s = structural_ones(prob)
    x = training_inputs(prob).double()
    M = (x.T @ x / x.shape[0]).cpu().numpy()
    lam = np.clip(np.linalg.eigvalsh(M), 0.0, None)
    eta = effective_step_sum(prob)
    if threshold is None:
        threshold = eps / eta if math.isfinite(eta) and eta > 0 else 0.0
    elif not (isinstance(threshold, (int, float)) and threshold >= 0 and math.isfinite(threshold)):
        raise ValueError(f"`threshold` must be a non-negative number, got {threshold!r}")
    low = lam <= threshold
    n_low = int(low.sum())
    why = _first_layer(prob)
    shift = s.n_softmax_shift if s.shift_is_singular else 0
    if why is None:
        width = int(prob.layout[0].shape[0])
        n_low = max(n_low, len(s.zero_features))  # a zero feature has lambda = 0 exactly
        extra = (n_low - len(s.zero_features)) * width
        predicted = n_low * width + shift
    else:
        width, extra = None, 0
        predicted = s.n_zero_input + shift
    attrs = {"eps": eps, "threshold": float(threshold), "effective_step_sum": eta,
             "predicted": int(predicted), "zero_input": s.n_zero_input,
             "low_variance_extra": int(extra), "softmax_shift": int(shift),
             "n_low_directions": n_low, "n_zero_features": len(s.zero_features),
             "first_layer_width": width, "first_layer": why or "derived",
             "optimizer": prob.recipe.optim.name, "P": selected_P(prob)}
    if measured is not None:
        attrs.update(_measured(measured, predicted))
    arrays = {"second_moment": (lam, ("input_direction",)),
              "low": (low.astype(np.int8), ("input_direction",))}
    return AnalysisResult(name, arrays, attrs)


def _first_layer(prob) -> str | None:
    """None when the first parameter is a weight matrix on the flattened input; else why not."""
    first = prob.layout[0]
    r = prob.recipe
    if r.optim.weight_decay:
        return "not derived: weight decay pulls low-variance weights away from sigma = 1"
    if r.optim.name == "custom":
        return "not derived: a user optimizer"
    if len(first.shape) != 2 or first.shape[1] != prob.data.n_features or \
            not first.name.endswith("weight"):
        return (f"not derived: the first parameter {first.name!r} {first.shape} is not a weight "
                f"matrix on the {prob.data.n_features} flattened input features")
    if prob.selection is not None and not bool((prob.selection < first.size).any()):
        return "not derived: param_filter excludes the first layer"
    return None


def _measured(measured, predicted: int) -> dict:
    if isinstance(measured, dict):
        m = measured.get("bulk")
        lo, hi = measured.get("bulk_min", m), measured.get("bulk_max", m)
    else:
        if isinstance(measured, bool) or not isinstance(measured, (int, np.integer)) or measured < 0:
            raise ValueError(f"`measured` must be a count or a regions dict, got {measured!r}")
        m = lo = hi = int(measured)
    out = {"measured": m, "measured_min": lo, "measured_max": hi}
    if m is not None:
        out["error"] = int(predicted) - int(m)
        out["relative_error"] = (int(predicted) - int(m)) / max(int(m), 1)
    return out


# -- 6. bulk vs the output Jacobian's near-null space -------------------------------------------------
MAX_DENSE_P = 8000


def output_gram(prob, theta: torch.Tensor, x: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """G^T G (P x P, J's coordinates) with G = d f(x_i; theta) / d theta stacked over inputs x;
    f is the log-probabilities (log_softmax) under cross-entropy, where a shift of all logits
    changes nothing, and the raw outputs otherwise."""
    from torch.func import jacrev

    P = prob.num_params
    log_probs = prob.recipe.loss == "cross_entropy"

    def f(th, xi):
        z = prob.model.forward(th, xi)
        return (torch.log_softmax(z, -1) if log_probs else z).reshape(-1)

    gram = torch.zeros(P, P, dtype=torch.float64, device=theta.device)
    for i in range(0, x.shape[0], chunk):
        xi = x[i:i + chunk]
        Jc = jacrev(lambda th: f(th, xi))(theta).double()
        gram += Jc.T @ Jc
    if prob.selection is not None:
        gram = gram[prob.selection][:, prob.selection]
    return gram


def output_jacobian_null(recipe, thetaT, bulk, ks=None, *, rng: int = 0, n_random: int = 10,
                         max_P: int = MAX_DENSE_P, name: str = "jacobian-null") -> AnalysisResult:
    r"""Bulk directions against the near-null space of the parameter-to-output Jacobian.

    ``bulk`` (P, K) orthonormal, ordered nearest sigma = 1 first; ``ks`` the near-null dimensions
    compared (default 1, 2, 4, ... up to P, with K and the exact null dimension). For each k: the
    cosines of the principal angles between span(bulk[:, :min(k, K)]) and N_k, the k eigenvectors
    of G^T G with the smallest eigenvalues, summarised as ``mean_cos2`` (= ||A^T N_k||_F^2 /
    min(k, K): for k >= K the fraction of the bulk inside N_k), and the same against the
    white-noise G's near-null space (``noise_mean_cos2``: N(0, 1) inputs, as many as training
    inputs, seeded by ``rng``) and against random min(k, K)-planes (``random_mean_cos2``,
    ``n_random`` draws; expected k / P for k >= K). Forms G^T G densely (P x P): refused above
    ``max_P``. The exact null space (attrs ``null_dim``: e.g. zero-input weights and the softmax
    shift) is one degenerate cluster: a k inside it picks an arbitrary k-plane of it, so read the
    curve at k = ``null_dim`` and beyond.
    """
    prob = problem_of(recipe)
    P = selected_P(prob)
    if P > max_P:
        raise ValueError(f"output_jacobian_null forms G^T G densely (P x P); P = {P} > max_P = "
                         f"{max_P}: pass a larger max_P if memory allows")
    A = check_basis(bulk, P, "bulk")
    K = A.shape[1]
    theta = _full_thetaT(prob, thetaT)
    x = prob.data.x_train
    gen = torch.Generator().manual_seed(int(rng))
    noise = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x)
    ev, N = torch.linalg.eigh(output_gram(prob, theta, x))
    ev_n, Nn = torch.linalg.eigh(output_gram(prob, theta, noise))
    N, Nn = N.cpu().numpy(), Nn.cpu().numpy()
    rank_tol = float(ev.abs().max()) * P * float(np.finfo(np.float64).eps)
    null_dim = int((ev.abs() <= rank_tol).sum())
    ks = _ks(ks, P, (K, null_dim))
    out = {n: np.zeros(len(ks)) for n in ("mean_cos2", "noise_mean_cos2", "random_mean_cos2",
                                           "mean_cos", "min_cos")}
    for j, k in enumerate(ks):
        m = min(k, K)
        c = principal_cosines(A[:, :m], N[:, :k])
        out["mean_cos2"][j], out["mean_cos"][j], out["min_cos"][j] = (c ** 2).mean(), c.mean(), c.min()
        out["noise_mean_cos2"][j] = (principal_cosines(A[:, :m], Nn[:, :k]) ** 2).mean()
        out["random_mean_cos2"][j] = np.mean([(principal_cosines(random_basis(P, m, (rng, i)),
                                                                 N[:, :k]) ** 2).mean()
                                              for i in range(n_random)])
    arrays = {n: (a, ("k",)) for n, a in out.items()}
    arrays["k"] = (np.asarray(ks, np.int64), ("k",))
    arrays["gram_eigenvalues"] = (ev.cpu().numpy(), ("param",))
    attrs = {"P": P, "K": K, "n_inputs": int(x.shape[0]), "rng": rng, "n_random": n_random,
             "outputs": "log_softmax" if prob.recipe.loss == "cross_entropy" else "raw",
             "null_dim": null_dim, "rank_tol": rank_tol,
             "noise_gram_min": float(ev_n.min())}
    return AnalysisResult(name, arrays, attrs)


def _ks(ks, P: int, extra=()) -> list[int]:
    if ks is None:
        ks = [2 ** i for i in range(int(math.log2(P)) + 1)] + [P, *(e for e in extra if e > 0)]
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1 or ks[-1] > P:
        raise ValueError(f"`ks` must lie in 1..{P} (P), got {ks}")
    return ks
