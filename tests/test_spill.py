"""The bottom above the dense limit: the Lanczos basis spilled to disk and B's banded extraction,
against the in-RAM path and dense SVDs (oracles), with spilling forced by a tiny memory budget."""
import os

import numpy as np
import pytest
import torch

from tjac.linalg import DenseOperator, orthonormalize, plan_solve, svd
from tjac.linalg import decomp
from tjac.linalg import plan as plan_mod
from tjac.linalg.banded import BandedB, bottom_triplets
from tjac.linalg.lanczos import gkl
from tjac.linalg.spill import DiskBasis, orthonormalize_streamed

EPS = torch.finfo(torch.float64).eps
SPILL_BUDGET = 6_000_000  # bytes: the in-RAM bottom of P = 400 needs ~13 MB, the spilled ~2.5-4 MB


def operator(P, seed=0, n_null=0):
    """U != V; a few sigma up to 1e3, a bulk at 1, a tail to 1e-8, ``n_null`` exact zeros."""
    g = torch.Generator().manual_seed(seed)
    top = torch.logspace(3, 0.5, 10, dtype=torch.float64)
    nb = P // 2
    tail = torch.logspace(-1, -8, P - 10 - nb - n_null, dtype=torch.float64)
    s = torch.cat([top, torch.ones(nb, dtype=torch.float64), tail,
                   torch.zeros(n_null, dtype=torch.float64)]).sort(descending=True).values
    Q1, _ = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=torch.float64))
    Q2, _ = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=torch.float64))
    return Q1 @ torch.diag(s) @ Q2.T, s, Q1, Q2


def gap(A, B):
    return float(torch.linalg.matrix_norm(A @ A.T - B @ B.T, 2))


def lanczos_B(A, P, block=16):
    """The projected matrix of an in-RAM, unrestarted block GKL on A (full, with its round-off
    couplings), and the same B appended block column by block column to a BandedB."""
    states = []
    gkl(DenseOperator(A), 8, "bottom", tol=1e-10, maxiter=P, block=block, max_basis=P,
        gen=torch.Generator().manual_seed(0), on_step=states.append)
    B = states[-1]["B"]
    band, off = BandedB(), 0
    while off < B.shape[0]:
        w = min(block, B.shape[0] - off)
        band.append(B[:off, off:off + w], B[off:off + w, off:off + w])
        off += w
    return B, band


@pytest.mark.parametrize("n_null", [0, 12])
def test_banded_extraction_matches_dense_svd_of_B(n_null):
    A, _, _, _ = operator(400, n_null=n_null)
    B, band = lanczos_B(A, 400)
    assert band.n == B.shape[0] > 128  # the banded path, not the small dense fallback
    assert torch.equal(band.dense().triu(), band.dense())
    # what the band drops is the round-off of full reorthogonalization
    dropped = (B - band.dense()).norm()
    assert float(dropped) == pytest.approx(band.dropped, rel=1e-12)
    smax = float(torch.linalg.svdvals(B)[0])
    assert band.dropped < 1e-12 * smax
    S, X, Y, ext, s_est = bottom_triplets(band, 8)
    dense = torch.linalg.svdvals(B).flip(0)[:8]
    assert s_est == pytest.approx(smax, rel=1e-6)
    assert float((S - dense).abs().max()) <= 1e-13 * smax + band.dropped
    # the vectors are triplets of the full B, not only of its band
    assert float((B @ Y - X * S).norm(dim=0).max()) <= 1e-12 * smax
    assert float((B.T @ X - Y * S).norm(dim=0).max()) <= 1e-12 * smax
    assert float(ext.max()) <= 1e-12 * smax
    torch.testing.assert_close(X.T @ X, torch.eye(8, dtype=torch.float64), atol=1e-10, rtol=0)


def test_banded_extraction_of_an_exactly_singular_band():
    """Zeros on B's diagonal (breakdowns): lifted for the solves only, the zero values found."""
    g = torch.Generator().manual_seed(3)
    band = BandedB()
    for j in range(20):
        R = torch.randn(10, 10, generator=g, dtype=torch.float64).triu()
        if j in (4, 11):
            R[3, 3] = 0.0
            R[3, 4:] = 0.0
        C = torch.randn(10 * j, 10, generator=g, dtype=torch.float64).tril()
        band.append(C, R)
    B = band.dense()
    S, X, Y, ext, smax = bottom_triplets(band, 4)
    dense = torch.linalg.svdvals(B).flip(0)[:4]
    assert float(dense[:2].max()) < 1e-13 * smax  # the oracle: two exact zeros
    assert float((S - dense).abs().max()) <= 1e-12 * smax
    assert float((B @ Y - X * S).norm(dim=0).max()) <= 1e-11 * smax


def test_streamed_orthonormalization_against_a_basis_on_disk(tmp_path):
    P = 200
    g = torch.Generator().manual_seed(1)
    basis = DiskBasis(str(tmp_path / "U.bin"), P, torch.float64, chunk_bytes=7 * P * 8)  # 7 rows
    Q0, _ = torch.linalg.qr(torch.randn(P, 40, generator=g, dtype=torch.float64))
    basis.append(Q0[:, :16]), basis.append(Q0[:, 16:])
    assert basis.n == 40 and len(list(basis.chunks())) == 6
    X = torch.randn(P, 8, generator=g, dtype=torch.float64)
    X[:, 3] = Q0 @ torch.randn(40, generator=g, dtype=torch.float64)  # in the basis: breakdown
    Q, C, R = orthonormalize_streamed(X, basis, gen=g)
    torch.testing.assert_close(Q0 @ C + Q @ R, X, atol=1e-12, rtol=0)
    torch.testing.assert_close(Q.T @ Q, torch.eye(8, dtype=torch.float64), atol=1e-12, rtol=0)
    assert float((Q0.T @ Q).abs().max()) < 1e-12
    assert abs(float(R[3, 3])) < 1e-8 * float(X[:, 3].norm())
    # the in-RAM orthonormalization gives the same factors (up to round-off)
    Q2, C2, R2 = orthonormalize(X[:, :3], Q0)
    Qs, Cs, Rs = orthonormalize_streamed(X[:, :3], basis)
    torch.testing.assert_close(Qs @ Rs, Q2 @ R2, atol=1e-12, rtol=0)
    torch.testing.assert_close(Cs, C2, atol=1e-12, rtol=0)
    torch.testing.assert_close(basis.combine(C2), Q0 @ C2, atol=1e-13, rtol=0)
    basis.close()


@pytest.mark.parametrize("block", [16, 4])
def test_spilled_bottom_agrees_with_in_ram_and_the_truth(tmp_path, block):
    A, s, Q1, Q2 = operator(400, n_null=3)
    k = 8
    ram = svd(DenseOperator(A), k, which="bottom", method="lanczos", tol=1e-10, block=block)
    op = DenseOperator(A)
    spilled = svd(op, k, which="bottom", method="lanczos", tol=1e-10, block=block,
                  max_memory=SPILL_BUDGET, spill_dir=str(tmp_path))
    assert not ram.plan["spill"] and spilled.plan["spill"]
    assert "spilled to disk" in spilled.plan["reason"]
    assert spilled.all_converged and spilled.history[-1]["spilled"]
    smax = float(s[0])
    # The bottom 8 (three zeros, then 1e-8 to 1.4e-8) lie below tol * smax = 1e-7, the absolute
    # resolution of the certificates (r ~ 3e-8 here): which vectors of that near-null cluster the
    # Krylov space settles on depends on round-off (the CPU's kernels, the block), so neither the
    # sorted truth nor the other path is matched value by value (block 4 in RAM gave 1.3e-8 to
    # 5.7e-8 on one CPU, both paths ~1e-15 to 1.4e-8 on another). What each certifies: every value
    # has a true singular value within its certificate, and every certificate meets the tolerance.
    for res in (ram, spilled):
        assert res.all_converged and float(res.certificate.max()) <= 1e-10 * smax
        nearest = (res.S[:, None] - s[None, :]).abs().min(dim=1).values
        assert bool((nearest <= res.certificate + 1e-13 * smax).all()), (res.S, res.certificate)
    # the certificates are real: recomputed from A, and the vectors are orthonormal
    res = torch.stack([(A @ spilled.V - spilled.U * spilled.S).norm(dim=0),
                       (A.T @ spilled.U - spilled.V * spilled.S).norm(dim=0)], 1)
    torch.testing.assert_close(res, spilled.residuals, atol=1e-14 * smax, rtol=1e-6)
    eye = torch.eye(k, dtype=torch.float64)
    torch.testing.assert_close(spilled.V.T @ spilled.V, eye, atol=1e-10, rtol=0)
    torch.testing.assert_close(spilled.U.T @ spilled.U, eye, atol=1e-10, rtol=0)
    assert os.listdir(tmp_path) == []  # the spilled bases are removed when the solve ends


def test_spilled_solve_refuses_a_checkpoint_and_a_restart(tmp_path):
    A, _, _, _ = operator(400)

    class Ckpt:
        def load(self):
            return None

        def save(self, st):
            raise AssertionError("never saved")

    op = DenseOperator(A)
    with pytest.raises(ValueError, match="`checkpoint` does not apply when the Lanczos basis "
                                         "spills to disk"):
        svd(op, 4, which="bottom", method="lanczos", checkpoint=Ckpt(), max_memory=SPILL_BUDGET)
    with pytest.raises(ValueError, match="`max_basis` does not apply"):
        svd(op, 4, which="bottom", method="lanczos", max_basis=100, max_memory=SPILL_BUDGET)
    with pytest.raises(ValueError, match="`spill_dir` must be an existing directory"):
        svd(op, 4, which="bottom", method="lanczos", spill_dir=str(tmp_path / "nope"))
    assert op.num_matvecs == 0


def test_plan_spills_only_when_neither_dense_path_fits(monkeypatch):
    GiB = 2**30
    # P = 19,210 (the paper's recipe at width 256) on a 24 GiB machine: J fits, its full SVD not
    p = plan_solve(19210, 16, "bottom", available_bytes=24 * GiB, disk_bytes=70 * GiB)
    assert p.method == "dense" and p.bottom_only and not p.spill and p.fits
    # P = 60,000: not even J (27 GiB) fits; the Lanczos basis goes to disk
    p = plan_solve(60_000, 16, "bottom", available_bytes=24 * GiB, disk_bytes=200 * GiB)
    assert p.method == "lanczos" and p.spill and p.fits
    assert [a.label() for a in p.alternatives] == ["dense", "dense (QR, bottom only)", "lanczos"]
    assert all(a.bytes > 0.9 * 24 * GiB for a in p.alternatives)  # none fits in RAM
    assert p.estimate.bytes < 1 * GiB and 20 * GiB < p.estimate.disk_bytes < 100 * GiB
    assert "basis spilled to disk" in p.describe() and "GiB on disk" in p.describe()
    assert p.as_dict()["spill"] and p.as_dict()["expected_disk_bytes"] == p.estimate.disk_bytes
    # where the in-RAM paths fit, nothing changes
    assert not plan_solve(9610, 32, "bottom", available_bytes=24 * GiB, disk_bytes=70 * GiB).spill
    assert not plan_solve(19210, 16, "top", available_bytes=GiB // 4, disk_bytes=70 * GiB).spill
    # a full disk: nothing fits, and the refusal names each estimate
    full = plan_solve(60_000, 16, "bottom", available_bytes=24 * GiB, disk_bytes=GiB)
    assert not full.fits and full.reason == "nothing fits in memory"
    assert "basis spilled to disk" in full.refusal() and "1.0 GiB free on disk" in full.refusal()
    # svd refuses before any product
    A, _, _, _ = operator(400)
    op = DenseOperator(A)
    monkeypatch.setattr(decomp, "_disk_free", lambda d: 1000)
    monkeypatch.setattr(plan_mod, "DENSE_BOTTOM_FACTOR", 10**9)
    with pytest.raises(MemoryError, match=r"does not fit: .*lanczos \(basis spilled to disk\)"):
        svd(op, 8, which="bottom", max_memory=SPILL_BUDGET)
    assert op.num_matvecs == 0


def test_auto_spills_the_bottom_under_a_tiny_budget(tmp_path, monkeypatch):
    monkeypatch.setattr(plan_mod, "DENSE_BOTTOM_FACTOR", 10**9)  # (J itself does not fit either)
    A, s, _, _ = operator(400)
    r = svd(DenseOperator(A), 4, which="bottom", tol=1e-10, max_memory=SPILL_BUDGET,
            spill_dir=str(tmp_path))
    assert r.method == "lanczos" and r.plan["spill"] and r.all_converged
    assert float((r.S - s.flip(0)[:4]).abs().max()) <= float(r.certificate.max()) + 1e-13 * s[0]
    np.testing.assert_array_equal(os.listdir(tmp_path), [])


def test_a_killed_solves_spill_is_removed_by_the_next(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    from tjac.linalg.spill import _host

    host = _host()
    (tmp_path / f"tjac-spill-{dead}-{host}-abc").mkdir()
    (tmp_path / f"tjac-spill-{dead}-{host}-abc" / "U.bin").write_bytes(b"0" * 100)
    (tmp_path / f"tjac-spill-{os.getpid()}-{host}-live").mkdir()  # a live process's: kept
    (tmp_path / f"tjac-spill-{dead}-otherhost-abc").mkdir()       # another host's: kept
    (tmp_path / "tjac-spill-notapid").mkdir()                     # not ours: kept
    A, _, _, _ = operator(400)
    svd(DenseOperator(A), 4, which="bottom", method="lanczos", tol=1e-10,
        max_memory=SPILL_BUDGET, spill_dir=str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted([f"tjac-spill-{os.getpid()}-{host}-live",
                                                   f"tjac-spill-{dead}-otherhost-abc",
                                                   "tjac-spill-notapid"])
