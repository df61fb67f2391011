r"""Block Golub-Kahan-Lanczos bidiagonalization with full reorthogonalization and thick restart.

With orthonormal V (P x n) and U (P x n) built block by block,

    A V_j = sum_{i<=j} U_i C_ij       (orthogonalizing A V_j against all of U: B's block column j)
    A^T U_j = V (B^T)_j + V_{next} S_j (the next pending block of V)

so A V = U B exactly (B block upper triangular; block bidiagonal up to round-off, kept whole), and a
Ritz triplet (s, u = U x, v = V y) of B has A v - s u = 0 and ||A^T u - s v|| = ||S x_last||, the
classical Lanczos residual estimate. The final certificate always comes from fresh products.

Thick restart (a memory fallback: restarts discard the tail directions the bottom needs): keep the
wanted Ritz vectors; the coupling of the pending block to them reappears in B automatically,
because every new A V block is orthogonalized against *all* of U. Converged wanted triplets stay in
the basis across restarts (locked), so later blocks are orthogonal to them.

Memory: each basis lives in storage of rows (:class:`Basis`) that grows by doubling, so
appending a block copies nothing; resident are the two bases (2 P n values) and, while one of them
doubles, a copy of it (3 P n at that moment). On the CPU the rows not yet written take no memory.
"""

from __future__ import annotations

import logging

import torch

from ._base import KrylovResult, orthonormalize, small_svd, values_unchanged

log = logging.getLogger(__name__)

# After the wanted triplets first certify with a block narrower than k, fresh directions are added
# and the solve goes on for this many steps; it ends when the wanted values have not changed, with
# the triplets certified then (their fresh residuals stand: no second round of 2k products).
CONFIRM_STEPS = 3


def gkl(op, k: int, which: str, *, tol: float, maxiter: int, block: int, max_basis: int,
        v0=None, gen=None, callback=None, state=None, on_step=None, verify=None) -> KrylovResult:
    """Run block GKL until k wanted Ritz triplets are certified to tol * s_max.

    ``maxiter`` counts block steps. ``callback(dict)`` is called after every step (``checked``
    marks the steps with a Ritz extraction, whose entries form the history). Convergence needs at least k Ritz values: a Krylov space that
    closes early (an invariant subspace, or a multiple value seen through a narrow block) continues
    with fresh random directions orthogonal to the basis (see :func:`orthonormalize`). When the
    recurrence's residual estimates say converged, ``verify(S, U, V, s_max)`` (fresh residuals, (k, 2))
    decides; if the fresh residuals disagree the recurrence goes on. ``on_step(state)`` receives
    the full recurrence state after every step (a dict of tensors and ints, plus ``restarted``
    when the basis prefix changed); passing it back as ``state`` continues exactly where it was
    (the generator ``gen`` must be restored by the caller). Its ``U`` and ``V`` are views of the
    solve's storage (:class:`Basis`), valid until the next step: copy what is kept.
    """
    P = op.shape[0]
    dt, dev = op.dtype, op.device
    b = min(block, P)
    cap = min(P, max_basis + 2 * b)
    Vb = Basis(P, dt, dev, cap)   # processed V columns (B's columns)
    Ub = Basis(P, dt, dev, cap)
    B = torch.zeros((0, 0), dtype=dt, device=dev)
    pending = None
    if state is None:  # a resumed solve draws nothing here: its generator continues the saved one
        X0 = v0 if v0 is not None else torch.randn(P, b, generator=gen, dtype=torch.float64)
        pending, _, _ = orthonormalize(X0.to(dev, dt).reshape(P, -1), gen=gen)
    history = []
    S_last = None
    res = None
    next_check = 0
    step0 = 0
    # while looking for missed copies after a certification: {"step", "values", "basis" (the
    # basis size then; None after a restart), "smax", "fresh" (the certified residuals)}
    confirm = None
    if state is not None:
        B, pending, S_last = (state[n] for n in ("B", "pending", "S_last"))
        Ub.assign(state["U"])
        Vb.assign(state["V"])
        step0, next_check = int(state["step"]) + 1, int(state["next_check"])
        history = list(state.get("history", []))
        confirm = state.get("confirm")
    sig = None
    final_fresh = None
    restarted = False
    for step in range(step0, maxiter):
        W = op.matmat(pending)
        Un, C, R = orthonormalize(W, Ub.cols, gen=gen)
        nu, bp = Ub.n, pending.shape[1]
        Bn = B.new_zeros((nu + bp, nu + bp))
        Bn[:nu, :nu] = B
        Bn[:nu, nu:] = C
        Bn[nu:, nu:] = R
        B = Bn
        Ub.append(Un)
        Vb.append(pending)
        del W
        n = Ub.n
        pending, S_last = next_right_block(op, Un, P - n,
                                           lambda X: orthonormalize(X, Vb.cols, gen=gen), gen)
        last = pending is None or step == maxiter - 1 or n + pending.shape[1] > max_basis
        if not last and n < next_check:  # Ritz extraction is O(n^3): do it on a geometric grid
            if callback is not None:  # progress between checks: the last check's counts
                callback({"step": step, "basis": n, "checked": False,
                          "n_converged": history[-1]["n_converged"] if history else 0})
            if on_step is not None:
                on_step(_state(Ub, Vb, B, pending, S_last, step, next_check, history, restarted, confirm))
                restarted = False
            continue
        next_check = n + max(bp, n // 10)
        X, sig, Yt = small_svd(B)
        smax = float(sig[0])
        if S_last is not None:
            res = (S_last @ X[-bp:, :]).norm(dim=0)
        else:
            res = torch.zeros_like(sig)
        want = _wanted(sig, k, which)
        conv = res[want] <= tol * smax
        fresh, done, reuse = None, False, False
        if n >= k and bool(conv.all()):
            values = [float(x) for x in sig[want]]
            same = confirm is not None and values_unchanged(values, confirm["values"], tol, smax)
            ripe = same and step >= confirm["step"] + CONFIRM_STEPS
            if ripe and confirm.get("basis") is not None and confirm.get("fresh") is not None:
                # no missed copy moved the values: the triplets certified by fresh products when
                # the confirmation began stand (fresh products again would cost 2k)
                done = reuse = True
            elif confirm is None or not same or ripe:
                if verify is not None:
                    fresh = verify(sig[want], Ub.cols @ X[:, want], Vb.cols @ Yt.T[:, want],
                                   smax)
                    conv = fresh.max(dim=1).values <= tol * smax
                if bool(conv.all()):
                    if ripe or b >= k or pending is None or P - n - pending.shape[1] <= 0:
                        done = True
                    else:  # certified: now look for copies a narrow block could not see
                        pending, S_last = _inject(pending, S_last, Vb, b, P - n, gen)
                        # (the certified triplets are B's leading n x n block's: kept by size)
                        confirm = {"step": step, "values": values, "basis": n, "smax": smax,
                                   "fresh": None if fresh is None else fresh.tolist()}
        record_check(history, {"step": step, "basis": n, "sigma_max": smax,
                               "max_residual": float(res[want].max() / smax),
                               "n_converged": int(conv.sum()) if n >= k else 0},
                     fresh, confirm, smax, callback)
        log.debug("GKL step %d: basis %d, %d/%d converged", step, n, history[-1]["n_converged"], k)
        if reuse:  # the triplets certified when the confirmation began, recomputed from B
            nc = confirm["basis"]
            Xc, sc, Ytc = small_svd(B[:nc, :nc])
            wc = _wanted(sc, k, which)
            return KrylovResult(S=sc[wc], U=Ub.cols[:, :nc] @ Xc[:, wc],
                                V=Vb.cols[:, :nc] @ Ytc.T[:, wc],
                                residuals=torch.tensor(confirm["fresh"], dtype=sc.dtype,
                                                       device=sc.device),
                                fresh=True, history=tuple(history), smax=confirm["smax"])
        if done or pending is None:
            final_fresh = fresh if done else None
            break
        full = n + pending.shape[1] > max_basis
        if on_step is not None and not full:
            on_step(_state(Ub, Vb, B, pending, S_last, step, next_check, history, restarted, confirm))
            restarted = False
        # thick restart: keep the wanted Ritz vectors (+ extra); never on the last step, whose
        # result comes from this basis' Ritz extraction (a restart there paired the new basis with
        # the old one's Ritz coefficients: a shape error, or wrong vectors)
        if full and step < maxiter - 1:
            keep = _wanted(sig, min(n - 1, k + b), which)
            Ub.assign(Ub.cols @ X[:, keep])
            Vb.assign(Vb.cols @ Yt.T[:, keep])
            B = torch.diag(sig[keep])
            if confirm is not None:  # the certified triplets' basis is gone: verify again
                confirm = {**confirm, "basis": None}
            # the pending block's coupling to the kept U is recovered when A V_pending is
            # orthogonalized against them at the next step
            log.debug("thick restart at basis %d, keeping %d", n, len(keep))
            restarted = True
            if on_step is not None:
                on_step(_state(Ub, Vb, B, pending, S_last, step, next_check, history, restarted, confirm))
                restarted = False
    if sig is None:  # resumed past the last Ritz extraction: extract now
        X, sig, Yt = small_svd(B)
        smax = float(sig[0])
        res = (S_last @ X[-S_last.shape[1]:, :]).norm(dim=0) if S_last is not None \
            else torch.zeros_like(sig)
    want = _wanted(sig, k, which)
    U, V = Ub.cols @ X[:, want], Vb.cols @ Yt.T[:, want]
    if final_fresh is not None:
        return KrylovResult(S=sig[want], U=U, V=V, residuals=final_fresh, fresh=True,
                            history=tuple(history), smax=smax)
    return KrylovResult(S=sig[want], U=U, V=V, residuals=res[want], fresh=False,
                        history=tuple(history), smax=smax)


def record_check(history, entry, fresh, confirm, smax, callback):
    """Append one Ritz check to ``history`` (with the fresh residuals and the confirmation phase
    when there are any) and hand it to ``callback``."""
    if fresh is not None:
        entry["max_fresh_residual"] = float(fresh.max() / smax)
    if confirm is not None:
        entry["confirming_since"] = confirm["step"]
    history.append(entry)
    if callback is not None:
        callback({**entry, "checked": True})


def next_right_block(op, Un, room, orth, gen):
    """The next pending V block and its coupling S_last from A^T U_new, orthonormalized by
    ``orth`` against the whole V basis (in RAM or on disk); on the last block the complement of V
    is all that is left, drawn at random. (None, None) when V spans the space."""
    if room <= 0:
        return None, None
    Z = op.rmatmat(Un)
    if room >= Z.shape[1]:
        pending, _, S_last = orth(Z)
        return pending, S_last
    rnd = torch.randn(Z.shape[0], room, generator=gen, dtype=torch.float64).to(Z.device, Z.dtype)
    pending, _, _ = orth(rnd)
    return pending, pending.T @ Z


def _wanted(sig, k, which):
    n = sig.shape[0]
    k = min(k, n)  # fewer than k only when the caller stopped early (maxiter): reported short
    if which == "top":
        return torch.arange(k, device=sig.device)
    return torch.arange(n - 1, n - 1 - k, -1, device=sig.device)


def _state(Ub, Vb, B, pending, S_last, step, next_check, history, restarted, confirm):
    return {"U": Ub.cols, "V": Vb.cols, "B": B, "pending": pending, "S_last": S_last, "step": step,
            "next_check": next_check, "history": list(history), "restarted": restarted,
            "confirm": confirm}


def _inject(pending, S_last, Vb, b, room, gen):
    """Widen the pending block by up to b random directions orthogonal to the whole V basis and to
    the pending block: the recurrence then explores the complement of what it has found, where
    the copies of a multiple value beyond the block width live. A^T U has no component along
    them yet, so their rows of S_last are zero."""
    P, n = Vb.P, Vb.n
    width = min(b, room - pending.shape[1])
    F = torch.randn(P, width, generator=gen, dtype=torch.float64).to(Vb.device, Vb.dtype)
    Vb.append(pending)  # orthogonal to the basis and the pending block, without a copy of both
    F, _, _ = orthonormalize(F, Vb.cols, gen=gen)
    Vb.truncate(n)
    S_new = None if S_last is None else torch.cat([S_last, S_last.new_zeros((width, S_last.shape[1]))])
    return torch.cat([pending, F], 1), S_new


class Basis:
    """The columns of a P x n basis, kept as the rows of storage that grows by doubling.

    ``cols`` is the P x n view (no copy); :meth:`append` writes a block into the next rows, so a
    step copies nothing until the storage is full and doubles (up to ``limit`` rows). Rows not yet
    written are never touched: on the CPU they take no resident memory.
    """

    def __init__(self, P: int, dtype, device, limit: int, rows: int = 64):
        self.P, self.dtype, self.device, self.limit = P, dtype, device, max(1, limit)
        self._rows = torch.empty((min(rows, self.limit), P), dtype=dtype, device=device)
        self.n = 0

    @property
    def cols(self) -> torch.Tensor:
        return self._rows[: self.n].T

    def append(self, X: torch.Tensor) -> None:
        need = self.n + X.shape[1]
        if need > self._rows.shape[0]:
            size = max(need, min(2 * self._rows.shape[0], self.limit))
            rows = torch.empty((size, self.P), dtype=self.dtype, device=self.device)
            rows[: self.n] = self._rows[: self.n]
            self._rows = rows
        self._rows[self.n: need] = X.T
        self.n = need

    def assign(self, X: torch.Tensor) -> None:
        """Replace the basis by X's columns (X already computed: it may be made from ``cols``)."""
        self.n = 0
        self.append(X)

    def truncate(self, n: int) -> None:
        self.n = n
