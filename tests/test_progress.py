"""Progress of long solves (lines every ~30 s, or a bar), the run's dtype-aware default tol, and the
runner's spilled bottom."""
import io
import logging
import re

import pytest
import torch

import tjac
from tjac.cli import main
from tjac.linalg import DenseOperator, Progress, default_tol, svd
from tjac.linalg import plan as plan_mod
from tjac.linalg import progress as progress_mod

from conftest import tiny

TINY = ["--width", "4", "--epochs", "2", "--n-train", "128", "--batch-size", "32"]


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_lines_every_interval_with_rate_and_time_left():
    clock, lines = Clock(), []
    p = Progress("bottom-16 lanczos", k=16, expected_products=24_000, clock=clock,
                 emit=lines.append)
    for t, products, basis, cert in [(10, 320, 160, 0), (29.9, 900, 450, 0), (31, 1024, 512, 2),
                                     (45, 1500, 750, 2), (62, 2048, 1024, 3)]:
        clock.t = 100.0 + t
        p({"step": 0, "basis": basis, "n_converged": cert, "products": products})
    assert len(lines) == 2  # at 31 s and 62 s, not in between
    rate = 62 / 2048
    left_min = (24_000 - 2048) * rate / 60
    assert lines[1] == (f"bottom-16 lanczos: basis 1,024, 3/16 certified, 2,048 of ~24,000 "
                        f"products, {rate:.3g} s/product, ~{left_min:.0f} min left")
    assert lines[0].startswith("bottom-16 lanczos: basis 512, 2/16 certified, 1,024 of ~24,000")
    # past the plan's estimate: no negative time left
    clock.t += 40
    p({"basis": 20_000, "n_converged": 5, "products": 30_000})
    assert lines[-1].endswith("past the plan's expected products")


def test_expected_products_come_from_the_callback_and_a_bar_replaces_the_lines():
    from tqdm import tqdm

    buf, lines = io.StringIO(), []
    bars = []

    def factory(**kw):
        bars.append(tqdm(file=buf, mininterval=0, **kw))
        return bars[-1]

    clock = Clock()
    p = Progress("top-8 randomized", k=8, clock=clock, emit=lines.append, bar=factory, interval=0)
    for i in range(1, 4):
        clock.t += 5
        p({"basis": 16 * i, "n_converged": i, "products": 32 * i, "expected_products": 200})
    assert not lines and bars[0].total == 200 and bars[0].n == 96
    p.close()
    out = buf.getvalue()
    assert "top-8 randomized" in out and "96/200" in out and "certified=3/8" in out


def test_svd_hands_progress_its_products_and_the_plan():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(300, 300, generator=g, dtype=torch.float64)
    seen = []
    p = Progress("bottom-4 lanczos", k=4, interval=0, emit=seen.append)
    r = svd(DenseOperator(A), 4, which="bottom", method="lanczos", tol=1e-10, callback=p)
    assert p.expected == r.plan["expected_products"]
    counts = [int(re.search(r"([\d,]+) of ~", s).group(1).replace(",", "")) for s in seen]
    assert counts == sorted(counts) and 0 < counts[-1] <= r.num_matvecs + r.num_rmatvecs
    assert all("certified" in s and "basis" in s for s in seen)


def test_run_verbose_prints_plans_and_progress(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(progress_mod, "INTERVAL", 0.0)  # a line after every step
    caplog.set_level(logging.INFO)
    rc = main(["run", "-v", *TINY, "--k-top", "0", "--k-bottom", "3", "--method", "lanczos",
               "--store", str(tmp_path / "r.zarr"), "--png", "none"])
    assert rc == 0
    msgs = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("plan bottom-3: lanczos, ~") and "products" in m for m in msgs)
    prog = [m for m in msgs if m.startswith("bottom-3 lanczos: basis ")]
    assert prog and all(re.search(r"\d/3 certified, [\d,]+ of ~[\d,]+ products", m) for m in prog)


def test_run_float32_takes_the_dtype_default_tol(tmp_path, capsys):
    """Before: the run's default tol 1e-8 raised ToleranceError on every float32 recipe."""
    store = str(tmp_path / "r.zarr")
    rc = main(["run", *TINY, "--dtype", "float32", "--k-top", "3", "--k-bottom", "0",
               "--method", "randomized", "--store", store, "--png", "none"])
    assert rc == 0, capsys.readouterr().err
    run = tjac.open(store).run(tjac.open(store).runs()[0])
    assert run.summary["tol"] == pytest.approx(default_tol(torch.float32)) == 100 * 2**-23
    # asked explicitly, 1e-8 is refused in one line naming the floor (exit 2)
    rc = main(["run", *TINY, "--dtype", "float32", "--k-top", "3", "--k-bottom", "0",
               "--method", "randomized", "--tol", "1e-8", "--store", str(tmp_path / "s.zarr"),
               "--png", "none"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "round-off floor" in err[0]


def test_runner_spills_the_bottom_when_nothing_else_fits(tmp_path, monkeypatch, caplog):
    """The plan's in-RAM estimates inflated past the machine: the bottom runs spilled, next to the
    store, without a checkpoint, and agrees with the dense SVD of the formed J."""
    from tjac import runner

    monkeypatch.setattr(plan_mod, "DENSE_FACTOR", 10**9)
    monkeypatch.setattr(plan_mod, "DENSE_BOTTOM_FACTOR", 10**9)
    monkeypatch.setattr(plan_mod, "LANCZOS_BOTTOM_FACTOR", 10**9)
    caplog.set_level(logging.INFO)
    out = runner.run_analysis(tiny(), str(tmp_path / "r.zarr"), k_top=0, k_bottom=3)
    bottom = tjac.open(str(tmp_path / "r.zarr")).run(out.run_id)
    assert any("spills to disk beside the store" in r.getMessage() for r in caplog.records)
    prov = bottom.provenance["plans"]["bottom"]
    assert prov["spill"] and prov["expected_disk_bytes"] > 0
    op = tjac.TrainingJacobian(tjac.Problem(tiny()))
    s = torch.linalg.svdvals(tjac.linalg.materialize(op)).flip(0)[:3]
    t = bottom.bottom()
    assert t.sigma.shape == (3,) and bool(t.converged.all())
    assert bool(((torch.as_tensor(t.sigma) - s).abs() <= torch.as_tensor(t.certificate)
                 + 1e-14 * float(torch.linalg.svdvals(tjac.linalg.materialize(op))[0])).all())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.zarr"]  # the spill is gone


def test_promised_products_equal_the_products_used_on_small_operators():
    """The plan's product count is what the method uses where it is fixed (dense: P; randomized
    until its basis fills: l + 2P, not P), and otherwise bounded by ``max_products``, the number
    the progress lines fall back on once past the estimate."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(100, 100, generator=g, dtype=torch.float64)
    seen = []
    r = svd(DenseOperator(A), 16, which="top", tol=1e-10,
            callback=Progress("top-16", k=16, interval=0, emit=seen.append))
    assert r.method == "randomized" and r.all_converged
    used = r.num_matvecs + r.num_rmatvecs
    assert r.plan["expected_products"] == used == 24 + 2 * 100  # l to start, 2 l a pass, to P
    assert f"{used:,} of ~{used:,} products" in seen[-1]
    d = svd(DenseOperator(A), 4, which="top", method="dense")
    assert d.plan["expected_products"] == d.num_matvecs + d.num_rmatvecs == 100
    # a training Jacobian: the estimate (12 passes) may be passed, the bound may not
    op = tjac.TrainingJacobian(tiny(), backend="eager")
    t = svd(op, 16, which="top", tol=1e-8)
    assert t.method == "randomized" and t.all_converged
    assert t.num_matvecs + t.num_rmatvecs <= t.plan["expected_max_products"]


def test_past_the_estimate_the_time_left_comes_from_the_bound():
    clock, lines = Clock(), []
    p = Progress("top-16 randomized", k=16, expected_products=600, max_products=1464,
                 clock=clock, emit=lines.append, interval=0)
    clock.t += 70
    p({"basis": 336, "n_converged": 10, "products": 700})
    rate = 70 / 700
    assert lines[-1].endswith(f"past the plan's ~600, at most 1,464: <= "
                              f"{(1464 - 700) * rate:.0f} s left")
