"""Solvers on operators with prescribed, J-shaped spectra, compared through subspace projectors."""
import numpy as np
import pytest
import torch

import tjac
from tjac.linalg import ConvergenceError, DenseOperator, orthonormalize, svd

EPS = torch.finfo(torch.float64).eps


def j_shaped(P, seed=0, n_exact=None):
    """Non-normal (U != V) operator: a few sigma in [1e3, 1+1e-3], a bulk at 1 +- 1e-6 with exact
    ones, a tail down to 1e-8."""
    g = torch.Generator().manual_seed(seed)
    top = torch.logspace(3, np.log10(1 + 1e-3), 12, dtype=torch.float64)
    nb = int(0.6 * P)
    bulk = torch.ones(nb, dtype=torch.float64)
    jitter = torch.rand(nb, generator=g, dtype=torch.float64) * 2e-6 - 1e-6
    bulk[nb // 3:] += jitter[nb // 3:]  # a third exactly 1
    tail = torch.logspace(-2e-3, -8, P - 12 - nb, dtype=torch.float64)
    s = torch.cat([top, bulk, tail]).sort(descending=True).values
    Q1, _ = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=torch.float64))
    Q2, _ = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=torch.float64))
    return Q1 @ torch.diag(s) @ Q2.T, s, Q1, Q2


def projector_gap(A, B):
    """||A A^T - B B^T||_2 for orthonormal column sets: insensitive to signs and rotations."""
    return float(torch.linalg.matrix_norm(A @ A.T - B @ B.T, 2))


@pytest.fixture(scope="module")
def synth():
    return j_shaped(400)


@pytest.mark.parametrize("method", ["lanczos", "randomized", "dense"])
def test_top_k_matches_dense_svd(synth, method):
    A, s, Q1, Q2 = synth
    op = DenseOperator(A)
    r = svd(op, 8, which="top", method=method, tol=1e-10)
    assert r.all_converged and r.method == method
    torch.testing.assert_close(r.S, s[:8], rtol=1e-9, atol=0)
    assert projector_gap(r.V, Q2[:, :8]) < 1e-6 and projector_gap(r.U, Q1[:, :8]) < 1e-6
    # factorization invariants
    torch.testing.assert_close(r.V.T @ r.V, torch.eye(8, dtype=torch.float64), atol=1e-12, rtol=0)
    assert float((A @ r.V - r.U * r.S).norm()) <= 1e-10 * float(s[0]) * 8
    assert r.num_matvecs == op.num_matvecs and r.num_rmatvecs == op.num_rmatvecs


@pytest.mark.parametrize("method", ["lanczos", "dense"])
def test_bottom_k_certified(synth, method):
    A, s, Q1, Q2 = synth
    r = svd(DenseOperator(A), 6, which="bottom", method=method, tol=1e-12)
    assert r.all_converged
    ref = s.flip(0)[:6]
    assert float((r.S - ref).abs().max()) <= 1e-12 * float(s[0])
    assert bool((r.S[1:] >= r.S[:-1]).all())  # ascending
    # certificate bounds the error, from fresh products
    assert bool(((r.S - ref).abs() <= r.certificate + 1e-15).all())


def test_lanczos_thick_restart_still_finds_top():
    A, s, _, _ = j_shaped(300, seed=1)
    hist = []
    r = svd(DenseOperator(A), 4, which="top", method="lanczos", block=4, max_basis=24, tol=1e-10,
            callback=hist.append)
    assert r.all_converged
    torch.testing.assert_close(r.S, s[:4], rtol=1e-9, atol=0)
    assert max(h["basis"] for h in hist) <= 24 + 4


def test_orthonormalize_handles_breakdown():
    g = torch.Generator().manual_seed(0)
    basis, _, _ = orthonormalize(torch.randn(50, 5, generator=g, dtype=torch.float64))
    X = torch.cat([basis[:, :2] @ torch.randn(2, 2, generator=g, dtype=torch.float64),
                   torch.randn(50, 1, generator=g, dtype=torch.float64)], 1)
    Q, C, R = orthonormalize(X, basis, gen=g)
    full = torch.cat([basis, Q], 1)
    torch.testing.assert_close(full.T @ full, torch.eye(8, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(basis @ C + Q @ R, X, atol=1e-12, rtol=0)
    assert float(R[0, 0]) == 0.0 and float(R[1, 1]) == 0.0 and float(R[2, 2]) > 0


def test_non_convergence_raises_with_partial_result(synth):
    A, _, _, _ = synth
    with pytest.raises(ConvergenceError, match="did not certify") as e:
        svd(DenseOperator(A), 6, which="bottom", method="lanczos", maxiter=3, tol=1e-12)
    res = e.value.result
    assert res.S.shape == (6,) and not res.all_converged and res.num_matvecs > 0


@pytest.mark.parametrize("kw, msg", [
    (dict(k=0), "`k` must be an integer satisfying 0 < k <= 400"),
    (dict(k=401), "`k` must be an integer satisfying 0 < k <= 400"),
    (dict(k=2.5), "`k` must be an integer"),
    (dict(k=3, which="middle"), "unknown which 'middle'"),
    (dict(k=3, method="arpack"), "unknown method 'arpack'"),
    (dict(k=3, tol=0.0), "`tol` must be a positive number"),
    (dict(k=3, tol=-1e-3), "`tol` must be a positive number"),
    (dict(k=3, which="bottom", method="randomized"), "finds the top of the spectrum only"),
])
def test_bad_arguments(synth, kw, msg):
    with pytest.raises(ValueError, match=msg.replace("(", r"\(")):
        svd(DenseOperator(synth[0]), **kw)


def test_auto_picks_dense_for_bottom_of_small_and_randomized_for_top():
    from tjac.linalg import choose_method

    assert choose_method(4810, 32, "bottom") == "dense"
    assert choose_method(4810, 32, "top") == "randomized"
    assert choose_method(100_000, 32, "bottom") == "lanczos"


@pytest.fixture(scope="module")
def small_net():
    op = tjac.TrainingJacobian(tjac.Recipe.paper(width=8, epochs=2, n_train=256))
    J = tjac.linalg.materialize(op)
    return op, J


def test_real_operator_top_and_bottom_against_dense(small_net):
    op, J = small_net
    s = torch.linalg.svdvals(J)
    top = svd(op, 8, which="top", method="lanczos", tol=1e-10)
    torch.testing.assert_close(top.S, s[:8], rtol=1e-9, atol=0)
    bot = svd(op, 8, which="bottom", method="lanczos", tol=1e-10)
    assert float((bot.S - s.flip(0)[:8]).abs().max()) <= 1e-9 * float(s[0])
    rnd = svd(op, 4, which="top", method="randomized", tol=1e-10)
    torch.testing.assert_close(rnd.S, s[:4], rtol=1e-9, atol=0)


@pytest.mark.parametrize("solver", ["arpack", "propack", "lobpcg"])
def test_agrees_with_scipy_svds(small_net, solver):
    from scipy.sparse.linalg import svds

    op, J = small_net
    ours = svd(op, 5, which="top", method="lanczos", tol=1e-10).S.numpy()
    theirs = np.sort(svds(op.to_scipy(), k=5, solver=solver, random_state=0, return_singular_vectors=False,
                          maxiter=2000))[::-1]
    np.testing.assert_allclose(ours, theirs, rtol=1e-6 if solver == "lobpcg" else 1e-10)
