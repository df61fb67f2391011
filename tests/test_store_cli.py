"""Stores on disk and the CLI in real subprocesses: resume after SIGKILL, refusal of bad input."""
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import tjac
from tjac import store
from tjac.query import open as open_store

from conftest import tiny

TINY = ["--width", "8", "--epochs", "2", "--n-train", "256", "--k-top", "4", "--k-bottom", "4"]


def tjac_cli(*args, cwd=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "tjac", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)


def tree_digest(path):
    h = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for f in sorted(files):
            p = os.path.join(root, f)
            h.update(p.encode())
            h.update(open(p, "rb").read())
    return h.hexdigest()


@pytest.fixture(scope="module")
def dense_store(tmp_path_factory):
    d = tmp_path_factory.mktemp("dense")
    p = tjac_cli("run", *TINY, "--store", str(d / "r.zarr"), "--png", str(d / "f.png"))
    assert p.returncode == 0, p.stderr
    return d / "r.zarr", p.stdout


def test_run_writes_a_complete_readable_store(dense_store):
    path, out = dense_store
    assert "certified 4/4" in out and "structural prediction" in out
    res = open_store(path)
    (rid,) = res.runs()
    run = res.run(rid)
    assert run.status == "complete" and run.recipe == tjac.Recipe.paper(width=8, epochs=2, n_train=256)
    S = run.sigma("all")
    assert S.shape == (610,) and np.all(np.diff(S) <= 0)
    top, bot = run.top(4), run.bottom(2)
    np.testing.assert_array_equal(top.sigma, S[:4])
    np.testing.assert_array_equal(bot.sigma, S[::-1][:2])
    assert top.converged.all() and (top.residuals < 1e-8 * S[0]).all()
    u, v = run.vectors("top", 0)
    assert u.shape == (610,) and abs(np.linalg.norm(v) - 1) < 1e-12
    # the stored triplet is a singular triplet of the real operator
    op = tjac.TrainingJacobian(run.recipe)
    import torch
    Jv = op.matvec(torch.from_numpy(v)).numpy()
    assert np.linalg.norm(Jv - S[0] * u) < 1e-9 * S[0]
    reg = run.regions(1e-3)
    assert reg["complete"] and reg["chaotic"] + reg["bulk"] + reg["stable"] == 610
    assert run.summary["spectrum"]["numerically_one"] == run.summary["spectrum"]["structural"]["n_exact_singular"]
    prov = run.provenance
    assert {"torch", "numpy", "scipy", "zarr", "argv", "device", "seeds"} <= set(prov)
    assert run.alignment("top").shape == (4,)
    angles = run.compare(run, "top")
    assert np.allclose(angles, 0, atol=1e-6)


def test_store_reads_with_xarray(dense_store):
    xr = pytest.importorskip("xarray")
    path, _ = dense_store
    tree = xr.open_datatree(str(path), engine="zarr")
    rid = open_store(path).runs()[0]
    node = tree[f"runs/{rid}/solves/top"]
    assert node["u"].dims == ("triplet", "param") and node["sigma"].shape == (4,)


def test_cli_info_query_plot(dense_store, tmp_path):
    path, _ = dense_store
    p = tjac_cli("info", str(path), "--json")
    assert p.returncode == 0 and len(json.loads(p.stdout)["runs"]) == 1
    p = tjac_cli("query", str(path), "--top", "3", "--json")
    assert p.returncode == 0 and len(json.loads(p.stdout)["sigma"]) == 3
    p = tjac_cli("query", str(path), "--regions", "1e-3")
    assert p.returncode == 0 and "chaotic" in p.stdout
    p = tjac_cli("plot", str(path), "-o", str(tmp_path / "x.png"))
    assert p.returncode == 0 and (tmp_path / "x.png").stat().st_size > 10_000


@pytest.mark.parametrize("args, msg", [
    (["run", "--k-top", "0", "--k-bottom", "0"], "nothing to compute"),
    (["run", "--k-top", "-1"], "must be >= 0"),
    (["run", "--tol=-1e-3"], "must be a positive number"),
    (["run", "--tol", "-1e-3"], "--tol: must be a positive number, got -1e-3"),
    (["run", "--lr", "-.5"], "--lr: must be a positive number"),
    (["scale", "--eps", "-1e-2,1e-3"], "--eps must be a comma-separated list of positive numbers"),
    (["analyze", "/nonexistent.zarr", "--eps-grid", "-1e-3,1"], "--eps-grid must be a comma-separated"),
    (["query", "/nonexistent.zarr", "--regions", "-1e-3"], "--regions: must be a positive number"),
    (["run", "--optimizer", "lbfgs"], "--optimizer must be sgd, adam, adamw or an import path"),
    (["run", "--width", "0"], "must be >= 1"),
    (["run", "--bogus"], "unrecognized arguments"),
    (["run", "--width", "4", "--epochs", "1", "--store", "/proc/nope/r.zarr"], "not a writable directory"),
    (["run", "--config", "/nonexistent.toml"], "does not exist"),
    (["info", "/nonexistent/store.zarr"], "does not exist"),
    (["query", "/nonexistent.zarr", "--top", "0"], "must be >= 1"),
])
def test_cli_bad_input_one_line_exit_2(args, msg):
    p = tjac_cli(*args)
    assert p.returncode == 2, (p.returncode, p.stderr)
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and msg in err[0] and "Traceback" not in p.stderr


def test_existing_store_is_never_overwritten(dense_store):
    path, _ = dense_store
    before = tree_digest(path)
    p = tjac_cli("run", *TINY, "--store", str(path))
    assert p.returncode == 2 and "already complete" in p.stderr
    assert tree_digest(path) == before


def test_foreign_newer_and_corrupt_stores_are_refused_untouched(tmp_path, dense_store):
    import zarr

    foreign = tmp_path / "foreign.zarr"
    zarr.open_group(str(foreign), mode="w").attrs["x"] = 1
    newer = tmp_path / "newer.zarr"
    zarr.open_group(str(newer), mode="w").attrs["tjac_schema"] = store.SCHEMA + 1
    corrupt = tmp_path / "corrupt.zarr"
    os.makedirs(corrupt)
    (corrupt / "zarr.json").write_text("{not json")
    for path, msg in ((foreign, "not a tjac store"), (newer, "newer than this tjac"),
                      (corrupt, "corrupt")):
        before = tree_digest(path)
        for args in (["info", str(path)], ["run", *TINY, "--store", str(path)]):
            p = tjac_cli(*args)
            assert p.returncode == 2 and msg in p.stderr, (args, p.stderr)
        assert tree_digest(path) == before


def test_second_writer_is_refused(tmp_path):
    path = str(tmp_path / "w.zarr")
    with store.Writer(path):
        with pytest.raises(store.StoreError, match="being written by process"):
            store.Writer(path)
        # a subprocess is refused too
        p = tjac_cli("run", *TINY, "--store", path)
        assert p.returncode == 2 and "one writer at a time" in p.stderr
    store.Writer(path).close()  # released


def test_run_ids_cannot_escape_the_store(tmp_path):
    for bad in ("../x", "a/b", "..", "", "/abs"):
        with pytest.raises(store.StoreError, match="run id"):
            store.check_run_id(bad)


@pytest.mark.parametrize("method", ["dense", "lanczos"])
def test_sigkill_then_resume_gives_identical_sigma(tmp_path, method):
    # the backend is pinned: `auto` picks it by timing, so two *separate* runs may take different
    # (equally exact) arithmetic and differ in the last bit; a resume reuses its run's choice
    args = ["run", "--width", "8", "--epochs", "8", "--n-train", "256", "--k-top", "3",
            "--k-bottom", "6", "--method", method, "--block", "2", "--png", "none", "-q",
            "--backend", "eager"]
    ref = tmp_path / "ref.zarr"
    assert tjac_cli(*args, "--store", str(ref)).returncode == 0
    path = str(tmp_path / "killed.zarr")
    rng = random.Random(1 if method == "dense" else 2)
    kills_mid_run = 0
    for attempt in range(4):  # the first kill lands anywhere, the others once the run exists
        proc = subprocess.Popen([sys.executable, "-m", "tjac", *args, "--store", path, "--resume"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if attempt:
            deadline = time.time() + 120
            while not os.path.exists(os.path.join(path, "runs")) and proc.poll() is None \
                    and time.time() < deadline:
                time.sleep(0.05)
        time.sleep(rng.uniform(0.2, 1.5))
        if proc.poll() is not None:
            assert proc.returncode == 0, proc.stderr.read()
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills_mid_run += os.path.exists(os.path.join(path, "runs"))
    p = tjac_cli(*args, "--store", path, "--resume")  # finishes, or says it is complete
    assert p.returncode == 0, p.stderr
    assert kills_mid_run >= 1, "no kill landed inside a run: make the run longer"
    a, b = open_store(ref), open_store(path)
    ra, rb = a.run(a.runs()[0]), b.run(b.runs()[0])
    assert rb.status == "complete"
    for which in ("top", "bottom"):
        np.testing.assert_array_equal(ra.sigma(which), rb.sigma(which))
        assert len(rb.sigma(which)) == (3 if which == "top" else 6)
        assert rb.top(3).converged.all() and rb.bottom(6).converged.all()


def test_lanczos_checkpoint_missing_a_committed_array_is_refused(tmp_path):
    """A checkpoint whose committed state names an array that is not there (a store damaged
    outside tjac: a kill never removes one, :mod:`tjac.checkpoint`) is refused (the solve starts
    again) rather than crashing the resume (seen once in CI: `tjac: error: B`)."""
    from tjac.checkpoint import LanczosCheckpoint
    from tjac.linalg import svd

    op = tjac.TrainingJacobian(tiny(), backend="eager")
    with store.Writer(str(tmp_path / "s.zarr")) as w:
        run = w.create_run("r", recipe_json=op.recipe.to_json(), recipe_hash=op.recipe.hash(),
                           provenance={}, theta0=op.theta0.numpy(), thetaT=op.thetaT.numpy())
        g = w.state_group(run, "top")
        ckpt = LanczosCheckpoint(w, g, op)
        svd(op, 3, which="top", method="lanczos", tol=1e-10, block=2, raise_on_failure=False,
            checkpoint=ckpt)
        good = ckpt.load()
        assert good is not None and good["step"] == g.attrs["step"]
        del g[f"BT_{g.attrs['basis']}"]
        assert ckpt.load() is None


@pytest.mark.parametrize("script", ["quickstart.py", "query_store.py"])
def test_examples_run(script):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run([sys.executable, os.path.join(root, "examples", script)], capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    assert "sigma" in p.stdout


def test_bench_and_scale_commands(tmp_path):
    out = tmp_path / "b.json"
    p = tjac_cli("bench", "--width", "4", "--epochs", "1", "--blocks", "1,4", "--json", str(out))
    assert p.returncode == 0, p.stderr
    res = json.loads(out.read_text())
    assert set(res["results"]["block"]) == {"1", "4"} and res["results"]["adjoint_rel_error"] < 1e-12
    assert res["results"]["jvp_R"] > 0 and "torch" in res["environment"]
    assert res["results"]["backend"] == "fused" and set(res["results"]["backends"]) == {"fused"}
    assert res["results"]["floor_per_vector_R"] > 0 and res["results"]["R_torch_loop_seconds"] > 0
    p = tjac_cli("scale", "--widths", "4,6", "--epochs", "1", "--k-top", "3", "--k-bottom", "3",
                 "--store", str(tmp_path / "s.zarr"), "--json")
    assert p.returncode == 0, p.stderr
    rows = json.loads(p.stdout)["rows"]
    assert [r["P"] for r in rows] == [310, 460]
    assert all(r["exact_one"] == r["exact_one_predicted"] for r in rows)
    # the dense path (auto at this size) forms J in P / width replays, width <= 128
    assert all(r["replays"] >= -(-r["P"] // 128) and r["backend"] in ("eager", "fused", "compiled", "double-backward")
               for r in rows)
    assert set(open_store(tmp_path / "s.zarr").runs()) == {"mlp-w4-d1", "mlp-w6-d1"}
    out = json.loads(p.stdout)
    for r in rows:  # counts at each eps beside the exact ones (the dense path ran at this size)
        for e in ("0.01", "0.001"):
            b = r["counts"][e]["bulk"]
            assert b["exact"] is not None and b["lower"] <= b["exact"] <= b["upper"]
    assert {"bulk_0.01", "bulk_fraction_0.01", "sigma_max", "seconds"} <= set(out["fits"])
    sp = out["spread"]["bulk_0.01"]  # one seed per size: the mean is the count, no sd
    assert [(x["P"], x["n"]) for x in sp] == [(310, 1), (460, 1)]
    assert [x["mean"] for x in sp] == [r["counts"]["0.01"]["bulk"]["estimate"] for r in rows]
    p = tjac_cli("scale", "--widths", "4,x")
    assert p.returncode == 2 and "comma-separated list" in p.stderr
    p = tjac_cli("scale", "--widths", "4", "--eps", "0,1e-2")
    assert p.returncode == 2 and "--eps" in p.stderr and "Traceback" not in p.stderr
    p = tjac_cli("scale", "--widths", "4", "--reorth", "selective")
    assert p.returncode == 2 and "--reorth" in p.stderr and "Traceback" not in p.stderr


def test_recipe_too_large_for_memory_is_refused_up_front():
    from tjac.trajectory import Problem, check_fits, memory_estimate

    prob = Problem(tjac.Recipe.paper(width=8, epochs=1))
    small = memory_estimate(prob, checkpoint="all", block=8)
    assert memory_estimate(prob, checkpoint="sqrt", block=8) < small
    with pytest.raises(MemoryError, match=r"needs about .* GiB .* available"):
        check_fits(prob, checkpoint="all", block=10**9)
    p = tjac_cli("bench", "--width", "100000", "--depth", "4", "--epochs", "1")
    assert p.returncode == 2 and "GiB" in p.stderr and "Traceback" not in p.stderr


def test_run_from_toml_configs(tmp_path):
    cfg = tmp_path / "r.toml"
    cfg.write_text('width = 6\nepochs = 1\nn_train = 128\noptimizer = "adam"\n')
    p = tjac_cli("run", "--config", str(cfg), "--k-top", "2", "--k-bottom", "2", "--png", "none",
                 "--store", str(tmp_path / "a.zarr"))
    assert p.returncode == 0, p.stderr
    run = open_store(tmp_path / "a.zarr").run(open_store(tmp_path / "a.zarr").runs()[0])
    assert run.recipe == tjac.Recipe.paper(width=6, epochs=1, n_train=128, optimizer="adam")
    full = tmp_path / "full.toml"
    full.write_text('epochs = 1\n[model]\nhidden = [5]\n[data]\nn_train = 128\n[optim]\nname = "sgd"\nlr = 0.05\n')
    p = tjac_cli("run", "--config", str(full), "--k-top", "2", "--k-bottom", "0", "--png", "none",
                 "--store", str(tmp_path / "b.zarr"))
    assert p.returncode == 0, p.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("widht = 3\n")
    p = tjac_cli("run", "--config", str(bad), "--store", str(tmp_path / "c.zarr"))
    assert p.returncode == 2 and "unknown override" in p.stderr and not (tmp_path / "c.zarr").exists()
    bad.write_text("width = [\n")
    p = tjac_cli("run", "--config", str(bad), "--store", str(tmp_path / "c.zarr"))
    assert p.returncode == 2 and "not valid TOML" in p.stderr


# -- asking for more than a solve stored ------------------------------------------------------------
def test_more_than_the_solve_stored_comes_from_the_full_spectrum(dense_store, caplog):
    """The dense path stores all P sigma with their residuals: top(k) / bottom(k) past the solve's
    k_top = 4 return the k asked from it (certified, without vectors), and beyond P say so."""
    path, _ = dense_store
    res = open_store(path)
    run = res.run(res.runs()[0])
    S, R = run.sigma("all"), store.spectrum_residual(run._g)
    tol = run._solve("top")[4]["tol"]
    t = run.top(20)
    np.testing.assert_array_equal(t.sigma, S[:20])
    np.testing.assert_array_equal(t.certificate, np.hypot(R[:20, 0], R[:20, 1]))
    np.testing.assert_array_equal(t.converged, R[:20].max(1) <= tol * S[0])
    assert t.certified.all() and (t.n_vectors, t.n_requested, t.n_available) == (4, 20, 610)
    assert t.note == "" and t.n_missing == 0 and t.method == "dense"
    with caplog.at_level("WARNING", logger="tjac.query"):
        b = run.bottom(700)
    np.testing.assert_array_equal(b.sigma, S[::-1])
    np.testing.assert_array_equal(b.certificate, run.spectrum().certificate[::-1])
    assert (b.n_requested, b.n_available, b.n_missing, len(b.sigma)) == (700, 610, 90, 610)
    assert "700 bottom singular values asked, 610 known" in b.note
    assert b.note in caplog.text
    p = tjac_cli("query", str(path), "--top", "20", "--json")
    out = json.loads(p.stdout)
    assert p.returncode == 0 and out["sigma"] == S[:20].tolist()
    assert (out["n_requested"], out["n_available"], out["n_vectors"], out["note"]) == (20, 610, 4, None)
    p = tjac_cli("query", str(path), "--bottom", "700")
    assert p.returncode == 0 and len([ln for ln in p.stdout.splitlines() if ln[:4].strip().isdigit()]) == 610
    assert "note: 700 bottom singular values asked, 610 known" in p.stdout
    assert "rows 4..609: from the full spectrum, without singular vectors" in p.stdout


def _solve_only_store(path, values_only_spectrum):
    """A store with a Lanczos top-3 solve of the tiny recipe, and (optionally) the values of its
    full spectrum without residuals (what the dense path stores when only J's values fit)."""
    import torch

    from tjac.linalg import materialize, svd

    op = tjac.TrainingJacobian(tiny(), backend="eager")
    r = svd(op, 3, which="top", method="lanczos", tol=1e-10)
    S = torch.linalg.svdvals(materialize(op)).numpy()  # the dense oracle
    with store.Writer(path) as w:
        run = w.create_run("r", recipe_json=op.recipe.to_json(), recipe_hash=op.recipe.hash(),
                           provenance={}, theta0=op.theta0.numpy(), thetaT=op.thetaT.numpy())
        w.commit_solve(run, "top", sigma=r.S.numpy(), residual=r.residuals.numpy(),
                       U=r.U.T.numpy(), V=r.V.T.numpy(), method=r.method, tol=r.tol,
                       norm_estimate=r.norm_estimate, converged=r.converged.tolist())
        if values_only_spectrum:
            w.commit_spectrum(run, S, None)
    return r, S


def test_more_than_known_returns_what_is_known_and_says_so(tmp_path, caplog):
    path = str(tmp_path / "s.zarr")
    r, S = _solve_only_store(path, values_only_spectrum=False)
    run = open_store(path).run("r")
    with caplog.at_level("WARNING", logger="tjac.query"):
        t = run.top(10)
    np.testing.assert_array_equal(t.sigma, r.S.numpy())
    assert (t.n_requested, t.n_available, t.n_missing, t.n_vectors) == (10, 3, 7, 3)
    assert "10 top singular values asked, 3 known" in t.note and "no full spectrum" in t.note
    assert t.note in caplog.text
    assert run.top(2).note == "" and len(run.top(2).sigma) == 2
    p = tjac_cli("query", path, "--top", "10")
    assert p.returncode == 0 and "note: 10 top singular values asked, 3 known" in p.stdout
    p = tjac_cli("query", path, "--top", "10", "--json")
    out = json.loads(p.stdout)
    assert (out["n_requested"], out["n_available"], len(out["sigma"])) == (10, 3, 3)
    assert "3 known" in out["note"]


def test_values_only_spectrum_extends_with_the_round_off_certificate(tmp_path):
    path = str(tmp_path / "s.zarr")
    r, S = _solve_only_store(path, values_only_spectrum=True)
    run = open_store(path).run("r")
    P = len(S)
    t = run.top(10)
    np.testing.assert_array_equal(t.sigma[:3], r.S.numpy())  # the solve's rows, with vectors
    np.testing.assert_array_equal(t.sigma[3:], S[3:10])
    np.testing.assert_array_equal(t.certificate[:3], r.certificate.numpy())
    np.testing.assert_allclose(t.certificate[3:], P * np.finfo(np.float64).eps * S[0], rtol=0)
    assert np.isnan(t.residuals[3:]).all() and t.certified.all()
    assert (t.n_vectors, t.n_available, t.note, t.method) == (3, P, "", "lanczos+dense")
    b = run.bottom(5)  # no bottom solve: all from the spectrum
    np.testing.assert_array_equal(b.sigma, S[::-1][:5])
    assert b.n_vectors == 0 and b.method == "dense"
    with pytest.raises(KeyError, match="no committed bottom solve"):
        run.bottom()  # k=None: the solve's triplets, and there is none
    p = tjac_cli("query", path, "--top", "10", "--json")
    out = json.loads(p.stdout, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
    assert out["residuals"][3] == [None, None] and out["sigma"] == t.sigma.tolist()
    p = tjac_cli("query", path, "--top", "5")
    assert p.returncode == 0 and "rows 3..4: from the full spectrum" in p.stdout
    assert "values only" in p.stdout


# -- a reader that goes away (tjac ... | head) ---------------------------------------------------
def _closed_pipe_run(*args, close="stdout"):
    """Run the CLI with stdout (or stderr) a pipe whose reader has already gone."""
    r, w = os.pipe()
    os.close(r)
    try:
        streams = {"stdout": w, "stderr": subprocess.PIPE} if close == "stdout" else \
            {"stdout": subprocess.PIPE, "stderr": w}
        return subprocess.run([sys.executable, "-m", "tjac", *args], text=True, timeout=300,
                              **streams)
    finally:
        os.close(w)


def test_a_closed_stdout_pipe_is_quiet_and_the_store_complete(tmp_path, dense_store):
    path = str(tmp_path / "p.zarr")
    p = _closed_pipe_run("run", "--width", "4", "--epochs", "1", "--n-train", "128", "--k-top", "2",
                         "--k-bottom", "2", "--png", "none", "--store", path)
    assert p.returncode == 0 and p.stderr == "", p.stderr
    res = open_store(path)
    run = res.run(res.runs()[0])
    assert run.status == "complete" and len(run.top().sigma) == 2 and len(run.bottom().sigma) == 2
    p = _closed_pipe_run("query", str(dense_store[0]), "--bottom", "600")
    assert p.returncode == 0 and p.stderr == "", p.stderr
    p = _closed_pipe_run("query", str(dense_store[0]), "--top", "0", close="stderr")
    assert p.returncode == 2 and p.stdout == ""


def test_every_numeric_option_takes_a_negative_value_to_its_own_check():
    """`--opt -1e-3` reaches the option's type (its message, one line, exit 2) for every option of
    every subcommand: none answers argparse's "expected one argument"."""
    import argparse

    from tjac.cli import BadInput, build_parser

    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    base = {"info": ["s"], "query": ["s"], "plot": ["s", "-o", "x.png"], "analyze": ["s"]}
    checked = 0
    for cmd, sp in subs.items():
        for act in sp._actions:
            if not act.option_strings or act.nargs is not None and act.nargs != "?":
                continue
            if isinstance(act, (argparse._StoreTrueAction, argparse._CountAction, argparse._HelpAction)):
                continue
            opt = act.option_strings[-1]
            assert not re.match(r"^-\d", opt)  # no option looks like a number
            extra = [] if cmd != "query" or opt in ("--top", "--bottom", "--regions") else ["--density"]
            for value in ("-1e-3", "-.5", "-2,3", "-inf"):
                try:
                    ns = parser.parse_args([cmd, *base.get(cmd, []), *extra, opt, value])
                except BadInput as e:
                    assert "expected one argument" not in str(e), (cmd, opt, value, e)
                    assert len(str(e).splitlines()) == 1
                else:  # taken as a string (a path, a name): the value itself
                    got = getattr(ns, act.dest)
                    assert (got if isinstance(got, list) else [got]) == [value], (cmd, opt, value)
                checked += 1
    assert checked > 100
