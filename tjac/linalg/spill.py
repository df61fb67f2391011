r"""Long-basis block GKL for the bottom in bounded memory: the bases on disk, B as a band.

Above the dense limit (P ~ 2e4: J and its SVD need ~24 GB; in-RAM long-basis Lanczos ~30 GB with
B's dense SVD) the bottom runs here. The same recurrence as :func:`tjac.linalg.lanczos.gkl`
without restarts (the bottom never restarts), with two changes:

* **The bases U and V live on disk** (:class:`DiskBasis`: one raw file per basis, rows = basis
  vectors, appended block by block, in a temporary directory under ``directory``: next to the run's
  store for ``tjac run``, else the system's temp dir; removed when the solve ends). Full
  reorthogonalization streams over chunks of rows (``chunk_bytes``, default 64 MiB): block modified
  Gram-Schmidt, a chunk read once per pass, two passes with a QR between them ("twice is enough"),
  the per-column path of :func:`tjac.linalg.orthonormalize` on breakdown. RAM: a chunk, a few
  P x b blocks, the band of B, the k Ritz vectors; disk: 2 P n values.
  Raw files, not zarr: ``tjac.linalg`` may not import the store (tests/test_layers.py), the
  spill is scratch space that no resume reads back, and every step reads the whole basis in
  order — one sequential ``readinto`` per chunk, without zarr's per-chunk files and codecs.
* **The Ritz extraction is banded** (:mod:`tjac.linalg.banded`): O(n b) memory instead of the
  n x n B and its dense SVD, and the residual estimate adds the extraction's own residual and the
  norm of the dropped round-off couplings.

Fresh residuals certify the result, as everywhere. The spilled solve does not checkpoint (a killed
one starts again from its seed: ``svd`` refuses ``checkpoint=`` on this path); its directory is
``tjac-spill-<pid>-<host>-*``, and the next spilled solve in that place deletes those of dead
processes on the same host.
Arithmetic differs from the in-RAM path in the order of the sums (block MGS over chunks vs block
CGS): results agree to round-off, not bit for bit (tests/test_spill.py). Measured on the paper
recipe at width 64 (P = 4,810, bottom-16, BENCHMARKS.md): the same 7,296 products and steps as
in RAM, sigma equal to 1.5e-16 sigma_max, peak RSS above the operator 346 MiB against 1,306 MiB.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile

import numpy as np
import torch

from ._base import KrylovResult, orthonormalize, values_unchanged
from .banded import BandedB, bottom_triplets
from .lanczos import next_right_block, record_check

log = logging.getLogger(__name__)

CHUNK_BYTES = 64 * 2**20
CONFIRM_STEPS = 3  # as lanczos.CONFIRM_STEPS


class DiskBasis:
    """An orthonormal basis of R^P stored row by row in a raw file (``path``), read in chunks."""

    def __init__(self, path: str, P: int, dtype, *, chunk_bytes: int = CHUNK_BYTES):
        self.path, self.P, self.dtype = path, P, dtype
        self.np_dtype = torch.empty((), dtype=dtype).numpy().dtype
        self.rows = max(1, chunk_bytes // (P * self.np_dtype.itemsize))
        self.n = 0
        self._f = open(path, "w+b")
        self._buf = np.empty((self.rows, P), dtype=self.np_dtype)

    def close(self):
        self._f.close()

    def append(self, Q: torch.Tensor) -> None:
        self._f.seek(self.n * self.P * self.np_dtype.itemsize)
        self._f.write(np.ascontiguousarray(Q.detach().cpu().T.numpy()).tobytes())
        self._f.flush()
        self.n += Q.shape[1]

    def chunks(self):
        """(start, rows (m, P) tensor) over the stored vectors; the tensor is reused."""
        f, item = self._f, self.np_dtype.itemsize
        for start in range(0, self.n, self.rows):
            m = min(self.rows, self.n - start)
            f.seek(start * self.P * item)
            view = self._buf[:m]
            if f.readinto(memoryview(view).cast("B")) != view.nbytes:
                raise OSError(f"short read from the spilled basis {self.path!r}")
            yield start, torch.from_numpy(view)

    def project(self, Y: torch.Tensor):
        """One block-MGS pass: (Y - Q Q^T Y, Q^T Y), streaming over the chunks."""
        Y = Y.clone()
        C = Y.new_zeros((self.n, Y.shape[1]))
        for start, Qc in self.chunks():
            Qc = Qc.to(Y.device)
            c = Qc @ Y
            Y -= Qc.T @ c
            C[start:start + Qc.shape[0]] = c
        return Y, C

    def combine(self, X: torch.Tensor) -> torch.Tensor:
        """Q X for X (n, m): the Ritz vectors."""
        out = torch.zeros((self.P, X.shape[1]), dtype=self.dtype, device=X.device)
        for start, Qc in self.chunks():
            out += Qc.to(X.device).T @ X[start:start + Qc.shape[0]].to(self.dtype)
        return out


def orthonormalize_streamed(X, basis: DiskBasis, *, gen=None, drop_tol: float = 1e-10):
    """:func:`tjac.linalg.orthonormalize` against a basis on disk: (Q, C, R) with
    X = basis C + Q R. Two streamed passes with a QR between them; per column on breakdown."""
    norms = X.norm(dim=0)
    Y, C = basis.project(X)
    Q1, R1 = torch.linalg.qr(Y)
    Q2, C2 = basis.project(Q1)
    Q, R2 = torch.linalg.qr(Q2)
    C, R = C + C2 @ R1, R2 @ R1
    if bool((R.diagonal().abs() > drop_tol * norms.clamp_min(torch.finfo(X.dtype).tiny)).all()):
        return Q, C, R
    P, b = X.shape
    C = X.new_zeros((basis.n, b))
    R = X.new_zeros((b, b))
    Q = X.new_empty((P, b))
    for j in range(b):
        x = X[:, j:j + 1].clone()
        x_norm = float(x.norm())
        for _ in range(3):
            x, c = basis.project(x)
            C[:, j:j + 1] += c
            if j:
                r = Q[:, :j].T @ x
                x -= Q[:, :j] @ r
                R[:j, j:j + 1] += r
        nrm = float(x.norm())
        if nrm > drop_tol * x_norm and nrm > 0:
            R[j, j] = nrm
            Q[:, j:j + 1] = x / nrm
            continue
        for _ in range(5):  # breakdown: a random direction orthogonal to everything so far
            z = torch.randn(P, 1, generator=gen, dtype=torch.float64).to(X.device, X.dtype)
            for _ in range(2):
                z, _ = basis.project(z)
                if j:
                    z -= Q[:, :j] @ (Q[:, :j].T @ z)
            if float(z.norm()) > 1e-3:
                break
        Q[:, j:j + 1] = z / z.norm()
    return Q, C, R


def gkl_spilled(op, k: int, *, tol: float, maxiter: int, block: int, directory: str | None = None,
                chunk_bytes: int = CHUNK_BYTES, v0=None, gen=None, callback=None,
                verify=None) -> KrylovResult:
    """The bottom k triplets by unrestarted block GKL with the bases on disk (module doc)."""
    P = op.shape[0]
    _remove_dead_spills(directory or tempfile.gettempdir())
    work = tempfile.mkdtemp(prefix=f"tjac-spill-{os.getpid()}-{_host()}-", dir=directory)
    Ub = Vb = None
    try:  # the directory goes whatever fails, including opening the second basis
        Ub = DiskBasis(os.path.join(work, "U.bin"), P, op.dtype, chunk_bytes=chunk_bytes)
        Vb = DiskBasis(os.path.join(work, "V.bin"), P, op.dtype, chunk_bytes=chunk_bytes)
        log.info("spilled Lanczos: bases in %s", work)
        return _run(op, k, tol=tol, maxiter=maxiter, block=block, Ub=Ub, Vb=Vb, v0=v0, gen=gen,
                    callback=callback, verify=verify)
    finally:
        for basis in (Ub, Vb):
            if basis is not None:
                basis.close()
        shutil.rmtree(work, ignore_errors=True)


def _host() -> str:
    """This machine's name without dashes (a pid means something on one host only)."""
    import socket

    return "".join(c if c.isalnum() else "_" for c in socket.gethostname())[:32] or "host"


def _remove_dead_spills(directory: str) -> None:
    """Delete ``tjac-spill-<pid>-<host>-*`` directories of this host whose process is gone (a
    SIGKILLed solve cannot remove its own bases, which may be tens of GB). Spills of other hosts
    sharing the directory (NFS, cluster scratch) are never touched: their pids mean nothing here."""
    host = _host()
    for name in os.listdir(directory):
        parts = name.split("-")
        if not name.startswith("tjac-spill-") or len(parts) < 5 or not parts[2].isdigit() \
                or parts[3] != host:
            continue
        try:
            os.kill(int(parts[2]), 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
        except (PermissionError, OverflowError):
            pass


def _run(op, k, *, tol, maxiter, block, Ub, Vb, v0, gen, callback, verify):
    P = op.shape[0]
    dt, dev = op.dtype, op.device
    b = min(block, P)
    band = BandedB()
    X0 = v0 if v0 is not None else torch.randn(P, b, generator=gen, dtype=torch.float64)
    pending, _, _ = orthonormalize(X0.to(dev, dt).reshape(P, -1), gen=gen)
    history, confirm, fresh_done = [], None, None
    next_check, sig = 0, None
    for step in range(maxiter):
        W = op.matmat(pending)
        Un, C, R = orthonormalize_streamed(W, Ub, gen=gen)
        band.append(C, R)
        bp = pending.shape[1]
        Ub.append(Un)
        Vb.append(pending)
        n = Ub.n
        pending, S_last = next_right_block(
            op, Un, P - n, lambda X: orthonormalize_streamed(X, Vb, gen=gen), gen)
        last = pending is None or step == maxiter - 1
        if not last and n < next_check:
            if callback is not None:
                callback({"step": step, "basis": n, "checked": False,
                          "n_converged": history[-1]["n_converged"] if history else 0})
            continue
        next_check = n + max(bp, n // 10)
        sig, X, Y, ext, smax = bottom_triplets(band, k)
        X, Y, sig, ext = (t.to(dev, dt) for t in (X, Y, sig, ext))
        res = ext.clone()
        if S_last is not None:
            res = torch.hypot(res, (S_last @ X[-bp:, :]).norm(dim=0))
        res = res + band.dropped
        conv = res <= tol * smax
        fresh, done = None, False
        if n >= k and bool(conv.all()):
            values = [float(x) for x in sig]
            same = confirm is not None and values_unchanged(values, confirm["values"], tol, smax)
            ripe = same and step >= confirm["step"] + CONFIRM_STEPS
            if confirm is None or not same or ripe:
                if verify is not None:
                    fresh = verify(sig, Ub.combine(X), Vb.combine(Y), smax)
                    conv = fresh.max(dim=1).values <= tol * smax
                if bool(conv.all()):
                    if ripe or b >= k or pending is None or P - n - pending.shape[1] <= 0:
                        done = True
                    else:
                        pending, S_last = _inject(pending, S_last, Ub, Vb, b, P - n, gen)
                        confirm = {"step": step, "values": values}
        record_check(history, {"step": step, "basis": n, "sigma_max": smax,
                               "max_residual": float(res.max() / smax),
                               "n_converged": int(conv.sum()) if n >= k else 0,
                               "dropped": band.dropped / smax, "spilled": True},
                     fresh, confirm, smax, callback)
        log.debug("spilled GKL step %d: basis %d, %d/%d converged", step, n,
                  history[-1]["n_converged"], k)
        if done or pending is None or step == maxiter - 1:
            fresh_done = fresh if done else None
            break
    U, V = Ub.combine(X), Vb.combine(Y)
    if fresh_done is not None:
        return KrylovResult(S=sig, U=U, V=V, residuals=fresh_done, fresh=True,
                            history=tuple(history), smax=smax)
    return KrylovResult(S=sig, U=U, V=V, residuals=res, fresh=False, history=tuple(history),
                        smax=smax)


def _inject(pending, S_last, Ub, Vb, b, room, gen):
    """:func:`tjac.linalg.lanczos._inject` against the spilled V basis."""
    P = pending.shape[0]
    width = min(b, room - pending.shape[1])
    F = torch.randn(P, width, generator=gen, dtype=torch.float64).to(pending.device, pending.dtype)
    F, _, _ = orthonormalize_streamed(F, Vb, gen=gen)
    F, _, _ = orthonormalize(F, pending, gen=gen)
    S_new = None if S_last is None else torch.cat(
        [S_last, S_last.new_zeros((width, S_last.shape[1]))])
    return torch.cat([pending, F], 1), S_new
