"""The bottom from J's QR (tjac.linalg.dense.dense_bottom): ~P^2 memory where the full SVD does not
fit. Oracles: numpy's full SVD of planted spectra and of a real training Jacobian, residuals
recomputed from the matrix itself."""
import logging

import numpy as np
import pytest
import torch

import tjac
from tjac.linalg import DenseOperator, materialize, svd
from tjac.linalg import plan as plan_mod
from tjac.linalg.dense import dense_bottom, materialize_host

from conftest import tiny


def planted(P, s, seed=0):
    """U diag(s) V^T with Haar-random U != V (a non-normal matrix with singular values s)."""
    rng = np.random.default_rng(seed)
    U = np.linalg.qr(rng.standard_normal((P, P)))[0]
    V = np.linalg.qr(rng.standard_normal((P, P)))[0]
    return (U * s) @ V.T


def spectra(P, rng):
    return {
        # the training Jacobian's bottom: a near-null cluster at round-off, a tail, a bulk at 1
        "near-null": np.r_[10 ** rng.uniform(-17, -9, 20), 1 + 1e-6 * rng.standard_normal(P // 2),
                           np.geomspace(1e-3, 20, P - 20 - P // 2)],
        "exact zeros": np.r_[np.zeros(3), np.geomspace(1e-8, 10, P - 3)],
        # a cluster of 40 wider than the first block (2k = 32): the block must grow
        "wide cluster": np.r_[1e-3 * (1 + 1e-3 * rng.standard_normal(40)),
                              np.linspace(0.5, 3, P - 40)],
        "no gap": np.linspace(0.5, 1, P),
    }


@pytest.mark.parametrize("name", ["near-null", "exact zeros", "wide cluster", "no gap"])
def test_bottom_of_planted_spectra_against_the_full_svd(name):
    P, k = 300, 16
    s = spectra(P, np.random.default_rng(1))[name]
    A = planted(P, s)
    truth = np.linalg.svd(A, compute_uv=False)[::-1]
    smax = truth[-1]
    J = np.asfortranarray(A.copy())
    S, U, V, est, info = dense_bottom(J, k, tol=1e-10)
    assert not np.array_equal(J, A)  # factorized in place: no P x P copy
    assert est <= smax * (1 + 1e-12) and est >= 0.9 * smax  # a lower bound of ||J||
    assert np.all(np.diff(S) >= 0) and S.shape == (k,)
    np.testing.assert_allclose(S, truth[:k], rtol=0, atol=1e-12 * smax)
    # both residuals, recomputed from A, certify every triplet (also the round-off ones)
    res = np.maximum(np.linalg.norm(A @ V - U * S, axis=0), np.linalg.norm(A.T @ U - V * S, axis=0))
    assert res.max() <= 1e-10 * smax, (res.max() / smax, info)
    np.testing.assert_allclose(U.T @ U, np.eye(k), atol=1e-10)
    np.testing.assert_allclose(V.T @ V, np.eye(k), atol=1e-10)
    if name == "wide cluster":
        assert info["block"] > 2 * k  # (the first block of 32 sits inside the cluster of 40)
    if name == "exact zeros":
        assert info["patched"] >= 3  # zero pivots lifted for the solves only


def test_row_major_and_float32_input():
    P, k = 200, 4
    A = planted(P, np.geomspace(1e-6, 10, P), seed=3)
    truth = np.linalg.svd(A, compute_uv=False)[::-1][:k]
    S, U, V, _, _ = dense_bottom(A.copy(), k, tol=1e-10)  # C-ordered: factorized through a copy
    np.testing.assert_allclose(S, truth, rtol=0, atol=1e-12 * 10)
    S32, U32, V32, _, _ = dense_bottom(np.asfortranarray(A.astype(np.float32)), k, tol=1e-5)
    assert S32.dtype == U32.dtype == V32.dtype == np.float32  # no silent change of dtype
    np.testing.assert_allclose(S32, truth, rtol=0, atol=1e-5 * 10)
    with pytest.raises(ValueError, match="square"):
        dense_bottom(np.zeros((3, 4)), 1)
    with pytest.raises(ValueError, match="k must be in 1..3"):
        dense_bottom(np.zeros((3, 3)), 4)


@pytest.fixture(scope="module")
def small():
    op = tjac.TrainingJacobian(tjac.Problem(tiny(width=8)))
    J = materialize(op)
    return op, J


def test_svd_takes_the_bottom_from_qr_when_the_full_svd_does_not_fit(small):
    op, J = small
    P, k = op.shape[0], 6
    full = svd(op, k, which="bottom", method="dense", tol=1e-10)
    assert not full.plan["bottom_only"]
    budget = int(3 * P * P * 8)  # J (and a few P x b blocks) fits, the full SVD (8 P^2) not
    n0 = op.num_matvecs
    r = svd(op, k, which="bottom", tol=1e-10, max_memory=budget)
    assert r.method == "dense" and r.plan["bottom_only"] and r.plan["fits"]
    assert "from J's QR" in r.plan["reason"]
    assert r.num_matvecs == P + k and r.num_rmatvecs == k  # J, then fresh certificates
    assert op.num_matvecs - n0 == P + k
    assert r.all_converged
    smax = float(torch.linalg.matrix_norm(J, 2))
    truth = torch.linalg.svdvals(J).flip(0)[:k]
    torch.testing.assert_close(r.S, truth, atol=1e-13 * smax, rtol=0)
    torch.testing.assert_close(r.S, full.S, atol=1e-13 * smax, rtol=0)
    res = torch.stack([(J @ r.V - r.U * r.S).norm(dim=0), (J.T @ r.U - r.V * r.S).norm(dim=0)], 1)
    assert float(res.max()) <= 1e-10 * smax
    # asked for by name: the same fallback; a budget below J itself refuses before any product
    assert svd(op, k, which="bottom", method="dense", tol=1e-10,
               max_memory=budget).plan["bottom_only"]
    n0 = op.num_matvecs
    with pytest.raises(MemoryError, match=r"dense \(QR, bottom only\)"):
        svd(op, k, which="bottom", method="dense", max_memory=P * P * 4)
    assert op.num_matvecs == n0
    # the host copy of J is J
    torch.testing.assert_close(torch.from_numpy(materialize_host(op)), J, atol=0, rtol=0)


def test_runner_bottom_from_qr_keeps_the_top_on_its_own_plan(tmp_path, monkeypatch, caplog, small):
    from tjac import runner

    _, J = small
    monkeypatch.setattr(plan_mod, "DENSE_FACTOR", 10**9)  # the full SVD never fits
    caplog.set_level(logging.INFO)
    out = runner.run_analysis(tiny(width=8), str(tmp_path / "r.zarr"), k_top=4, k_bottom=5,
                              tol=1e-10)
    run = tjac.open(str(tmp_path / "r.zarr")).run(out.run_id)
    assert run.provenance["plans"]["bottom"]["bottom_only"]
    assert any("from J's QR" in r.getMessage() for r in caplog.records)
    smax = float(torch.linalg.matrix_norm(J, 2))
    s = torch.linalg.svdvals(J)
    bottom, top = run.bottom(), run.top()
    # the top's own plan: a Krylov method (which one weighs the run's timing-based autotune)
    assert bottom.method == "dense" and top.method in ("randomized", "lanczos")
    assert run.provenance["plans"]["top"]["method"] == top.method
    assert bool(bottom.converged.all()) and bool(top.converged.all())
    torch.testing.assert_close(torch.as_tensor(bottom.sigma), s.flip(0)[:5], atol=1e-13 * smax,
                               rtol=0)
    torch.testing.assert_close(torch.as_tensor(top.sigma), s[:4], atol=1e-9 * smax, rtol=0)
    assert "state" not in run._g or "dense" not in run._g["state"]  # the columns are dropped
    # every sigma from a values-only SVD of a copy of J, with the round-off bound as certificate
    spec = run.spectrum()
    assert spec.sigma.shape == (J.shape[0],) and spec.source.startswith("round-off bound")
    torch.testing.assert_close(torch.as_tensor(spec.sigma), s, atol=1e-13 * smax, rtol=0)
    reg = run.regions(1e-3)
    exact = int(((s - 1).abs() <= 1e-3).sum())
    assert reg["bulk_min"] <= exact <= reg["bulk_max"]
    assert reg["unknown"] == 0


def test_no_copy_of_J_at_the_peak():
    """The factorization works in place: numpy's traced allocations above J stay a small share of
    P^2 (a workspace query that copied J once made the peak 2 P^2 at P = 19,210)."""
    import tracemalloc

    P = 1200
    J = np.asfortranarray(planted(P, np.geomspace(1e-12, 10, P), seed=4))
    tracemalloc.start()
    try:
        dense_bottom(J, 8, tol=1e-8)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak / (8 * P * P) < 0.3, peak / (8 * P * P)


def test_runner_bottom_from_qr_in_float32(tmp_path, monkeypatch):
    """J is read from the store's float64 columns into a float32 column-major array (the plan's
    P^2 values of the operator's dtype) and the bottom certifies at float32's default tol."""
    from tjac import runner

    monkeypatch.setattr(plan_mod, "DENSE_FACTOR", 10**9)
    r = tiny(width=8, dtype="float32")
    out = runner.run_analysis(r, str(tmp_path / "r.zarr"), k_top=0, k_bottom=4)
    run = tjac.open(str(tmp_path / "r.zarr")).run(out.run_id)
    assert run.provenance["plans"]["bottom"]["bottom_only"]
    J = materialize(tjac.TrainingJacobian(tjac.Problem(r))).double()
    s = torch.linalg.svdvals(J)
    b = run.bottom()
    from tjac import store

    assert bool(b.converged.all()) and store.solve_arrays(run._g, "bottom")[2].dtype == np.float32
    torch.testing.assert_close(torch.as_tensor(b.sigma, dtype=torch.float64), s.flip(0)[:4],
                               atol=1e-5 * float(s[0]), rtol=0)


def test_the_qr_path_is_planned_against_host_memory():
    """J's QR runs on the host: on a GPU operator its memory is the host's, not the device's."""
    from tjac.linalg import plan_solve

    GiB = 2**30
    small_gpu = plan_solve(19210, 16, "bottom", available_bytes=2 * GiB, host_bytes=24 * GiB,
                           disk_bytes=100 * GiB)
    assert small_gpu.bottom_only and small_gpu.fits
    small_host = plan_solve(19210, 16, "bottom", available_bytes=100 * GiB, host_bytes=GiB,
                            disk_bytes=100 * GiB)
    assert not small_host.bottom_only and small_host.method == "dense"  # the full path fits
    # on the CPU the host is the device: the trajectory's reserve counts against J too
    cpu = plan_solve(19210, 16, "bottom", available_bytes=4 * GiB, reserved_bytes=2 * GiB,
                     disk_bytes=100 * GiB)
    assert not cpu.bottom_only and cpu.spill
