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



@pytest.mark.parametrize("maxiter", [3, 4, 5])
def test_lanczos_whose_last_step_would_restart_returns_that_basis_triplets(maxiter):
    """maxiter ending on the step whose basis is full (block 8, max_basis 32: step 3) returns the
    Ritz triplets of that basis, not the restarted basis paired with the old Ritz coefficients (a
    shape error before); every reported residual is the triplet's own, from fresh products."""
    A, s, _, _ = j_shaped(300, seed=2)
    r = svd(DenseOperator(A), 4, which="top", method="lanczos", block=8, max_basis=32,
            maxiter=maxiter, tol=1e-14, raise_on_failure=False)
    assert r.U.shape == r.V.shape == (300, 4)
    torch.testing.assert_close((A @ r.V - r.U * r.S).norm(dim=0), r.residuals[:, 0],
                               rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(r.U.T @ r.U, torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-10)
    assert bool((r.S <= s[0] * (1 + 1e-12)).all())

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
    # the bottom: dense whenever it fits (P products in wide blocks, less memory than Lanczos)
    assert choose_method(9610, 32, "bottom", available_bytes=24 * 2**30) == "dense"
    from tjac.linalg import plan_solve

    # J fits but not its full SVD: the bottom from J's QR (tests/test_dense_bottom.py)
    assert plan_solve(9610, 32, "bottom", available_bytes=5 * 2**30).bottom_only
    assert not plan_solve(40_000, 32, "bottom", available_bytes=5 * 2**30, disk_bytes=2**29).fits
    # with room on disk, the basis spills (tests/test_spill.py)
    assert plan_solve(40_000, 32, "bottom", available_bytes=5 * 2**30, disk_bytes=2**37).spill


def test_plan_states_products_memory_and_time_and_refuses_what_cannot_fit(synth, monkeypatch):
    from tjac import _checks
    from tjac.linalg import plan_solve

    p = plan_solve(9610, 32, "bottom", available_bytes=24 * 2**30, seconds_per_product=0.01)
    assert p.method == "dense" and p.fits and p.estimate.products == 9610
    assert p.estimate.seconds == pytest.approx(96.1)
    assert [a.label() for a in p.alternatives] == ["dense (QR, bottom only)", "lanczos"]
    assert all(a.products > p.estimate.products for a in p.alternatives)  # Lanczos: 1.52 P
    assert "dense, ~9,610 products" in p.describe() and "GiB" in p.describe()
    big = plan_solve(100_000, 32, "bottom", available_bytes=24 * 2**30, disk_bytes=50 * 2**30)
    assert not big.fits and big.reason == "nothing fits in memory"
    assert plan_solve(100_000, 32, "bottom", available_bytes=24 * 2**30,
                      disk_bytes=200 * 2**30).spill  # ~100 GB of basis on disk, < 1 GB in RAM
    # svd refuses up front, with the estimate, before any product
    monkeypatch.setattr(_checks, "available_bytes", lambda device: 1_000_000)
    op = DenseOperator(synth[0])
    with pytest.raises(MemoryError, match=r"bottom-6 of P = 400 does not fit: .*dense \(QR, "
                                          r"bottom only\) ~0.00 GiB, dense ~0.01 GiB, lanczos "
                                          r"~0.01 GiB, lanczos \(basis spilled to disk\) .*; "
                                          r"0.00 GiB of memory available"):
        svd(op, 6, which="bottom")
    assert op.num_matvecs == 0
    # randomized's peak: five 400 x 143 arrays (13 passes of 11) and 16 400 x 11 blocks, ~3.3 MB
    with pytest.raises(MemoryError, match=r"needs 3,341,976 bytes; 1,000,000 bytes available"):
        svd(op, 3, which="top", method="randomized", tol=1e-6)
    assert op.num_matvecs == op.num_rmatvecs == 0
    monkeypatch.setattr(_checks, "available_bytes", lambda device: 4_000_000)
    r = svd(op, 3, which="top", method="randomized", tol=1e-6)
    assert r.plan["method"] == "randomized" and r.plan["fits"]


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


# -- the contract: exactly k certified triplets, or ConvergenceError ---------------------------------
def _with_spectrum(s, seed):
    g = torch.Generator().manual_seed(seed)
    P = s.numel()
    Q1, _ = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=torch.float64))
    Q2, _ = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=torch.float64))
    return Q1 @ torch.diag(s) @ Q2.T


@pytest.mark.parametrize("method", ["lanczos", "randomized"])
@pytest.mark.parametrize("bulk", ["identity", "four_large"])
def test_invariant_subspace_does_not_shorten_the_result(method, bulk):
    """Four large sigma and the rest exactly 1 (or the identity): the Krylov space closes after two
    steps of block 4. The solve must go on with fresh directions and return all k = 10."""
    P = 300
    s = torch.ones(P, dtype=torch.float64)
    if bulk == "four_large":
        s[:4] = torch.tensor([50.0, 20.0, 10.0, 5.0], dtype=torch.float64)
    r = svd(DenseOperator(_with_spectrum(s, 0)), 10, which="top", method=method, block=4)
    assert r.S.shape == (10,) and r.U.shape == (P, 10) and r.all_converged
    torch.testing.assert_close(r.S, s[:10], rtol=1e-10, atol=0)


@pytest.mark.parametrize("case", range(10))
def test_property_exactly_k_over_random_k_block_and_multiplicities(case):
    """Random k, block width and multiplicities (some larger than the block): never a short result,
    and every returned value within its certificate of the true one."""
    g = np.random.default_rng(case)
    P = int(g.integers(40, 120))
    b = int(g.integers(1, 7))
    values, mults = g.uniform(0.01, 20.0, size=int(g.integers(2, 8))), []
    for _ in values:
        mults.append(int(g.integers(1, 3 * b + 2)))
    s = np.concatenate([np.full(m, v) for v, m in zip(values, mults)])
    s = np.concatenate([s, g.uniform(0.001, 0.5, size=max(P - len(s), 0))])[:P]
    s = torch.from_numpy(np.sort(s)[::-1].copy())
    A = _with_spectrum(s, case)
    k = int(g.integers(1, min(P, 3 * b + 8)))
    for which, method in (("top", "lanczos"), ("top", "randomized"), ("bottom", "lanczos")):
        kw = dict(block=b)
        r = svd(DenseOperator(A), k, which=which, method=method, tol=1e-10, **kw)
        ref = s[:k] if which == "top" else s.flip(0)[:k]
        assert r.S.shape == (k,) and r.all_converged, (which, method, P, b, k)
        assert float((r.S - ref).abs().max()) <= float(r.certificate.max()) + 1e-12 * float(s[0]), \
            (which, method, P, b, k, r.S, ref)


def test_short_result_is_never_reported_as_success(synth):
    """A solve stopped early (maxiter) with fewer Ritz values than k: ConvergenceError names it, and
    the partial result says it is not converged."""
    A = synth[0]
    with pytest.raises(ConvergenceError, match=r"only 4 found") as e:
        svd(DenseOperator(A), 10, which="top", method="lanczos", block=2, maxiter=2)
    assert e.value.result.S.shape == (4,) and not e.value.result.all_converged
    r = svd(DenseOperator(A), 10, which="top", method="lanczos", block=2, maxiter=2,
            raise_on_failure=False)
    assert r.k == 10 and r.S.shape == (4,) and not r.all_converged


# -- tolerances that know the dtype ---------------------------------------------------------------
def test_default_tol_follows_the_dtype():
    from tjac.linalg import default_tol

    assert default_tol(torch.float64) == 1e-8
    assert default_tol(torch.float32) == pytest.approx(100 * torch.finfo(torch.float32).eps)


@pytest.mark.parametrize("method", ["lanczos", "randomized"])
def test_float32_operator_certifies_at_its_default_tol(method):
    A = j_shaped(200, seed=3)[0].float()
    r = svd(DenseOperator(A), 5, which="top", method=method)
    assert r.all_converged and r.tol == pytest.approx(1.19e-5, rel=0.01)
    assert r.floor is not None and r.floor < r.tol


def test_tol_below_the_round_off_floor_raises_at_once():
    from tjac.linalg import ToleranceError

    op = DenseOperator(j_shaped(200, seed=3)[0].float())
    with pytest.raises(ToleranceError, match=r"below what this float32 operator can certify.*"
                                             r"use tol >= .* or a float64 recipe"):
        svd(op, 5, which="top", method="lanczos", tol=1e-8)
    assert op.num_matvecs + op.num_rmatvecs <= 5  # the probe only: two replays, 3 + 2 columns


class _Noisy(DenseOperator):
    """Products with a round-off-like error of relative size `noise` (a fixed perturbation of A for
    J v and another one for J^T u): the Lanczos recurrence cannot see it, fresh residuals can."""

    def __init__(self, A, noise):
        super().__init__(A)
        g = torch.Generator().manual_seed(7)
        E1 = torch.randn(A.shape, generator=g, dtype=A.dtype)
        E2 = torch.randn(A.shape, generator=g, dtype=A.dtype)
        scale = noise * float(torch.linalg.matrix_norm(A, 2)) / A.shape[0] ** 0.5
        self.Af, self.Ab = A + scale * E1, A + scale * E2

    def matmat(self, X):
        self.num_matvecs += X.shape[1]
        return self.Af @ X

    def rmatmat(self, Y):
        self.num_rmatvecs += Y.shape[1]
        return self.Ab.T @ Y


def test_floor_probe_sees_an_inconsistent_operator_and_refuses_a_tol_below_it():
    """An operator whose J^T is off by 1e-7 relative: tol = 1e-9 is refused with the floor named
    (instead of iterating for nothing); tol = 1e-5 certifies."""
    from tjac.linalg import ToleranceError, roundoff_floor

    op = _Noisy(j_shaped(150, seed=4)[0], 1e-7)
    assert roundoff_floor(op)["floor"] > 1e-8
    with pytest.raises(ToleranceError, match="round-off floor"):
        svd(op, 4, which="top", method="lanczos", tol=1e-9)
    assert svd(op, 4, which="top", method="lanczos", tol=1e-5).all_converged


@pytest.mark.parametrize("kw, msg", [
    (dict(method="dense", block=4), "`block` does not apply to method='dense'"),
    (dict(method="dense", v0=torch.zeros(400, 2, dtype=torch.float64)), "`v0` does not apply"),
    (dict(method="dense", maxiter=3), "`maxiter` does not apply to method='dense'"),
    (dict(method="randomized", max_basis=64), "`max_basis` does not apply to method='randomized'"),
    (dict(method="randomized", checkpoint=object()), "`checkpoint` does not apply"),
    (dict(which="bottom", block=4), r"chosen by method='auto' for the bottom of P = 400"),
])
def test_arguments_a_method_does_not_use_are_refused(synth, kw, msg):
    with pytest.raises(ValueError, match=msg):
        svd(DenseOperator(synth[0]), 3, **kw)


@pytest.mark.parametrize("method", ["lanczos", "randomized"])
def test_float32_training_jacobian_certifies_at_the_default_tol(method):
    """A float32 training run: the default tol follows the dtype and certifies; float64's 1e-8 is
    refused at once with the floor (the old default never certified and said nothing)."""
    from tjac.linalg import ToleranceError

    op = tjac.TrainingJacobian(tjac.Recipe.paper(width=8, epochs=2, n_train=256, dtype="float32"))
    r = svd(op, 4, which="top", method=method)
    assert r.all_converged and r.S.dtype == torch.float32 and r.tol > 1e-6
    with pytest.raises(ToleranceError, match="float32 operator"):
        svd(op, 4, which="top", method=method, tol=1e-8)


@pytest.mark.slow
def test_paper_float32_top20_certifies_at_1e_5():
    op = tjac.TrainingJacobian(tjac.Recipe.paper(dtype="float32"))
    r = svd(op, 20, which="top", tol=1e-5)
    assert r.all_converged and r.S.shape == (20,)


def test_lanczos_resumed_from_any_saved_state_gives_identical_sigma(synth):
    """A resumed solve must not draw from its generator before continuing the saved one: with a
    block narrower than k the confirmation step injects random directions after the resume point
    (drawing a start block on resume once made those, and so sigma, differ in the last bits)."""
    import copy

    class Mem:
        def __init__(self, state=None):
            self.states, self.state = [], state

        def load(self):
            return copy.deepcopy(self.state)

        def save(self, st):
            self.states.append(copy.deepcopy(st))

    op = tjac.TrainingJacobian(tjac.Recipe.paper(width=4, epochs=1, n_train=64, batch_size=32),
                               backend="eager")
    m = Mem()
    ref = svd(op, 3, which="top", method="lanczos", block=2, tol=1e-8, checkpoint=m)
    assert any(st.get("confirm") for st in m.states)  # the solve goes through a confirmation
    for st in m.states[::2]:
        r = svd(op, 3, which="top", method="lanczos", block=2, tol=1e-8, checkpoint=Mem(st))
        assert torch.equal(r.S, ref.S), st["step"]


def test_values_unchanged_is_the_confirmation_rule():
    from tjac.linalg._base import values_unchanged

    assert values_unchanged([1.0, 2.0], [1.0 + 4e-8, 2.0], 1e-8, 1.0)
    assert not values_unchanged([1.0, 2.0], [1.0, 2.0 + 5e-8], 1e-8, 1.0)
    assert values_unchanged([10.0], [10.0 + 3e-7], 1e-8, 10.0)  # scaled by s_max
    assert not values_unchanged([1.0], None, 1e-8, 1.0)


def test_narrow_block_lanczos_keeps_the_triplets_it_certified_before_confirming(synth):
    """Block 1 < k: the wanted triplets certify (fresh products), fresh directions look for missed
    copies for CONFIRM_STEPS steps, and when the values have not moved the solve ends with the
    triplets certified then: one round of 2k fresh products, not two."""
    from tjac.linalg.lanczos import gkl

    A = synth[0]
    op = DenseOperator(A)
    calls = []

    def verify(S, U, V, smax):
        calls.append(S.clone())
        return torch.stack([(A @ V - U * S).norm(dim=0), (A.T @ U - V * S).norm(dim=0)], 1)

    r = gkl(op, 4, "top", tol=1e-10, maxiter=200, block=1, max_basis=200,
            gen=torch.Generator().manual_seed(0), verify=verify)
    assert len(calls) == 1 and r.fresh
    assert any(h.get("confirming_since") is not None for h in r.history)  # it did confirm
    assert torch.equal(r.S, calls[0])
    # the returned triplets are the certified ones: their residuals, recomputed here, are the stored
    fresh = verify(r.S, r.U, r.V, r.smax)
    assert torch.allclose(fresh, r.residuals, rtol=0, atol=1e-12 * r.smax)
    assert float(r.residuals.max()) <= 1e-10 * r.smax
    exact = torch.linalg.svdvals(A)[:4]
    assert torch.allclose(r.S, exact, rtol=1e-10)


def test_a_copy_found_while_confirming_is_certified_afresh():
    """A value of multiplicity 2 seen through a block of 1: the confirmation finds the copy, the
    values change, and the new set is certified by fresh products (not the stale first set)."""
    from tjac.linalg.lanczos import gkl

    gen = torch.Generator().manual_seed(3)
    P = 60
    Q1, _ = torch.linalg.qr(torch.randn(P, P, generator=gen, dtype=torch.float64))
    Q2, _ = torch.linalg.qr(torch.randn(P, P, generator=gen, dtype=torch.float64))
    s = torch.logspace(-12, -14, P, dtype=torch.float64)  # (converged at once: 1e-12 < tol)
    s[0] = s[1] = 10.0  # the top value twice: a block of 1 sees one copy
    s[2] = 5.0
    A = Q1 @ torch.diag(s) @ Q2.T
    calls = []

    def verify(S, U, V, smax):
        calls.append([round(float(x), 6) for x in S])
        return torch.stack([(A @ V - U * S).norm(dim=0), (A.T @ U - V * S).norm(dim=0)], 1)

    r = gkl(DenseOperator(A), 2, "top", tol=1e-10, maxiter=200, block=1, max_basis=200,
            gen=torch.Generator().manual_seed(0), verify=verify)
    assert torch.allclose(r.S, torch.tensor([10.0, 10.0], dtype=torch.float64), rtol=1e-10)
    assert calls[0] != [10.0, 10.0] and calls[-1] == [10.0, 10.0]  # the first set missed the copy
    assert r.fresh and float(r.residuals.max()) <= 1e-10 * r.smax


def test_auto_weighs_measured_replay_costs_for_the_top(monkeypatch):
    from tjac.linalg import plan as plan_mod
    from tjac.linalg import plan_solve

    # replays no cheaper per vector in blocks (a torch.func CNN): Lanczos at block 1
    cnn = {1: 0.207, 4: 0.169, 24: 0.431}
    p = plan_solve(105_962, 16, "top", vector_costs=cnn, replay_block=4)
    assert (p.method, p.estimate.block) == ("lanczos", 1)
    assert "block 1" in p.reason and [a.method for a in p.alternatives] == ["randomized"]
    assert p.estimate.products < p.alternatives[0].products
    # wide blocks much cheaper per vector (the fused MLP): randomized, as without costs
    fused = {1: 0.63, 4: 0.3, 8: 0.2, 16: 0.14, 32: 0.09}
    assert plan_solve(4810, 16, "top", vector_costs=fused, replay_block=32).method == "randomized"
    # a block given by the caller, no costs, or costs that do not cover randomized's width: as before
    assert plan_solve(105_962, 16, "top", vector_costs=cnn, replay_block=4,
                      block=24).method == "randomized"
    assert plan_solve(105_962, 16, "top").method == "randomized"
    # a predicted saving just below the margin keeps randomized, just above it takes Lanczos (the
    # 1e5 MLP's fused costs at blocks 8 and 32; single vectors priced around the margin)
    from tjac.linalg.plan import LANCZOS_TOP_MARGIN, LANCZOS_TOP_PRODUCTS
    even = 0.412 / (LANCZOS_TOP_MARGIN * LANCZOS_TOP_PRODUCTS[1])
    for c1, pick in ((1.02 * even, "randomized"), (0.98 * even, "lanczos")):
        mlp = {1: c1, 8: 0.412, 32: 0.394}
        assert plan_solve(112_810, 16, "top", vector_costs=mlp, replay_block=32).method == pick
    # an unmeasured width costs what the widest measured one below it does
    assert plan_solve(105_962, 16, "top", vector_costs={1: 0.2}, replay_block=32).method == \
        "lanczos"
    # (nothing measured at widths 1 and 2: block 4 where its share passes the margin, never 1)
    p4 = plan_solve(105_962, 16, "top", vector_costs={4: 0.2}, replay_block=32)
    passes = LANCZOS_TOP_MARGIN * LANCZOS_TOP_PRODUCTS[4] < 1
    assert (p4.method, p4.estimate.block) == (("lanczos", 4) if passes else ("randomized", None))
    # the block must not exceed k; the bottom ignores the costs
    narrow = plan_solve(105_962, 2, "top", vector_costs={1: 9.0, 2: 0.1, 4: 0.1}, replay_block=4)
    assert (narrow.method, narrow.estimate.block) == ("lanczos", 2)
    assert plan_solve(4810, 16, "bottom", vector_costs=cnn, replay_block=4).method == "dense"
    # where Lanczos' basis does not fit but randomized's blocks do, randomized is taken (with the
    # measured 13 passes randomized's blocks outgrow Lanczos' basis at k = 16: one pass makes it)
    monkeypatch.setattr(plan_mod, "RANDOMIZED_PASSES", 1)
    roomy = plan_solve(10**7, 16, "top", vector_costs=cnn, replay_block=4,
                       available_bytes=50 * 2**30)
    assert roomy.method == "randomized" and roomy.fits


def test_auto_over_ranks_costs_a_block_by_its_busiest_rank_and_never_leaves_ranks_idle():
    """Over N ranks a block of b vectors takes ceil(b/N) replays per rank: on the costs where one
    process takes single-vector Lanczos, two ranks take a block that keeps both busy."""
    from tjac.linalg import plan_solve

    cnn = {1: 0.207, 4: 0.169, 24: 0.431}
    alone = plan_solve(105_962, 16, "top", vector_costs=cnn, replay_block=4)
    assert (alone.method, alone.estimate.block) == ("lanczos", 1)
    two = plan_solve(105_962, 16, "top", vector_costs=cnn, replay_block=4, world_size=2)
    # block 2: one vector per rank at 0.207 s, 0.51 of randomized's products -> 0.053 s per vector;
    # randomized's 24 columns, 12 per rank at width 4: 0.169 * 12 / 24 = 0.085 (1.6x: over the
    # margin)
    assert (two.method, two.estimate.block) == ("lanczos", 2) and "over 2 ranks" in two.reason
    for world in (2, 3, 4, 8, 16):
        for costs in (cnn, {1: 0.2}, {1: 0.1, 2: 0.1, 4: 0.1, 8: 0.1, 32: 0.1}):
            p = plan_solve(105_962, 16, "top", vector_costs=costs, replay_block=4,
                           world_size=world)
            assert p.method == "randomized" or p.estimate.block >= world, (world, costs, p)
    # four ranks: block 4 would run one vector per rank (0.207 / 4 x 0.68 = 0.035 s per vector)
    # against randomized's 6 per rank (0.169 x 6 / 24 = 0.042): under the 1.5x margin, randomized
    assert plan_solve(105_962, 16, "top", vector_costs=cnn, replay_block=4,
                      world_size=4).method == "randomized"


def test_plan_lanczos_width_does_not_flip_on_noise():
    """Two Lanczos widths predicted within 20% of each other: the plan takes the narrower (fewer
    products) whichever measured a few percent cheaper (the autotuner's margin rule, tjac._prefer.prefer)."""
    from tjac.linalg import plan_solve

    for c1, c2 in ((1.0, 0.9), (1.0, 0.87)):  # 0.40 c1 against 0.46 c2: 0.414 vs 0.400
        costs = {1: c1, 2: c2, 4: 2.0, 16: 3.0}
        p = plan_solve(5000, 16, "top", vector_costs=costs, replay_block=128)
        assert (p.method, p.estimate.block) == ("lanczos", 1)
    # a width predicted 20% or more cheaper than the narrower one wins
    p = plan_solve(5000, 16, "top", vector_costs={1: 1.0, 2: 0.65, 4: 2.0, 16: 3.0},
                   replay_block=128)
    assert (p.method, p.estimate.block) == ("lanczos", 2)


def test_svd_auto_takes_single_vector_lanczos_when_the_operator_measured_it_cheaper():
    """The operator's own autotune measurements decide (here a tuning as a CNN's would read); the
    solve is then Lanczos at block 1 and agrees with the dense SVD."""
    op = tjac.TrainingJacobian(tjac.Recipe.paper(width=4, epochs=1, n_train=64, batch_size=32),
                               backend="eager")
    assert op.vector_costs() is None
    assert svd(op, 3, which="top", tol=1e-8).method == "randomized"
    op.apply_tuning({"backend": "eager", "block": 4,
                     "seconds_per_vector_step": {"eager": {"1": 0.2, "4": 0.17, "16": 0.4}}})
    assert op.vector_costs() == {1: 0.2, 4: 0.17, 16: 0.4}
    r = svd(op, 3, which="top", tol=1e-8)
    assert r.method == "lanczos" and r.plan["expected_block"] == 1 and r.all_converged
    exact = torch.linalg.svdvals(tjac.linalg.materialize(op))[:3]
    assert torch.allclose(r.S, exact, rtol=1e-8)
    # arguments whose meaning depends on the method keep the plan that ignores costs
    assert svd(op, 3, which="top", tol=1e-8, maxiter=40).method == "randomized"
    # costs measured for another backend are not this one's
    op.apply_tuning({"backend": "eager", "block": 4,
                     "seconds_per_vector_step": {"double-backward": {"1": 0.1, "4": 0.4}}})
    assert op.vector_costs() is None
    assert svd(op, 3, which="top", tol=1e-8).method == "randomized"


def test_lanczos_basis_appends_in_place_and_doubles_only_when_full():
    from tjac.linalg.lanczos import Basis
    gen = torch.Generator().manual_seed(0)
    P = 50
    b = Basis(P, torch.float64, torch.device("cpu"), limit=40, rows=4)
    blocks = [torch.randn(P, w, generator=gen, dtype=torch.float64) for w in (3, 1, 2, 5, 30)]
    ptrs, rows = [], []
    for X in blocks:
        b.append(X)
        ptrs.append(b._rows.data_ptr())
        rows.append(b._rows.shape[0])
    assert torch.equal(b.cols, torch.cat(blocks, 1))
    # doubles (4 -> 8 -> 16), then what is needed (41) once that is past both double and limit
    assert rows == [4, 4, 8, 16, 41]
    assert ptrs[0] == ptrs[1] and ptrs[1] != ptrs[2]  # 3 + 1 fit the 4 rows; 3 + 1 + 2 did not
    kept = b.cols @ torch.eye(41, 6, dtype=torch.float64)  # made from its own columns
    b.assign(kept)
    assert torch.equal(b.cols, torch.cat(blocks, 1)[:, :6]) and b.n == 6
    b.truncate(4)
    assert b.cols.shape == (P, 4)
