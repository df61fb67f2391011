r"""The training Jacobian J = d theta_T / d theta_0 as a matrix-free operator.

JVP (``matmat``): tangents ride along one replay of training. Per step, with H_t the minibatch
Hessian at theta_t,  dg = H_t dtheta_t  and  ds_{t+1} = dU/ds ds_t + dU/dg dg. Memory O(state x k),
independent of T.

VJP (``rmatmat``): a reverse sweep over the stored trajectory,
(bs_t, bg) = ((dU/ds)^T bs_{t+1}, (dU/dg)^T bs_{t+1});  btheta_t += H_t bg.

Both cost one gradient + one block HVP + elementwise work per step; a block of k vectors shares
the primal computation.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from . import replay
from .problem import Problem, check_fits
from .recipe import Recipe
from .trajectory import NondeterminismError, Trajectory, TrainingDivergedError, _cause

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckReport:
    """What :meth:`TrainingJacobian.check` verified. ``scalar``: c when J v = c v and
    J^T w = c w on every random probe to sqrt(eps) of the dtype (J = c I: every singular value is
    |c| and the spectrum says nothing about training, e.g. a sign-based optimizer's update, whose
    derivative is zero, gives J = I); None otherwise."""

    deterministic: bool
    replay_matches_trajectory: bool
    adjoint_rel_error: float
    jvp_repeat_max_diff: float
    scalar: float | None = None


class TrainingJacobian:
    """J = d theta_T / d theta_0 of a deterministic training run, without forming it.

    Parameters
    ----------
    recipe : Recipe or Problem
        The training run. A :class:`tjac.trajectory.Problem` may be passed to reuse loaded data.
    theta0 : torch.Tensor, optional
        Initial parameters in ``param_layout`` order (default: the recipe's seeded init).
    checkpoint : 'all', 'sqrt' or int
        Which optimizer states the reverse sweep keeps (see :mod:`tjac.trajectory`).
    block_size : int
        Largest number of vectors propagated together; wider blocks are split.
    backend : 'auto', 'eager', 'fused' or 'compiled'
        How a block is carried through the steps (:mod:`tjac.replay`); ``auto`` is ``fused`` for
        the built-in MLP without dropout, else ``eager``. :meth:`autotune` measures the backends
        and block widths and switches to the fastest pair.

    With ``recipe.param_filter`` the operator is the block J_S = d theta_T[S] / d theta_0[S] of the
    selected parameters S (the others start from theta_0 and train as usual): ``shape``,
    ``param_layout``, ``theta0`` and ``thetaT`` are then those of S, and every product replays the
    whole network with zero tangents outside S.

    Examples
    --------
    On SGD without momentum over a quadratic loss J has the closed form prod_t (I - eta_t A); the test
    suite checks that case. A tiny MLP:

    >>> import torch, tjac
    >>> op = tjac.TrainingJacobian(tjac.Recipe.paper(width=4, epochs=1, n_train=128))
    >>> op.shape
    (310, 310)
    >>> v, w = torch.randn(310, 1, dtype=torch.float64), torch.randn(310, 1, dtype=torch.float64)
    >>> bool(torch.isclose((op.matmat(v) * w).sum(), (v * op.rmatmat(w)).sum(), rtol=1e-10))
    True
    """

    def __init__(self, recipe: Recipe | Problem, theta0: torch.Tensor | None = None, *,
                 checkpoint="all", block_size: int = 128, backend: str = "auto"):
        self.problem = recipe if isinstance(recipe, Problem) else Problem(recipe)
        self.recipe = self.problem.recipe
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"`block_size` must be a positive integer, got {block_size!r}")
        self.block_size = block_size
        theta0 = self.problem.validate_theta0(theta0)
        check_fits(self.problem, checkpoint=checkpoint, block=block_size)
        t = time.perf_counter()
        self.trajectory = Trajectory(self.problem, theta0, checkpoint=checkpoint)
        self.time_trajectory = time.perf_counter() - t
        self._group = None  # a process group's rank 0 after distribute()
        self._tuning = None  # the measurements of the last autotune applied
        self.backend = backend
        self._sel = self.problem.selection  # None, or the indices of theta that J acts on
        P = self.problem.num_params if self._sel is None else int(self._sel.numel())
        self.shape = (P, P)
        self.dtype = self.problem.dtype
        self.device = self.problem.device
        self.num_matvecs = 0
        self.num_rmatvecs = 0
        self.num_replays = 0  # passes over the training run (a block of vectors shares one)
        self.time_matvec = 0.0
        self.time_rmatvec = 0.0

    # -- properties -----------------------------------------------------------------------------
    @property
    def theta0(self) -> torch.Tensor:
        """theta_0 in ``param_layout`` order (the selected parameters under ``param_filter``)."""
        return self._restrict(self.trajectory.theta0)

    @property
    def thetaT(self) -> torch.Tensor:
        return self._restrict(self.trajectory.thetaT)

    @property
    def param_layout(self):
        """(name, shape, offset) of every parameter tensor J acts on, offsets into ``theta0``."""
        return self.problem.selected_layout

    def _restrict(self, x):
        return x if self._sel is None else x[..., self._sel]

    def _expand(self, X):  # (k, |S|) -> (k, P): zero tangents outside S
        if self._sel is None:
            return X
        out = X.new_zeros(X.shape[0], self.problem.num_params)
        out[:, self._sel] = X
        return out

    @property
    def num_steps(self) -> int:
        return self.problem.num_steps

    def _as_block(self, X, name):
        if isinstance(X, np.ndarray):
            X = torch.from_numpy(X)
        if not isinstance(X, torch.Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor or numpy array")
        if X.ndim != 2 or X.shape[0] != self.shape[0]:
            raise ValueError(f"`{name}` must have shape ({self.shape[0]}, k), got {tuple(X.shape)}")
        if X.dtype.is_complex or not X.dtype.is_floating_point:
            raise TypeError(f"`{name}` must be real floating point, got {X.dtype}")
        if torch.finfo(X.dtype).bits > torch.finfo(self.dtype).bits:
            raise TypeError(f"`{name}` has dtype {X.dtype} but the operator is {self.dtype}; "
                            f"refusing to downcast silently")
        # products are not differentiable (every replay runs under no_grad): a block that requires
        # grad is detached, so every backend takes it alike (``fused`` raised on one in-place copy)
        return X.detach().to(device=self.device, dtype=self.dtype)

    # -- products -------------------------------------------------------------------------------
    def matmat(self, V) -> torch.Tensor:
        """J V for a block V of shape (P, k) (forward mode, one replay per ``block_size`` columns;
        spread over the ranks of a process group after :meth:`distribute`)."""
        V = self._as_block(V, "V")
        t = time.perf_counter()
        out = self._products(V, "jvp")
        self.time_matvec += time.perf_counter() - t
        self.num_matvecs += V.shape[1]
        return out

    def rmatmat(self, W) -> torch.Tensor:
        """J^T W for a block W of shape (P, k) (reverse sweep over the checkpointed trajectory)."""
        W = self._as_block(W, "W")
        t = time.perf_counter()
        out = self._products(W, "vjp")
        self.time_rmatvec += time.perf_counter() - t
        self.num_rmatvecs += W.shape[1]
        return out

    def _products(self, X, kind):
        if self._group is not None and X.shape[1] > 1:
            from .distributed import JVP, VJP

            return self._group.products(lambda Y: self.local_products(Y, kind), X,
                                  JVP if kind == "jvp" else VJP)
        return self.local_products(X, kind)

    def local_products(self, X, kind: str) -> torch.Tensor:
        """``J X`` (``kind='jvp'``) or ``J^T X`` (``'vjp'``) for a (P, k) block on this process
        alone, ``block_size`` columns per replay (no counters: :meth:`matmat` keeps those)."""
        f = self._jvp_block if kind == "jvp" else self._vjp_block
        if not X.shape[1]:
            return X.clone()
        return torch.cat([f(X[:, i:i + self.block_size].T).T
                          for i in range(0, X.shape[1], self.block_size)], dim=1)

    def distribute(self, group) -> bool:
        """Spread every product over the ranks of ``group`` (a :class:`tjac.distributed.Group`):
        on rank 0 each block's columns are split across the ranks, which replay their slices
        (:func:`tjac.distributed.serve`) and send them back. A collective: every rank calls it
        with its own operator of the same recipe, and the ranks refuse to go on unless theta_0
        and theta_T agree bit for bit. Returns False on a worker that rank 0 released without
        work. ``distribute(None)`` goes back to products on this process alone."""
        if group is None or group.world_size == 1:
            self._group = None
            return True
        ok = group.agree({"theta0": theta_sha256(self.trajectory.theta0),
                          "thetaT": theta_sha256(self.trajectory.thetaT), "P": self.shape[0],
                          "dtype": str(self.dtype)}, "training (theta_0 or theta_T differ)",
                         kind="disagree")
        self._group = group if group.is_driver else None
        if ok and group.is_driver:
            group.tune({"backend": self.backend, "block": self.block_size})
        return ok

    @property
    def world_size(self) -> int:
        """The ranks each product block is spread over (1 on this process alone; after
        :meth:`distribute`, the group's size on rank 0): ``tjac.svd``'s plan costs a block by its
        busiest rank's share."""
        return 1 if self._group is None else self._group.world_size

    def matvec(self, v) -> torch.Tensor:
        return self.matmat(_col(v)).reshape(-1)

    def rmatvec(self, w) -> torch.Tensor:
        return self.rmatmat(_col(w)).reshape(-1)

    def autotune(self, *, blocks=(1, 4, 8, 16, 32, 64, 128), backends=None, steps: int = 10,
                 compile_threshold_s: float | None = None, products: int | None = None,
                 **kw) -> dict:
        """Pick the replay backend and block width on ``steps`` steps of this run
        (:func:`tjac.replay.autotune`), switch to the pick (``backend``, ``block_size``) and return
        it with the measurements. The default (``auto``'s backend at the widest block) is kept
        unless another is at least 20% cheaper per vector by the median of repeated timings, and
        nothing is timed for a run with P x T <= :data:`tjac.replay.autotune.TINY_PARAM_STEPS`
        (the same pick every time, so bitwise-identical products). Between runs too close to
        call either way, two calls may still pick differently (every pick gives the same
        products to ~1e-15; pin ``backend`` and the width for bitwise reproducibility).
        ``products``: the vector products the solve is projected to take (default P), which
        decides whether ``compiled`` can pay for its compile; other keywords go to
        :func:`tjac.replay.autotune`."""
        if compile_threshold_s is not None:
            kw["compile_threshold_s"] = compile_threshold_s
        tuned = replay.autotune(self.problem, blocks=blocks, backends=backends, steps=steps,
                                trajectory=self.trajectory, products=products, **kw)
        self.apply_tuning(tuned)
        return tuned

    def apply_tuning(self, tuned: dict) -> None:
        """Use a pick made by :meth:`autotune` (e.g. one stored in a run's provenance)."""
        check_fits(self.problem, checkpoint=self.trajectory.policy, block=int(tuned["block"]))
        self.block_size = int(tuned["block"])
        self.backend = tuned.get("backend", "auto")
        self._tuning = tuned
        if self._group is not None:  # every rank replays with the same arithmetic
            self._group.tune({"backend": self.backend, "block": self.block_size})

    def vector_costs(self) -> dict | None:
        """Measured seconds per vector and step at each replay width, ``{width: s}``, for the
        backend in use, from the last :meth:`autotune` applied (None before one, or when it did
        not time this backend). ``tjac.svd(method="auto")`` weighs them to choose the top's
        solver and block width."""
        table = ((self._tuning or {}).get("seconds_per_vector_step") or {}).get(self.backend)
        return {int(w): float(s) for w, s in table.items()} if table else None

    @property
    def backend(self) -> str:
        """The replay backend in use (resolved: never 'auto')."""
        return self._replay.name

    @backend.setter
    def backend(self, name: str) -> None:
        current = getattr(self, "_replay", None)
        if current is None or replay.resolve(self.problem, name) != current.name:  # keep caches
            self._replay = replay.make(self.problem, self.trajectory, name)

    def _jvp_block(self, V):  # V: (k, P) rows are tangents
        self.num_replays += 1
        out = self._restrict(self._replay.jvp(self._expand(V)))
        if not bool(torch.isfinite(out).all()):
            raise TrainingDivergedError(self.num_steps - 1, "tangents")
        return out

    def _vjp_block(self, W):  # W: (k, P) rows are cotangents of theta_T
        self.num_replays += 1
        out = self._restrict(self._replay.vjp(self._expand(W)))
        if not bool(torch.isfinite(out).all()):
            raise TrainingDivergedError(0, "cotangents")
        return out

    # -- interop --------------------------------------------------------------------------------
    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` (numpy in, numpy out, dtype always passed)."""
        from scipy.sparse.linalg import LinearOperator

        np_dtype = torch.empty((), dtype=self.dtype).numpy().dtype

        def apply(fn):
            def f(X):  # a wider float than the operator's is refused by matmat, not cast down
                X = np.ascontiguousarray(np.asarray(X).reshape(self.shape[0], -1))
                return fn(torch.from_numpy(X)).cpu().numpy()
            return f

        mm, rmm = apply(self.matmat), apply(self.rmatmat)

        return LinearOperator(self.shape, matvec=lambda x: mm(x).reshape(-1),
                              rmatvec=lambda x: rmm(x).reshape(-1), matmat=mm, rmatmat=rmm,
                              dtype=np_dtype)

    def to_linear_operator(self):
        """J as a ``linear_operator.operators.LinearOperator`` (gpytorch's operator library):
        ``@``, ``.mT`` (Jᵀ), lazy compositions such as ``L.mT @ L``, ``to_dense()`` (see
        :mod:`tjac.linop`)."""
        from .linop import JacobianLinearOperator

        return JacobianLinearOperator(self)

    def counters(self) -> dict:
        return {"num_matvecs": self.num_matvecs, "num_rmatvecs": self.num_rmatvecs,
                "num_replays": self.num_replays,
                "time_matvec": self.time_matvec, "time_rmatvec": self.time_rmatvec,
                "time_trajectory": self.time_trajectory}

    def measure_activation(self, widths=None):
        """Measure one replay step's peak extra memory at two block widths
        (:func:`tjac.memory.measure_activation`; two one-step JVPs, not counted as products) and
        keep it on the problem, so that :func:`tjac.problem.memory_estimate`, ``check_fits`` and a
        run's plans count the model's intermediates from now on. Returns the estimate (None where
        the peak cannot be read)."""
        from .memory import WIDTHS, measure_activation

        est = measure_activation(self._replay, self.problem.num_params, dtype=self.dtype,
                                 device=self.device, widths=widths or WIDTHS)
        if est is not None:
            self.problem.activation = est
        return est

    # -- self-check -----------------------------------------------------------------------------
    def check(self, *, n_probes: int = 2, rng: int = 0, adjoint_rtol: float | None = None) -> CheckReport:
        """Verify that J is a well-defined matrix and that the two products are adjoint.

        1. Two JVP replays of the same vectors agree bit for bit (refuses unseeded randomness in a
           forward, naming the module, and unseeded shuffling; seeded dropout passes).
        2. Replaying each checkpointed segment reproduces the stored states bit for bit.
        3. <J V, W> = <V, J^T W> on ``n_probes`` random vectors to ``adjoint_rtol``
           (default 1e-10 in float64, 1e-4 in float32).

        Raises :class:`NondeterminismError` or ``AssertionError``-free ``ValueError`` with the cause.
        """
        gen = torch.Generator().manual_seed(rng)
        P = self.shape[0]
        V = torch.randn(P, n_probes, generator=gen, dtype=torch.float64).to(self.device, self.dtype)
        W = torch.randn(P, n_probes, generator=gen, dtype=torch.float64).to(self.device, self.dtype)
        JV1, JV2 = self.matmat(V), self.matmat(V)
        diff = float((JV1 - JV2).abs().max())
        if not torch.equal(JV1, JV2):
            raise NondeterminismError(f"two replays of J v disagree (max diff {diff:.3e})"
                                      + _cause(self.problem))
        self.trajectory.verify_replay()
        JtW = self.rmatmat(W)
        lhs = (JV1 * W).sum(0).double()
        rhs = (V * JtW).sum(0).double()
        scale = (JV1.norm(dim=0) * W.norm(dim=0)).double()
        rel = float(((lhs - rhs).abs() / scale).max())
        tol = adjoint_rtol if adjoint_rtol is not None else (
            1e-10 if self.dtype == torch.float64 else 1e-4)
        if not rel <= tol:
            raise ValueError(f"adjoint identity <Jv,w> = <v,J^T w> fails: relative error {rel:.3e} "
                             f"> {tol:.1e}")
        self.measure_activation()  # the model's per-step memory, for the plans from here on
        log.info("check passed: deterministic, replay exact, adjoint rel. error %.2e", rel)
        return CheckReport(True, True, rel, diff, _scalar_map(V, JV1, W, JtW, self.dtype))


def _scalar_map(V, JV, W, JtW, dtype) -> float | None:
    """c if J maps every probe v to c v and J^T every w to c w, to sqrt(eps) of ``dtype``
    relative to the probes' images, else None (the check's own products: no extra replay). A
    random probe is an eigenvector only of a multiple of I (with probability 1), and
    E ||(J - c I) v||^2 = ||J - c I||_F^2 for Gaussian v."""
    X = torch.cat([V, W], 1).double()
    Y = torch.cat([JV, JtW], 1).double()
    c = float((X * Y).sum() / (X * X).sum())
    tol = float(torch.finfo(dtype).eps) ** 0.5
    if float((Y - c * X).norm()) <= tol * max(float(Y.norm()), abs(c) * float(X.norm())):
        return c
    return None


def theta_sha256(theta: torch.Tensor) -> str:
    """SHA-256 of a parameter vector's bytes (provenance, resume and rank checks)."""
    import hashlib

    return hashlib.sha256(theta.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def _col(v):
    if isinstance(v, np.ndarray):
        v = torch.from_numpy(v)
    return v.reshape(-1, 1)
