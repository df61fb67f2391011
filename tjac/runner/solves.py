"""The run's solves, resumable: the dense path (J's columns block by block, then its SVD or the
bottom from its QR) and the Krylov methods (Lanczos' recurrence checkpointed after every step)."""

from __future__ import annotations

import logging

import numpy as np
import torch

from .. import _checks
from ..checkpoint import LanczosCheckpoint
from ..linalg import Progress, fresh_residuals, small_svd, svd
from ..linalg.dense import column_blocks, dense_bottom_torch, numpy_dtype
from ..linalg.plan import HEADROOM


log = logging.getLogger("tjac.runner")


def _to_np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _svd_full(J):
    U, S, Vt = small_svd(J)
    return U, S, Vt.T


def _residuals(J, U, S, V, block: int = 512) -> torch.Tensor:
    """(||J v_i - s_i u_i||, ||J^T u_i - s_i v_i||) of every triplet of a full SVD of the formed J
    (two P^3 products, in column blocks): each sigma of the dense path's full spectrum is certified
    to its own hypot(residuals), as the solvers' triplets are."""
    out = []
    for i in range(0, S.shape[0], block):
        sl = slice(i, i + block)
        out.append(torch.stack([(J @ V[:, sl] - U[:, sl] * S[sl]).norm(dim=0),
                                (J.T @ U[:, sl] - V[:, sl] * S[sl]).norm(dim=0)], 1))
    return torch.cat(out) if out else S.new_zeros((0, 2))


def _values_fit(P: int, dtype) -> bool:
    """Whether a copy of J (for the values-only SVD of the bottom-only path) fits in the host's
    free memory with the headroom plans keep; logged when it does not (the counts stay partial)."""
    need = P * P * torch.empty((), dtype=dtype).element_size()
    have = _checks.available_bytes("cpu")
    if have is None or need <= HEADROOM * have:
        return True
    log.info("the full spectrum is skipped: a copy of J needs %.1f GiB, %.1f GiB available",
             need / 2**30, have / 2**30)
    return False


def _dense_bottom(op, J: np.ndarray, k: int, tol: float) -> dict:
    """The bottom k of the formed J (overwritten: :func:`tjac.linalg.dense.dense_bottom`),
    certified by fresh products of ``op``."""
    S, U, V, smax, info = dense_bottom_torch(J, k, tol=tol, gen=torch.Generator().manual_seed(0),
                                             device=op.device, dtype=op.dtype)
    del J
    log.info("bottom-%d from J's QR: %d steps of inverse subspace iteration (block %d), "
             "QR %.1f s, iteration %.1f s", k, info["steps"], info["block"],
             info["factor_seconds"], info["iterate_seconds"])
    res = fresh_residuals(op, S, U, V)
    return dict(S=S, U=U, V=V, res=res, method="dense", smax=smax,
                conv=res.max(1).values <= tol * smax)


def _dense_resumable(w, run, op, *, block: int = 128, progress=None, plan=None,
                     host: bool = False):
    """J column block by column block; rows of the state array are columns of J (= J e_i), the
    group's ``n_committed`` (columns done) written after each block's rows. Returns J as a torch
    tensor on the operator's device, or (``host``) as a column-major numpy array of the
    operator's dtype, read without a second copy (what :func:`tjac.linalg.dense.dense_bottom`
    factorizes in place)."""
    P = op.shape[0]
    g = w.state_group(run, "dense")
    if "JT" not in g or tuple(g["JT"].shape) != (P, P):  # no columns yet: no stale counter either
        w.drop_state(run, "dense")
        g = w.state_group(run, "dense")
    arr = w.state_array(g, "JT", (P, P), "float64", ("column", "param"), chunks=(block, P))
    done = int(g.attrs.get("n_committed", 0))
    bar = progress(total=P, initial=done, desc="dense J columns") if progress else None
    report = Progress("dense J columns", expected_products=P - done, emit=log.info)
    if plan is not None:
        log.info("solve %s", plan.describe())
    for i, cols in column_blocks(op, block=block, start=done):
        n = cols.shape[1]
        arr[i:i + n] = _to_np(cols.T).astype(np.float64)
        g.attrs["n_committed"] = i + n
        if bar:
            bar.update(n)
        else:
            report.update(i + n - done)
    if bar:
        bar.close()
    if host:  # the rows are J's columns: read block by block into J, column-major, of op's dtype
        J = np.empty((P, P), dtype=numpy_dtype(op.dtype), order="F")
        for i in range(0, P, block):
            J[:, i:i + block] = np.asarray(arr[i:i + block]).T
        return J
    return torch.from_numpy(np.asarray(arr[:]).T.copy()).to(op.device, op.dtype)


def _krylov_resumable(w, run, op, which, k, tol, method, progress, block, *, plan=None,
                      max_memory=None, spill_dir=None):
    name = which
    ckpt = None
    spill = plan is not None and plan.spill
    if spill:  # the spilled solve does not checkpoint: a killed run starts it again
        w.drop_state(run, name)
        log.info("%s-%d: the Lanczos basis spills to disk beside the store (no checkpoint: an "
                 "interrupted solve restarts from its seed)", which, k)
    elif method == "lanczos":
        ckpt = LanczosCheckpoint(w, w.state_group(run, name), op)
        if ckpt.load() is None:  # a fresh solve writes into a clean group (no rows of a dead one)
            w.drop_state(run, name)
            ckpt = LanczosCheckpoint(w, w.state_group(run, name), op)
    else:
        w.drop_state(run, name)
    if plan is not None:
        log.info("solve %s", plan.describe())
    report = Progress(f"{which}-{k} {method}", k=k, emit=log.info, bar=progress,
                      expected_products=None if plan is None else plan.estimate.products,
                      max_products=None if plan is None else plan.estimate.max_products)
    extra = {"spill_dir": spill_dir} if spill else {}
    try:
        r = svd(op, k, which=which, method=method, tol=tol, block=block, checkpoint=ckpt,
                raise_on_failure=False, callback=report, max_memory=max_memory, **extra)
    finally:
        report.close()
    return dict(S=r.S, U=r.U, V=r.V, res=r.residuals, method=r.method, smax=r.norm_estimate,
                conv=r.converged)
