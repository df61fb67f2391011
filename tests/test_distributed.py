"""Products, solves, the dense path and sweeps over real 2-process gloo groups, launched the way
torchrun launches them (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT per process), against
the serial run; faults, mismatched ranks and bad input."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

import tjac
from tjac import store

TINY = ["--width", "6", "--epochs", "1", "--n-train", "128", "--png", "none",
        "--backend", "fused"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(rank, world, port, **extra):
    env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    env.pop("PYTEST_XDIST_WORKER", None)
    env.update(extra)
    return env


def _start(cmds, cwd, port=None):
    """One process per rank; ``cmds[r]`` is rank r's argv."""
    port = port or _port()
    return [subprocess.Popen(c, cwd=cwd, env=_env(r, len(cmds), port), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for r, c in enumerate(cmds)]


def _finish(procs, timeout=300):
    out = []
    try:
        for p in procs:
            o, e = p.communicate(timeout=timeout)
            out.append((p.returncode, o, e))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return out


def _tjac(*args):
    return [sys.executable, "-m", "tjac", *args]


def _serial(args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    r = subprocess.run(_tjac(*args), cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    return r


API = textwrap.dedent("""
    import sys, numpy as np, torch, tjac
    from tjac import distributed as td
    torch.set_num_threads(1)
    g = td.init(required=True)
    op = tjac.TrainingJacobian(tjac.Recipe.paper(width=6, epochs=1, n_train=128), backend="fused")
    def fn(J):
        V = torch.randn(J.shape[0], 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        top = tjac.svd(J, 4, which="top", method="lanczos", block=4)
        bottom = tjac.svd(J, 3, which="bottom", method="lanczos", block=4)
        np.savez(sys.argv[1], jv=J.matmat(V).numpy(), jtw=J.rmatmat(V).numpy(),
                 top=top.S.numpy(), bottom=bottom.S.numpy(), topv=top.V.numpy(),
                 bytes=g.bytes_moved, blocks=g.blocks, world=g.world_size)
        return "done"
    print(td.drive(op, fn, g))
    td.close(g)
""")


def test_products_and_solves_over_two_ranks_equal_the_serial_ones(tmp_path):
    script = tmp_path / "api.py"
    script.write_text(API)
    res = tmp_path / "out.npz"
    got = _finish(_start([[sys.executable, str(script), str(res)]] * 2, tmp_path))
    assert [g[0] for g in got] == [0, 0], [g[2][-2000:] for g in got]
    assert got[0][1].strip() == "done" and got[1][1].strip() == "None"  # drive: rank 0's result
    d = np.load(res)
    assert int(d["world"]) == 2 and int(d["blocks"]) > 0 and int(d["bytes"]) > 0
    torch.set_num_threads(1)
    op = tjac.TrainingJacobian(tjac.Recipe.paper(width=6, epochs=1, n_train=128), backend="fused")
    V = torch.randn(op.shape[0], 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    # slices of a block replay the same arithmetic as the whole block: bitwise here
    np.testing.assert_array_equal(d["jv"], op.matmat(V).numpy())
    np.testing.assert_array_equal(d["jtw"], op.rmatmat(V).numpy())
    top = tjac.svd(op, 4, which="top", method="lanczos", block=4)
    bottom = tjac.svd(op, 3, which="bottom", method="lanczos", block=4)
    np.testing.assert_allclose(d["top"], top.S.numpy(), rtol=1e-12)
    np.testing.assert_allclose(d["bottom"], bottom.S.numpy(), rtol=1e-10)
    # and against the dense oracle
    S = torch.linalg.svdvals(op.matmat(torch.eye(op.shape[0], dtype=torch.float64))).numpy()
    np.testing.assert_allclose(d["top"], S[:4], rtol=1e-9)
    np.testing.assert_allclose(d["bottom"], S[::-1][:3], rtol=1e-8)


def test_a_dense_run_over_two_ranks_stores_the_serial_spectrum(tmp_path):
    args = TINY + ["--k-top", "3", "--k-bottom", "3", "--method", "dense", "--run-id", "r"]
    got = _finish(_start([_tjac("run", *args, "--store", "d2.zarr")] * 2, tmp_path))
    assert [g[0] for g in got] == [0, 0], [g[2][-2000:] for g in got]
    assert "run r in d2.zarr" in got[0][1] and got[1][1] == ""  # rank 0 alone reports
    assert not list(tmp_path.glob("*.png"))
    _serial(["run", *args, "--store", "d1.zarr"], tmp_path)
    two, one = (tjac.open(str(tmp_path / f"d{n}.zarr")).run("r") for n in (2, 1))
    np.testing.assert_array_equal(two.sigma("all"), one.sigma("all"))
    prov = two.attrs["provenance"]
    assert prov["distributed"] == {"world_size": 2, "backend": "gloo"}
    assert one.attrs["provenance"]["distributed"]["world_size"] == 1
    summ = two.attrs["summary"]["distributed"]
    assert summ["world_size"] == 2 and summ["bytes_moved"] > 0 and summ["blocks"] >= 1


# a top solve long enough (~5 s) to kill a rank in the middle of it
LONG = ["--width", "16", "--epochs", "3", "--n-train", "512", "--k-top", "24", "--k-bottom", "0",
        "--method", "lanczos", "--block", "4", "--backend", "fused", "--png", "none",
        "--run-id", "k"]


def _wait_for_lanczos_step(store_path, proc, step=2, limit=240):
    """Until the run's Lanczos checkpoint holds ``step`` steps (or ``proc`` ends)."""
    state = store_path / "runs/k/state/top/zarr.json"
    t0 = time.time()
    while time.time() - t0 < limit and proc.poll() is None:
        try:
            if json.loads(state.read_text()).get("attributes", {}).get("step", 0) >= step:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.05)


def test_a_rank_killed_mid_solve_fails_the_job_by_name_and_resumes_on_one_process(tmp_path):
    args = LONG
    procs = _start([_tjac("run", *args, "--store", "k.zarr")] * 2, tmp_path)
    _wait_for_lanczos_step(tmp_path / "k.zarr", procs[0])
    assert procs[0].poll() is None, "the solve ended before a rank could be killed"
    procs[1].send_signal(signal.SIGKILL)
    (rc0, _, err0), (rc1, _, _) = _finish(procs)
    assert rc1 == -signal.SIGKILL
    assert rc0 == 1 and "rank 1 of 2 failed during" in err0 and "Traceback" not in err0
    assert "--resume" in err0
    root = store.open_read(str(tmp_path / "k.zarr"))
    assert root["runs"]["k"].attrs["status"] == "running"
    _serial(["run", *args, "--store", "k.zarr", "--resume"], tmp_path)  # world size 1
    _serial(["run", *args, "--store", "ref.zarr"], tmp_path)
    resumed = tjac.open(str(tmp_path / "k.zarr")).run("k").top()
    ref = tjac.open(str(tmp_path / "ref.zarr")).run("k").top()
    np.testing.assert_array_equal(resumed.sigma, ref.sigma)
    assert resumed.certified.all()


def test_ranks_started_differently_are_refused_before_training(tmp_path):
    base = ["--epochs", "1", "--n-train", "128", "--png", "none", "--store", "m.zarr"]
    got = _finish(_start([_tjac("run", "--width", "6", *base),
                          _tjac("run", "--width", "5", *base)], tmp_path))
    assert [g[0] for g in got] == [2, 2], [g[2] for g in got]
    assert "rank 1 of 2 was started with other arguments than rank 0" in got[0][2]
    assert "rank 0 stopped the job" in got[1][2]
    for _, _, err in got:
        assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "m.zarr").exists()


def test_rank_0s_refusal_stops_every_rank_with_its_reason(tmp_path):
    args = TINY + ["--k-top", "2", "--k-bottom", "0", "--method", "dense", "--run-id", "r",
                   "--store", "c.zarr"]
    _serial(["run", *args], tmp_path)
    before = sorted(p.name for p in (tmp_path / "c.zarr/runs/r").iterdir())
    got = _finish(_start([_tjac("run", *args)] * 2, tmp_path))  # complete, no --overwrite
    assert [g[0] for g in got] == [2, 2], [g[2] for g in got]
    assert "already complete" in got[0][2] and "rank 0 stopped the job" in got[1][2]
    assert "already complete" in got[1][2]
    assert sorted(p.name for p in (tmp_path / "c.zarr/runs/r").iterdir()) == before


def test_bad_distributed_input_is_one_line_and_exit_2(tmp_path):
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE"):
        env.pop(k, None)
    r = subprocess.run(_tjac("run", *TINY, "--distributed", "--store", "x.zarr"), cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "torchrun" in r.stderr and r.stderr.count("\n") == 1
    # a world size larger than the solver's block
    got = _finish(_start([_tjac("run", *TINY, "--block", "1", "--store", "x.zarr")] * 2,
                         tmp_path))
    assert [g[0] for g in got] == [2, 2]
    assert all("narrower than the world size 2" in g[2] and g[2].count("\n") == 1 for g in got)
    # a rendezvous nobody answers: c10d's stack dumps never start, one line instead
    r = subprocess.run(_tjac("run", *TINY, "--store", "x.zarr", "--dist-timeout", "1"),
                       cwd=tmp_path, env=_env(1, 2, _port()), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "rank 1 of 2 could not reach the rendezvous" in r.stderr
    assert not (tmp_path / "x.zarr").exists()


SWEEP = ["--epochs", "1", "--k-top", "2", "--k-bottom", "2", "--no-density", "--json"]
# Each run of a sweep autotunes its replay backend and block on the process that computes it (the
# sweep has no flag to pin them), and backends and blocks agree to round-off, not bit for bit: a
# run computed on another rank may differ from the serial one in the last bits of sigma. Training
# does not replay: theta_T is bitwise. SIGMA_RTOL is the agreement the products promise (~1e-15
# each, measured; a dense SVD of J keeps it to a few ulps of sigma_max).
SIGMA_RTOL = 1e-11


def _same_spectra(a, b, rows):
    for r in rows:
        x, y = a.run(r), b.run(r)
        np.testing.assert_array_equal(x.thetaT(), y.thetaT())
        sx, sy = x.sigma("all"), y.sigma("all")
        np.testing.assert_allclose(sx, sy, rtol=0, atol=SIGMA_RTOL * float(sy.max()))


def test_a_sweep_deals_whole_runs_to_ranks_into_one_store(tmp_path):
    args = ["--widths", "4,5,6", *SWEEP]
    got = _finish(_start([_tjac("scale", *args, "--store", "s2.zarr")] * 2, tmp_path))
    assert [g[0] for g in got] == [0, 0], [g[2][-2000:] for g in got]
    assert got[1][1] == ""
    rows = json.loads(got[0][1])["rows"]
    assert [r["run"] for r in rows] == ["mlp-w4-d1", "mlp-w5-d1", "mlp-w6-d1"]  # recipe order
    serial = json.loads(_serial(["scale", *args, "--store", "s1.zarr"], tmp_path).stdout)["rows"]
    two, one = tjac.open(str(tmp_path / "s2.zarr")), tjac.open(str(tmp_path / "s1.zarr"))
    _same_spectra(two, one, [r["run"] for r in rows])
    for a, b in zip(rows, serial):
        # the region counts are exact counts of sigma against 1 +- eps: equal where no sigma lies
        # within round-off of a boundary (checked, so that a change of pick cannot flip them)
        sig = one.run(b["run"]).sigma("all")
        for e in map(float, b["counts"]):
            assert np.abs(np.abs(sig - 1) - e).min() > 1e-9
        assert a["P"] == b["P"] and a["counts"] == b["counts"]
    # rank 1 computed mlp-w5 in a temporary store of its own, gone now, and nothing waits to move in
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("tjac-sweep")]
    assert not (tmp_path / "s2.zarr.incoming").exists()


FLAKY = textwrap.dedent("""
    import os, sys
    from tjac import cli, scale
    from tjac.runner import ComputationError
    who, rank, calls, real = sys.argv[1], int(os.environ["RANK"]), [], scale._sweep_one
    def flaky(run_id, *a, **k):  # the second run this rank starts fails
        calls.append(run_id)
        if len(calls) == 2 and who == "worker" and rank == 1:
            os._exit(3)  # a worker that dies (its connection closes), not one that reports
        if len(calls) == 2 and who == "rank0" and rank == 0:
            raise ComputationError(f"injected on rank 0 at {run_id}")
        return real(run_id, *a, **k)
    scale._sweep_one = flaky
    sys.exit(cli.main(sys.argv[2:]))
""")


@pytest.mark.parametrize("who", ["worker", "rank0"])
def test_a_sweep_that_fails_keeps_every_run_a_worker_finished_and_resume_adds_the_rest(
        tmp_path, who):
    """Four runs, two per rank (rank 1: mlp-w5, mlp-w7). The second run that rank 1 (worker) or
    rank 0 (rank0) starts fails; rank 1's first run (finished before the worker dies, or
    finished whenever rank 0 fails: rank 0 waits for a worker's current run) is in the store."""
    script = tmp_path / "flaky.py"
    script.write_text(FLAKY)
    args = ["--widths", "4,5,6,7", *SWEEP]
    cmd = [sys.executable, str(script), who, "scale", *args, "--store", "f.zarr"]
    (rc0, _, err0), (rc1, _, err1) = _finish(_start([cmd] * 2, tmp_path))
    if who == "worker":
        assert rc1 == 3 and rc0 == 1 and "rank 1 of 2 failed" in err0, (err0, err1)
    else:
        assert rc0 == 1 and "injected on rank 0 at mlp-w6-d1" in err0, (err0, err1)
        assert rc1 == 1 and "rank 0 stopped the job" in err1 and "injected on rank 0" in err1
    assert "Traceback" not in err0
    root = store.open_read(str(tmp_path / "f.zarr"))
    before = {rid: store.export_run(root, rid)[0] for rid in store.list_runs(root)
              if root["runs"][rid].attrs.get("status") == "complete"}
    assert {"mlp-w4-d1", "mlp-w5-d1"} <= set(before), sorted(before)
    assert not (tmp_path / "f.zarr.incoming").exists()  # every arrival moved in before the stop
    rows = json.loads(_serial(["scale", *args, "--store", "f.zarr"], tmp_path).stdout)["rows"]
    assert [r["run"] for r in rows] == ["mlp-w4-d1", "mlp-w5-d1", "mlp-w6-d1", "mlp-w7-d1"]
    root = store.open_read(str(tmp_path / "f.zarr"))
    for rid, manifest in before.items():  # not recomputed: every attribute as it was, timing too
        assert store.export_run(root, rid)[0] == manifest
    assert all(root["runs"][r["run"]].attrs["status"] == "complete" for r in rows)
    _serial(["scale", *args, "--store", "ref.zarr"], tmp_path)
    _same_spectra(tjac.open(str(tmp_path / "f.zarr")), tjac.open(str(tmp_path / "ref.zarr")),
                  [r["run"] for r in rows])


COLLECT = textwrap.dedent("""
    import json, sys, numpy as np, torch
    from tjac import distributed as td
    torch.set_num_threads(1)
    g = td.init(required=True, timeout_s=60)
    if g.is_driver:
        kept = []
        def keep(p):
            kept.append([p.rank, p.index, p.meta, [a.tolist() for a in p.arrays],
                         [a.dtype.str for a in p.arrays]])
        c = td.Collector(g, {1: [1, 3, 5], 2: [2, 4]}, keep).start()
        taken = []
        while c.wait():
            taken += [[p.rank, p.index] for p in c.take()]
        c.close()
        json.dump({"kept": kept, "taken": taken, "failure": str(c.failure)}, open(sys.argv[1], "w"))
        sys.exit(4 if c.failure else 0)
    try:
        for i in td.assignment(g):
            if g.rank == 2 and i == 4:
                td.report_failure(g, i, "ZeroDivisionError: injected on rank 2")
                break
            td.deliver(g, i, {"i": i}, [np.arange(i, dtype=np.int32), np.full((2, i), 0.5)])
        td.released(g)
    except Exception as e:
        print(type(e).__name__, e, file=sys.stderr)
        sys.exit(3)
""")


def test_the_collector_keeps_every_piece_delivered_before_a_failure_over_three_ranks(tmp_path):
    """tjac.distributed's dealing API without a sweep: rank 2 delivers piece 2 and fails on 4;
    rank 1's pieces are kept as they arrive (how many before the abort depends on timing, but
    its first always: a piece delivered is kept even after a failure), arrays bit for bit."""
    script = tmp_path / "collect.py"
    script.write_text(COLLECT)
    got = _finish(_start([[sys.executable, str(script), str(tmp_path / "o.json")]] * 3, tmp_path))
    assert [g[0] for g in got] == [4, 3, 3], [g[2] for g in got]
    for _, _, err in got[1:]:
        assert "rank 0 stopped the job: rank 2 of 3 failed on piece 4: ZeroDivisionError" in err
    out = json.loads((tmp_path / "o.json").read_text())
    assert out["failure"] == "rank 2 of 3 failed on piece 4: ZeroDivisionError: injected on rank 2"
    kept = {(r, i): (meta, arrays, dtypes) for r, i, meta, arrays, dtypes in out["kept"]}
    assert {(1, 1), (2, 2)} <= set(kept) and (2, 4) not in kept
    assert sorted(map(list, kept)) == sorted(out["taken"])  # each kept piece handed over once
    for (r, i), (meta, arrays, dtypes) in kept.items():
        assert meta == {"i": i} and dtypes == ["<i4", "<f8"]
        assert arrays == [list(range(i)), [[0.5] * i] * 2]


def test_a_sweep_moves_in_the_runs_rank_0_received_before_it_was_killed(tmp_path):
    """A run a worker delivered lies complete in ``<store>.incoming`` until rank 0 moves it in;
    when rank 0 is killed in between, the next sweep with resume moves it in, not recomputes it."""
    from tjac import runner, scale

    recipes = scale.sweep_recipes("mlp", [4, 5], [1], epochs=1, n_train=64)
    (rid, recipe), (other, _) = recipes
    spool = tmp_path / "s.zarr.incoming"
    spool.mkdir()
    runner.run_analysis(recipe, str(spool / f"{rid}.zarr"), k_top=2, k_bottom=2, method="auto",
                        run_id=rid, group=None)
    sent = store.export_run(store.open_read(str(spool / f"{rid}.zarr")), rid)
    stray = spool / "mlp-w9-d1.zarr"  # not a run of this sweep: left alone
    runner.run_analysis(recipes[1][1], str(stray), k_top=2, k_bottom=0, method="dense",
                        run_id="mlp-w9-d1", group=None)
    rows = scale.run_sweep(recipes, str(tmp_path / "s.zarr"), k_top=2, k_bottom=2, density=False,
                           log=lambda s: None)
    assert [r["run"] for r in rows] == [rid, other]
    got = store.export_run(store.open_read(str(tmp_path / "s.zarr")), rid)
    assert got[0] == sent[0] and all(np.array_equal(x, y) for x, y in zip(got[1], sent[1]))
    assert sorted(p.name for p in spool.iterdir()) == ["mlp-w9-d1.zarr"]


def test_export_and_import_of_a_run_round_trips_every_array_and_attribute(tmp_path):
    from tjac import runner

    runner.run_analysis(tjac.Recipe.paper(width=4, epochs=1, n_train=64), str(tmp_path / "a.zarr"),
                        k_top=2, k_bottom=2, method="dense", run_id="r", group=None)
    man, data = store.export_run(store.open_read(str(tmp_path / "a.zarr")), "r")
    json.dumps(man)  # plain JSON: nothing to unpickle on the receiving side
    with store.Writer(str(tmp_path / "b.zarr")) as w:
        w.import_run("r", man, data)
    man2, data2 = store.export_run(store.open_read(str(tmp_path / "b.zarr")), "r")
    assert man2 == man and all(np.array_equal(x, y) for x, y in zip(data, data2))
    bad = dict(man, arrays=[dict(man["arrays"][0], path="../../escape")] + man["arrays"][1:])
    with store.Writer(str(tmp_path / "b.zarr")) as w, pytest.raises(store.StoreError,
                                                                    match="not a store path"):
        w.import_run("r2", bad, data)
    assert not (tmp_path / "escape").exists()


FAILS = textwrap.dedent("""
    import sys, torch, tjac
    from tjac import distributed as td
    torch.set_num_threads(1)
    g = td.init(required=True, timeout_s=60)
    op = tjac.TrainingJacobian(tjac.Recipe.paper(width=4, epochs=1, n_train=64), backend="fused")
    if g.rank == 0:
        real = op._jvp_block
        def broken(V):  # rank 0's own slice fails while rank 1 replays its own
            raise FloatingPointError("injected on rank 0")
        op._jvp_block = broken
    try:
        td.drive(op, lambda J: J.matmat(torch.ones(J.shape[0], 4, dtype=torch.float64)), g)
    except Exception as e:
        print(type(e).__name__, e, file=sys.stderr)
        sys.exit(3)
""")


def test_a_failure_inside_a_block_stops_every_rank_at_once(tmp_path):
    """Rank 0 collects rank 1's answer to the block before it aborts: rank 1 then receives the
    abort with rank 0's error. Without that drain both ranks would be sending to each other (a
    gloo send completes only once its receive is posted) until a message timed out (7 days once
    joined): _finish's limit would fail the test, and rank 1 could not report rank 0's error."""
    script = tmp_path / "fails.py"
    script.write_text(FAILS)
    got = _finish(_start([[sys.executable, str(script)]] * 2, tmp_path), timeout=240)
    assert [g[0] for g in got] == [3, 3], [g[2] for g in got]
    assert "FloatingPointError injected on rank 0" in got[0][2]
    assert "rank 0 stopped the job" in got[1][2] and "injected on rank 0" in got[1][2]
    for _, _, err in got:  # by the abort, not by a lost connection or a timeout
        assert "failed during" not in err and "imed out" not in err and "timeout" not in err


def _pid_of_rank(rank, marker):
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            cmd = open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and marker.encode() in cmd \
                and any(e.startswith(b"TORCHELASTIC_RUN_ID=") for e in env):
            return int(pid)
    return None


def test_torchrun_max_restarts_with_resume_finishes_a_run_whose_rank_died(tmp_path):
    args = LONG + ["-q"]
    # the c10d rendezvous: each restart is a new round with fresh keys (with the static one, a
    # restarted rank could read the dead rank's address from the last round, seen under load)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--max-restarts", "1", "--rdzv-backend", "c10d",
                "--rdzv-endpoint", f"127.0.0.1:{_port()}", "-m", "tjac", "run"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen(launcher + args + ["--store", "mr.zarr", "--resume"], cwd=tmp_path,
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_lanczos_step(tmp_path / "mr.zarr", p)
        victim = _pid_of_rank(1, "mr.zarr")
        assert victim is not None and p.poll() is None, "the solve ended before the kill"
        os.kill(victim, signal.SIGKILL)
        _, err = p.communicate(timeout=300)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err[-3000:]
    # torchrun saw rank 1 die and restarted both (rank 0 may be stopped by the agent before it
    # notices the loss itself, so its own message is not asserted here: see the test above)
    assert "exitcode: -9" in err and "local_rank: 1" in err
    _serial(["run", *args, "--store", "ref.zarr"], tmp_path)
    got = tjac.open(str(tmp_path / "mr.zarr")).run("k")
    assert got.attrs["status"] == "complete"
    np.testing.assert_array_equal(got.top().sigma,
                                  tjac.open(str(tmp_path / "ref.zarr")).run("k").top().sigma)


def test_a_resumed_run_keeps_the_lanczos_block_it_started_with_at_any_world_size(tmp_path):
    """auto's top plan depends on the world size (issue: single-vector Lanczos left ranks idle),
    so a resume, at whatever world size, takes the Lanczos block the run's stored plan started
    with (its checkpoint's recurrence has that width), not a new pick."""
    from tjac import runner

    op = tjac.TrainingJacobian(tjac.Recipe.paper(width=4, epochs=1, n_train=64, batch_size=32),
                               backend="eager")
    op.apply_tuning({"backend": "eager", "block": 4,
                     "seconds_per_vector_step": {"eager": {"1": 0.2, "4": 0.17, "16": 0.4}}})
    P, where = op.shape[0], str(tmp_path)
    plans, _ = runner._plans(op.problem, P, 3, 0, "auto", "all", where)
    fresh = runner._plan_top_by_cost(plans, op.problem, P, 3, "auto", "all", where, None, op)
    assert (fresh["top"].method, fresh["top"].estimate.block) == ("lanczos", 1)  # one process
    started = {"method": "lanczos", "expected_block": 2}  # as a run started on 2 ranks stores it
    again = runner._plan_top_by_cost(plans, op.problem, P, 3, "auto", "all", where, None, op,
                                     started=started)
    assert (again["top"].method, again["top"].estimate.block) == ("lanczos", 2)
    # a run started with randomized (no checkpoint to continue) is planned afresh
    assert runner._plan_top_by_cost(plans, op.problem, P, 3, "auto", "all", where, None, op,
                                    started={"method": "randomized"})["top"].estimate.block == 1
