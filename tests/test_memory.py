"""Memory plans that hold: randomized's storage and stop against its budget, the refusal before any
product, and the measured per-step memory of a replay (:mod:`tjac.memory`)."""
import pytest
import torch

import tjac
from tjac.linalg import BudgetError, DenseOperator, DiagonalOperator, svd
from tjac.linalg.plan import HEADROOM, RANDOMIZED_PASSES, estimate
from tjac.linalg.randomized import peak_values, randomized
from tjac.memory import cpu_peak_bytes
from tjac.problem import memory_estimate


def flat(P, seed=0):
    """A flat spectrum (values within 1e-3 of 1): block Krylov needs many passes at tol 1e-10."""
    g = torch.Generator().manual_seed(seed)
    return DiagonalOperator(1 + 1e-3 * torch.rand(P, generator=g, dtype=torch.float64))


def test_plan_counts_randomized_peak():
    P, k, l = 5000, 8, 16
    e = estimate("randomized", P, k, "top", block=l)
    n = RANDOMIZED_PASSES * l  # the plan's passes, every live array
    assert e.bytes == 8 * peak_values(P, n, l)
    assert e.bytes >= 8 * 5 * P * n  # three bases, the Rayleigh-Ritz QR's Q factor and work


def test_flat_spectrum_stops_before_the_budget_with_the_partial_result():
    P, k, l = 2000, 4, 8
    op = flat(P)
    n = RANDOMIZED_PASSES + 2
    room = 8 * peak_values(P, n * l, l) + 1000  # the plan's passes fit, and n; not n + 1
    max_memory = int(room / HEADROOM) + 1
    room = int(HEADROOM * max_memory)
    with pytest.raises(BudgetError, match=rf"after {n} passes \(basis {n * l}\): the next pass needs "
                                          rf"[\d,]+ bytes but {room:,} are available") as e:
        svd(op, k, method="randomized", block=l, tol=1e-10, max_memory=max_memory)
    r = e.value.result
    assert r.S.shape == (k,) and not r.all_converged and isinstance(e.value, MemoryError)
    last = r.history[-1]
    assert len(r.history) == n and "stopped" in last and last["basis"] == n * l
    assert 8 * peak_values(P, n * l, l) <= room < 8 * peak_values(P, (n + 1) * l, l)
    # no pass beyond the budget ran: the start block, then per pass l VJPs and l JVPs
    assert op.num_matvecs == l + n * l and op.num_rmatvecs == n * l
    assert "\n" not in str(e.value)
    # the partial result is right as far as it goes: the top values of the flat spectrum
    top = op.d.sort(descending=True).values[:k]
    assert (r.S - top).abs().max() <= 1e-3 and bool((r.S <= top[0] + 1e-12).all())


_PEAK = """
import json, sys, torch
sys.path.insert(0, {tests!r})
from test_memory import flat
from tjac.linalg.randomized import randomized
from tjac.memory import cpu_peak_bytes
P, k, l, passes = {P}, {k}, {l}, {passes}
op, gen, out = flat(P), torch.Generator().manual_seed(0), {{}}
peak = cpu_peak_bytes(lambda: out.setdefault("r", randomized(
    op, k, tol=1e-14, maxiter=passes, block=l, gen=gen)))
print(json.dumps({{"peak": peak, "passes": len(out["r"].history)}}))
"""


def test_randomized_allocates_what_its_plan_counts():
    """The solve's resident peak (a diagonal operator: products allocate only their output) stays
    within the plan's count, and near it (the old per-pass concatenation and full SVD held ~9 P n).
    Measured in a fresh process: what earlier tests left in this one's heap moves its high-water
    mark."""
    import json
    import os
    import subprocess
    import sys

    P, k, l, passes = 40_000, 8, 16, RANDOMIZED_PASSES
    code = _PEAK.format(tests=os.path.dirname(__file__), P=P, k=k, l=l, passes=passes)
    out = json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                    text=True, timeout=600).stdout)
    peak = out["peak"]
    if peak is None:
        pytest.skip("no resident high-water mark here (not Linux/glibc)")
    assert out["passes"] == passes
    planned = estimate("randomized", P, k, "top", block=l).bytes
    assert 0.6 * planned <= peak <= 1.1 * planned, (peak, planned)


def test_refused_plan_names_bytes_before_any_product():
    A = torch.randn(300, 300, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    op = DenseOperator(A)
    with pytest.raises(MemoryError) as e:
        svd(op, 5, method="randomized", max_memory=500_000)
    msg = str(e.value)
    need = estimate("randomized", 300, 5, "top").bytes
    assert "\n" not in msg and f"(needs {need:,} bytes; 500,000 bytes available" in msg
    assert op.num_matvecs == op.num_rmatvecs == 0


@pytest.fixture(scope="module")
def small_cnn():
    return tjac.TrainingJacobian(tjac.Recipe.paper(
        model="tests.usermodels:bn_cnn", model_kwargs={"channels": 8, "p": 0.0},
        epochs=1, n_train=128))


def test_activation_is_measured_positive_and_grows_with_width(small_cnn):
    op = small_cnn
    before = memory_estimate(op.problem, block=64)
    est = op.measure_activation(widths=(2, 32))
    if est is None:
        pytest.skip("no peak memory reading here")
    assert est.bytes[0] > 0 and est.bytes[1] > est.bytes[0]
    assert est.per_vector > 0 and est.at(64) > est.at(32) > est.at(2) > 0
    assert op.problem.activation is est
    P, item = op.shape[0], 8
    # the estimate now holds the tangents plus the measured step instead of 2 more P x k arrays
    assert memory_estimate(op.problem, block=64) - before == est.at(64) - 2 * P * 64 * item
    assert op.num_matvecs == 0  # measuring is not a product


def test_cli_refuses_a_plan_that_cannot_fit_in_one_line_before_training(tmp_path, monkeypatch,
                                                                         capsys):
    from tjac import _checks, cli, trajectory

    def trained(*a, **kw):
        raise AssertionError("training started")

    monkeypatch.setattr(_checks, "available_bytes", lambda device: 3_500_000)
    monkeypatch.setattr(trajectory.Trajectory, "__init__", trained)
    store = tmp_path / "r.zarr"
    code = cli.main(["run", "--width", "8", "--epochs", "2", "--n-train", "256", "--k-top", "4",
                     "--k-bottom", "0", "--store", str(store)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err, err
    assert "top-4 of P = 610 does not fit" in err and "bytes available" in err
    assert f"(needs {estimate('randomized', 610, 4, 'top').bytes:,} bytes; 3,500,000" in err
    assert not store.exists()


def test_a_run_is_refused_once_the_measured_step_and_the_solver_no_longer_fit(tmp_path,
                                                                             monkeypatch):
    """Before training the plans fit, and after op.check() the trajectory and the measured step
    alone still fit (here a fixed 100 MiB, the measurement replaced); with the solver's bytes they
    do not: the solve is refused in one line before any of its products, nothing written."""
    import os

    from tjac import memory
    from tjac.runner import plans, run_analysis

    step = 100 * 2**20
    have = int((step + 3 * 2**20) / HEADROOM)  # the solver's plan here is ~5.6 MB

    def measured(*args, **kwargs):
        return memory.ActivationEstimate((2, 8), (step, step), step, 0, "test")

    monkeypatch.setattr(memory, "measure_activation", measured)
    monkeypatch.setattr(plans._checks, "available_bytes", lambda device: have)
    store = str(tmp_path / "s.zarr")
    recipe = tjac.Recipe.paper(width=4, epochs=1, n_train=128)
    with pytest.raises(MemoryError, match=rf"top-4 by .* needs [\d,]+ bytes once one replay "
                                          rf"step's memory is measured .* {have:,} bytes"):
        run_analysis(recipe, store, k_top=4, k_bottom=0, method="lanczos", block=4)
    assert not os.path.exists(store) or not tjac.query.open(store).runs()
    monkeypatch.setattr(plans._checks, "available_bytes", lambda device: have + 2**30)
    out = run_analysis(recipe, store, k_top=4, k_bottom=0, method="lanczos", block=4)
    assert len(tjac.query.open(store).run(out.run_id).sigma()) == 4
