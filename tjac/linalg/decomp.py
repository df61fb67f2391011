"""``svd``: certified top or bottom singular triplets of any operator with matmat/rmatmat."""

from __future__ import annotations

import logging
import numbers
import os

import torch

from .. import _checks
from ._base import BudgetError, ConvergenceError, Counted, SVDResult, Timer, fresh_residuals
from .dense import dense_bottom_torch, dense_svd, materialize_host
from .lanczos import gkl
from .plan import HEADROOM, RANDOMIZED_MAX_PASSES, plan_solve
from .randomized import randomized
from .spill import gkl_spilled

log = logging.getLogger(__name__)

METHODS = ("auto", "lanczos", "randomized", "dense")
WHICH = ("top", "bottom")


def choose_method(P: int, k: int, which: str, *, available_bytes: int | None = None,
                  itemsize: int = 8) -> str:
    """``auto``'s pick (:func:`tjac.linalg.plan.plan_solve`): randomized block Krylov for the top
    (measured fastest on the paper's operator: 0.34x ARPACK's wall time for top-16), dense when k
    is a large share of P, and for the bottom the cheapest certified path that fits in
    ``available_bytes`` (None: unknown, no limit): dense, else long-basis Lanczos."""
    return plan_solve(P, k, which, available_bytes=available_bytes, itemsize=itemsize).method


def default_tol(dtype) -> float:
    """The default certificate tolerance (relative to s_max) for an operator of ``dtype``:
    1e-8 in float64; 100 eps above it (float32: 1.2e-5), like scipy's svds, which scales its
    default by the machine epsilon."""
    return max(1e-8, 100 * torch.finfo(dtype).eps)


class ToleranceError(ValueError):
    """The requested tolerance lies below the round-off floor of the operator's products."""


def roundoff_floor(op, gen=None) -> dict:
    r"""Estimate the smallest residual (relative to ||J||) that products of ``op`` can certify.

    Two replays: J [a, b, a + b] and J^T [J a, w] for unit Gaussian a, b, w. The linearity defect
    ||J(a + b) - J a - J b|| and the adjoint defect |<J a, w> - <a, J^T w>| measure the round-off
    of one product; ||J^T J a|| / ||J a|| is a lower bound on ||J||. Random unit vectors see an
    error matrix E (J^T's products not the exact adjoint of J's) only as ~||E|| / sqrt(P), so the
    adjoint defect is scaled by sqrt(P). A certified triplet's fresh residual cannot go below the
    product round-off, nor below ~30 eps * ||J|| (the solver's own arithmetic in the operator's
    dtype: measured 1.5e-6 ||J|| on the paper's float32 operator)."""
    P = op.shape[0]
    g = gen if gen is not None else torch.Generator().manual_seed(12345)
    R = torch.randn(P, 3, generator=g, dtype=torch.float64)
    R = (R / R.norm(dim=0)).to(op.device, op.dtype)
    a, b, w = R[:, :1], R[:, 1:2], R[:, 2:]
    Y = op.matmat(torch.cat([a, b, a + b], 1))
    Z = op.rmatmat(torch.cat([Y[:, :1], w], 1))
    lin = float((Y[:, 2] - Y[:, 0] - Y[:, 1]).norm())
    adj = float(abs((Y[:, 0] * w[:, 0]).sum() - (a[:, 0] * Z[:, 1]).sum()))
    s_est = max(float(Z[:, 0].norm()) / max(float(Y[:, 0].norm()), 1e-300),
                float(Y[:, 0].norm()), float(Z[:, 1].norm()), 1e-300)
    eps = torch.finfo(op.dtype).eps
    floor = max(30 * eps, 2 * max(lin, adj * P ** 0.5) / s_est)
    return {"floor": floor, "linearity_defect": lin, "adjoint_defect": adj,
            "sigma_lower_bound": s_est, "eps": eps}


# arguments that only some methods use: passing one to a method that ignores it is an error
_APPLIES = {"maxiter": ("lanczos", "randomized"), "block": ("lanczos", "randomized"),
            "v0": ("lanczos", "randomized"), "max_basis": ("lanczos",),
            "checkpoint": ("lanczos",), "callback": ("lanczos", "randomized"),
            "spill_dir": ("lanczos",)}


def _disk_free(directory) -> int | None:
    """Free bytes where a spilled basis would go (None when that cannot be told)."""
    import shutil
    import tempfile

    try:
        return int(shutil.disk_usage(directory or tempfile.gettempdir()).free)
    except OSError:
        return None


def _validate(op, k, which, method, tol, maxiter, block):
    for attr in ("shape", "dtype", "matmat", "rmatmat"):
        if not hasattr(op, attr):
            raise TypeError(f"`op` must have shape, dtype, matmat and rmatmat; missing {attr!r}")
    if len(op.shape) != 2 or op.shape[0] != op.shape[1]:
        raise ValueError(f"`op` must be square, got shape {tuple(op.shape)}")
    _checks.k_in_range(k, op.shape[0])
    _checks.one_of("which", which, WHICH)
    _checks.one_of("method", method, METHODS)
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, numbers.Real)
                            or not tol > 0):
        raise ValueError(f"`tol` must be a positive number, got {tol!r}")
    if maxiter is not None:
        _checks.positive_int("maxiter", maxiter)
    if block is not None:
        _checks.positive_int("block", block)
    if method == "randomized" and which == "bottom":
        raise ValueError("method='randomized' finds the top of the spectrum only; "
                         "use 'lanczos' or 'dense' for which='bottom'")


def _inapplicable(method, chosen_by_auto, P, which, given):
    for name, value in given.items():
        if value is not None and method not in _APPLIES[name]:
            how = f" (chosen by method='auto' for the {which} of P = {P})" if chosen_by_auto else ""
            uses = " or ".join(repr(m) for m in _APPLIES[name])
            raise ValueError(f"`{name}` does not apply to method={method!r}{how}; it is used by "
                             f"method={uses}")


def svd(op, k: int, *, which: str = "top", method: str = "auto", tol: float | None = None,
        maxiter: int | None = None, block: int | None = None, max_basis: int | None = None,
        v0: torch.Tensor | None = None, rng: int = 0, callback=None,
        raise_on_failure: bool = True, checkpoint=None, max_memory: int | None = None,
        spill_dir: str | None = None) -> SVDResult:
    r"""k singular triplets of ``op`` at the ``top`` (largest) or ``bottom`` (smallest) end.

    A triplet is converged when both ||J v - s u|| and ||J^T u - s v||, recomputed from fresh
    products, are <= tol * s_max (an absolute criterion relative to ||J||, the right one for the
    near-null cluster at the bottom of real training Jacobians). The result has exactly k
    triplets, all certified, or :class:`ConvergenceError` is raised.

    The dense path forms J (P products in wide blocks) and takes its full SVD, or, when that does
    not fit but J does, factorizes J in place and finds the bottom only
    (:func:`tjac.linalg.dense.dense_bottom`; the plan says ``bottom_only``), certified by fresh
    products.

    Parameters
    ----------
    op : operator with ``shape``, ``dtype``, ``matmat``, ``rmatmat`` (e.g. TrainingJacobian)
    k : int, 0 < k <= P
    which : 'top' | 'bottom'
    method : 'auto' | 'lanczos' | 'randomized' | 'dense'. ``auto`` for the top: randomized block
        Krylov, unless the operator reports measured replay costs per width
        (``op.vector_costs()``, a :class:`TrainingJacobian` after :meth:`autotune`) that make
        narrow-block Lanczos at least 1.5x cheaper (blocks not cheaper per vector than single
        products: Lanczos needs about half the products); then ``block`` defaults to its pick.
        Not when ``maxiter``, ``v0``, ``max_basis``, ``checkpoint`` or ``spill_dir`` is given
        (their meaning depends on the method).
    tol : float > 0; default :func:`default_tol` of the operator's dtype (1e-8 in float64,
        1.2e-5 in float32). A tol below the operator's round-off floor raises
        :class:`ToleranceError`, naming the floor (:func:`roundoff_floor`, two replays): at once
        when tol < 3e4 eps, else as soon as fresh residuals contradict a converged recurrence.
    maxiter : block steps (Lanczos) or passes (randomized, default 30, times ceil(k / block) for a
        block narrower than k); Lanczos' default allows a full basis.
    block : block width (vectors sharing one replay); default 16 (Lanczos), k + 8 (randomized).
    max_basis : Lanczos basis size that triggers a thick restart (default: P for ``bottom``,
        max(8k + 8 block, 256) for ``top``; measured: smaller bases restart often and cost
        more products on J-shaped spectra).
    v0 : (P, block) start block; default: N(0, 1) from ``rng``.
    rng : seed of the start block (explicit, so solves are reproducible).
    callback : called with a dict after every step (Krylov methods): the solver's ``step``,
        ``basis``, ``n_converged`` (``checked`` for Lanczos steps with a Ritz extraction), plus
        ``products`` (so far), ``expected_products`` (the plan's) and ``elapsed`` seconds
        (:class:`tjac.linalg.progress.Progress` turns them into progress lines or a bar).
    checkpoint : Lanczos only: an object with ``load() -> dict | None`` and ``save(state)``. The
        solve starts from ``load()`` when it returns a state and hands ``save`` the whole
        recurrence (plus ``gen_state``, the generator's state, and ``restarted`` when a thick
        restart replaced the basis) after every step, so a killed solve continues exactly (see
        :class:`tjac.checkpoint.LanczosCheckpoint` for the store's, which writes only what is new).
    raise_on_failure : False returns a partial result (``all_converged`` False; fewer than k
        rows when the solve stopped short) instead of raising.
    max_memory : bytes the solver may use (default: what the device has available); the plan
        (:func:`tjac.linalg.plan_solve`) is made against it, and a solve that cannot fit raises
        MemoryError with the estimate before any product.
    spill_dir : where the bottom's Lanczos basis spills when it does not fit in memory (default:
        the system's temporary directory; ``tjac run``: next to the store). The spilled solve
        (:mod:`tjac.linalg.spill`) does not checkpoint: ``checkpoint`` is refused on it.

    ``maxiter``, ``block``, ``v0`` and ``callback`` apply to the Krylov methods,
    ``max_basis``, ``checkpoint`` and ``spill_dir`` to Lanczos only; passing one to a method that
    does not use it raises ValueError (also when ``auto`` chose that method).

    Raises
    ------
    ConvergenceError
        When fewer than k triplets certify; ``err.result`` carries the partial result.
        :class:`BudgetError` (also a MemoryError) when randomized's next pass would have outgrown
        ``max_memory`` (the message names the bytes needed and available).
    ToleranceError
        When ``tol`` is below what the operator's products can deliver.
    """
    _validate(op, k, which, method, tol, maxiter, block)
    timer = Timer()
    P = op.shape[0]
    chosen_by_auto = method == "auto"
    itemsize = torch.empty((), dtype=op.dtype).element_size()
    if max_memory is not None:
        _checks.positive_int("max_memory", max_memory)
    if spill_dir is not None and not os.path.isdir(spill_dir):
        raise ValueError(f"`spill_dir` must be an existing directory, got {spill_dir!r}")
    have = max_memory if max_memory is not None else _checks.available_bytes(op.device)
    host = None if torch.device(op.device).type == "cpu" else _checks.available_bytes("cpu")
    costs = getattr(op, "vector_costs", None)  # measured seconds per vector at each replay width
    specific = (maxiter, v0, max_basis, checkpoint, spill_dir)  # their meaning depends on the method
    costs = (costs() if callable(costs) and method == "auto" and which == "top"
             and all(x is None for x in specific) else None)
    plan = plan_solve(P, k, which, method=method, itemsize=itemsize, block=block,
                      available_bytes=have, disk_bytes=_disk_free(spill_dir), host_bytes=host,
                      vector_costs=costs, replay_block=getattr(op, "block_size", None),
                      world_size=getattr(op, "world_size", 1))
    method = plan.method
    if block is None and plan.estimate.block is not None:
        block = plan.estimate.block  # auto chose the width from the measured costs
    if not plan.fits:
        raise MemoryError(f"svd: {plan.describe()}: {plan.refusal()}")
    log.info("svd plan: %s", plan.describe())
    _inapplicable(method, chosen_by_auto, P, which,
                  dict(maxiter=maxiter, block=block, v0=v0, max_basis=max_basis,
                       checkpoint=checkpoint, callback=callback, spill_dir=spill_dir))
    if plan.spill and (checkpoint is not None or max_basis is not None):
        what = "checkpoint" if checkpoint is not None else "max_basis"
        raise ValueError(f"`{what}` does not apply when the Lanczos basis spills to disk ("
                         f"{plan.describe()}): the spilled solve neither restarts nor "
                         f"checkpoints (a killed one starts again from its seed)")
    if callback is not None:
        user_callback = callback

        def callback(info):  # noqa: F811 (the solver's dict plus the counters progress needs)
            user_callback({**info, "products": cop.num_matvecs + cop.num_rmatvecs,
                           "expected_products": plan.estimate.products,
                           "max_products": plan.estimate.max_products, "elapsed": timer()})
    if tol is None:
        tol = default_tol(op.dtype)
    cop = Counted(op)
    gen = torch.Generator().manual_seed(int(rng))
    probed = {}

    def check_floor():
        """Probe the round-off floor once; raise at once when tol lies below it."""
        if not probed:
            probed.update(roundoff_floor(cop, torch.Generator().manual_seed(int(rng) + 1)))
            if tol < probed["floor"]:
                raise ToleranceError(
                    f"tol={tol:g} is below what this {str(op.dtype).replace('torch.', '')} "
                    f"operator can certify: its products' round-off floor is "
                    f"~{probed['floor']:.1e} * s_max (linearity defect "
                    f"{probed['linearity_defect']:.1e}, adjoint defect "
                    f"{probed['adjoint_defect']:.1e}); use tol >= {probed['floor']:.0e} or a "
                    f"float64 recipe")

    def verify(S, U, V, smax):  # fresh residuals; when they contradict the recurrence, the floor
        fresh = fresh_residuals(cop, S, U, V)
        if not bool((fresh.max(dim=1).values <= tol * smax).all()):
            check_floor()
        return fresh

    if method != "dense" and tol < 3e4 * torch.finfo(op.dtype).eps:
        check_floor()
    resume_state = checkpoint.load() if checkpoint is not None else None
    if resume_state is not None and "gen_state" in resume_state:
        gen.set_state(resume_state["gen_state"])
    if method == "dense" and plan.bottom_only:  # J's QR in place: the bottom in ~P^2 memory
        S, U, V, smax, info = dense_bottom_torch(materialize_host(cop), k, tol=tol, gen=gen,
                                                 device=op.device, dtype=op.dtype)
        history = (info,)
        res = verify(S, U, V, smax)  # (a tol below the round-off floor: ToleranceError)
    elif method == "dense":
        J, U, S, V = dense_svd(cop)
        smax, history = float(S[0]), ()  # (a second SVD for ||J||_2 cost as much as the first)
        idx = torch.arange(k) if which == "top" else torch.arange(P - 1, P - 1 - k, -1)
        S, U, V = S[idx], U[:, idx], V[:, idx]
        res = torch.stack([(J @ V - U * S).norm(dim=0), (J.T @ U - V * S).norm(dim=0)], 1)
    else:
        if method == "randomized":
            l = block or (k + 8)
            kr = randomized(cop, k, tol=tol, block=l,
                            maxiter=maxiter or RANDOMIZED_MAX_PASSES * -(-k // min(l, k)),
                            v0=v0, gen=gen, callback=callback,
                            max_bytes=None if have is None else int(HEADROOM * have))
        elif plan.spill:
            b = block or min(16, P)
            kr = gkl_spilled(cop, k, tol=tol, maxiter=maxiter or -(-P // b) + 2, block=b,
                             directory=spill_dir, v0=v0, gen=gen, callback=callback,
                             verify=verify)
        else:
            b = block or min(16, P)
            if max_basis is None:
                max_basis = P if which == "bottom" else min(P, max(8 * k + 8 * b, 256))
            steps = maxiter or (-(-P // b) + 2 if which == "bottom" else 10 * (-(-P // b)) + 10)
            kr = gkl(cop, k, which, tol=tol, maxiter=steps, block=b,
                     max_basis=max(max_basis, k + 2 * b), v0=v0, gen=gen, callback=callback,
                     state=resume_state, verify=verify,
                     on_step=None if checkpoint is None else (
                         lambda st: checkpoint.save({**st, "gen_state": gen.get_state()})))
        S, U, V, smax, history = kr.S, kr.U, kr.V, kr.smax, kr.history
        res = kr.residuals if kr.fresh else fresh_residuals(cop, S, U, V)
    converged = res.max(dim=1).values <= tol * smax
    result = SVDResult(S=S, U=U, V=V, residuals=res, converged=converged,
                       num_matvecs=cop.num_matvecs, num_rmatvecs=cop.num_rmatvecs,
                       wall_time=timer(), method=method, which=which, tol=tol,
                       norm_estimate=smax, history=history, k=k, floor=probed.get("floor"),
                       plan=plan.as_dict())
    n_found = int(S.shape[0])
    log.info("svd(%s, k=%d, %s): %d/%d certified, %d+%d products, %.2fs", which, k, method,
             int(converged.sum()), k, result.num_matvecs, result.num_rmatvecs, result.wall_time)
    if raise_on_failure and not result.all_converged:
        short = f" (only {n_found} found)" if n_found < k else ""
        worst = f"; worst residual {float(res.max() / smax):.2e} * s_max" if n_found else ""
        note = getattr(kr, "budget_note", None) if method == "randomized" else None
        raise (BudgetError if note else ConvergenceError)(
            (f"{note}; " if note else "") +
            f"{k - int(converged.sum())} of {k} {which} triplets did not certify to "
            f"tol={tol:g}{short}{worst}, after {result.num_matvecs} + {result.num_rmatvecs} "
            f"products; `.result` has the partial result", result)
    return result
