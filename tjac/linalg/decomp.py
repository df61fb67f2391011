"""``svd``: certified top or bottom singular triplets of any operator with matmat/rmatmat."""

from __future__ import annotations

import logging
import numbers

import torch

from .. import _checks
from ._base import ConvergenceError, Counted, SVDResult, Timer, fresh_residuals
from .dense import dense_svd
from .lanczos import gkl
from .randomized import randomized

log = logging.getLogger(__name__)

METHODS = ("auto", "lanczos", "randomized", "dense")
WHICH = ("top", "bottom")
DENSE_LIMIT = 6000  # P up to which method='auto' may form J (P^2 float64 = 288 MB)


def choose_method(P: int, k: int, which: str, dense_limit: int = DENSE_LIMIT) -> str:
    """``auto``: dense for the bottom of small operators (measured cheapest: see BENCHMARKS.md) or
    when k is a large share of P; randomized block Krylov for the top (measured fastest on the
    paper's operator: 0.34x ARPACK's wall time for top-16); long-basis Lanczos for the bottom."""
    if P <= dense_limit and (which == "bottom" or 4 * k >= P):
        return "dense"
    return "randomized" if which == "top" else "lanczos"


def _validate(op, k, which, method, tol, maxiter, block):
    for attr in ("shape", "dtype", "matmat", "rmatmat"):
        if not hasattr(op, attr):
            raise TypeError(f"`op` must have shape, dtype, matmat and rmatmat; missing {attr!r}")
    if len(op.shape) != 2 or op.shape[0] != op.shape[1]:
        raise ValueError(f"`op` must be square, got shape {tuple(op.shape)}")
    _checks.k_in_range(k, op.shape[0])
    _checks.one_of("which", which, WHICH)
    _checks.one_of("method", method, METHODS)
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not tol > 0:
        raise ValueError(f"`tol` must be a positive number, got {tol!r}")
    if maxiter is not None:
        _checks.positive_int("maxiter", maxiter)
    if block is not None:
        _checks.positive_int("block", block)
    if method == "randomized" and which == "bottom":
        raise ValueError("method='randomized' finds the top of the spectrum only; "
                         "use 'lanczos' or 'dense' for which='bottom'")


def svd(op, k: int, *, which: str = "top", method: str = "auto", tol: float = 1e-8,
        maxiter: int | None = None, block: int | None = None, max_basis: int | None = None,
        v0: torch.Tensor | None = None, rng: int = 0, callback=None,
        raise_on_failure: bool = True, checkpoint=None) -> SVDResult:
    r"""k singular triplets of ``op`` at the ``top`` (largest) or ``bottom`` (smallest) end.

    A triplet is converged when both ||J v - s u|| and ||J^T u - s v||, recomputed from fresh
    products, are <= tol * s_max (an absolute criterion relative to ||J||, the right one for the
    near-null cluster at the bottom of real training Jacobians).

    Parameters
    ----------
    op : operator with ``shape``, ``dtype``, ``matmat``, ``rmatmat`` (e.g. TrainingJacobian)
    k : int, 0 < k <= P
    which : 'top' | 'bottom'
    method : 'auto' | 'lanczos' | 'randomized' | 'dense'
    tol : float > 0
    maxiter : block steps (Lanczos) or passes (randomized, default 30); Lanczos' default allows
        a full basis.
    block : block width (vectors sharing one replay); default 16 (Lanczos), k + 8 (randomized).
    max_basis : Lanczos basis size that triggers a thick restart (default: P for ``bottom``,
        max(8k + 8 block, 256) for ``top``; measured: smaller bases restart often and cost
        more products on J-shaped spectra).
    v0 : (P, block) start block; default: N(0, 1) from ``rng``.
    rng : seed of the start block (explicit, so solves are reproducible).
    callback : called with a dict after every step.
    checkpoint : Lanczos only: an object with ``load() -> dict | None`` and ``save(state)``. The
        solve starts from ``load()`` when it returns a state and hands ``save`` the whole
        recurrence (plus ``gen_state``, the generator's state) after every step, so a killed solve
        continues exactly (see :class:`tjac.checkpoint.LanczosCheckpoint` for the store's).

    Raises
    ------
    ConvergenceError
        When some triplet does not certify; ``err.result`` carries the partial result.
    """
    _validate(op, k, which, method, tol, maxiter, block)
    timer = Timer()
    P = op.shape[0]
    if method == "auto":
        method = choose_method(P, k, which)
    if checkpoint is not None and method != "lanczos":
        raise ValueError(f"`checkpoint` applies to method='lanczos' only, not {method!r}")
    cop = Counted(op)
    gen = torch.Generator().manual_seed(int(rng))
    resume_state = checkpoint.load() if checkpoint is not None else None
    if resume_state is not None and "gen_state" in resume_state:
        gen.set_state(resume_state["gen_state"])
    if method == "dense":
        J, U, S, V = dense_svd(cop)
        idx = torch.arange(k) if which == "top" else torch.arange(P - 1, P - 1 - k, -1)
        S, U, V = S[idx], U[:, idx], V[:, idx]
        res = torch.stack([(J @ V - U * S).norm(dim=0), (J.T @ U - V * S).norm(dim=0)], 1)
        smax, history, conv_est = float(torch.linalg.matrix_norm(J, 2)), (), None
    elif method == "randomized":
        S, U, V, res, conv_est, history, smax = randomized(
            cop, k, tol=tol, maxiter=maxiter or 30, block=block or (k + 8), v0=v0, gen=gen,
            callback=callback)
    else:
        b = block or min(16, P)
        if max_basis is None:
            max_basis = P if which == "bottom" else min(P, max(8 * k + 8 * b, 256))
        steps = maxiter or (-(-P // b) + 2 if which == "bottom" else 10 * (-(-P // b)) + 10)
        S, U, V, est, conv_est, history, smax = gkl(
            cop, k, which, tol=tol, maxiter=steps, block=b, max_basis=max(max_basis, k + 2 * b),
            v0=v0, gen=gen, callback=callback, state=resume_state,
            on_step=None if checkpoint is None else (
                lambda st: checkpoint.save({**st, "gen_state": gen.get_state()})))
        res = fresh_residuals(cop, S, U, V)
    converged = res.max(dim=1).values <= tol * smax
    result = SVDResult(S=S, U=U, V=V, residuals=res, converged=converged,
                       num_matvecs=cop.num_matvecs, num_rmatvecs=cop.num_rmatvecs,
                       wall_time=timer(), method=method, which=which, tol=tol,
                       norm_estimate=smax, history=history)
    log.info("svd(%s, k=%d, %s): %d/%d certified, %d+%d products, %.2fs", which, k, method,
             int(converged.sum()), k, result.num_matvecs, result.num_rmatvecs, result.wall_time)
    if raise_on_failure and not result.all_converged:
        raise ConvergenceError(
            f"{int((~converged).sum())} of {k} {which} triplets did not certify to tol={tol:g} "
            f"(worst residual {float(res.max() / smax):.2e} * s_max) after "
            f"{result.num_matvecs} + {result.num_rmatvecs} products; `.result` has the partial "
            f"result", result)
    return result
