"""The store's one commit protocol (arrays and their descriptive attributes first, one counter or
status attribute last), proved by killing the writer at every single write to disk and resuming in
a fresh Writer; a resume with other solve settings refused; exit codes of failed computations."""
import contextlib
import hashlib
import os

import numpy as np
import pytest

import tjac
from tjac import runner
from tjac.cli import main
from tjac.operator import TrainingJacobian
from tjac.query import open as open_store

RECIPE = dict(width=4, epochs=1, n_train=64, batch_size=32)


class Killed(BaseException):
    """A simulated SIGKILL: a BaseException, so no ``except Exception`` in tjac or zarr catches it."""


@contextlib.contextmanager
def kill_at(n=None):
    """Count every write zarr makes to a local store (chunk, metadata, delete); from the ``n``-th on,
    each raises :class:`Killed` instead of writing (a dead process writes nothing more). A kill
    that lands on a directory deletion removes every other file of it first (a recursive delete is
    many writes, and a kill can stop it anywhere). ``n=None`` only counts. Yields the counter."""
    from zarr.storage import LocalStore

    state = {"writes": 0, "dead": False}

    def wrap(name, orig):
        async def write(self, *args, **kwargs):
            state["writes"] += 1
            if n is not None and state["writes"] >= n:
                if name == "delete_dir" and not state["dead"]:
                    root = os.path.join(str(self.root), args[0] if args else kwargs["prefix"])
                    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)
                    for f in files[::2]:
                        os.remove(f)
                state["dead"] = True
                raise Killed(f"killed at write {state['writes']}")
            return await orig(self, *args, **kwargs)
        return write

    with pytest.MonkeyPatch.context() as mp:
        for name in ("set", "set_if_not_exists", "delete", "delete_dir", "_set_many"):
            if hasattr(LocalStore, name):
                mp.setattr(LocalStore, name, wrap(name, getattr(LocalStore, name)))
        yield state


@pytest.fixture
def fixed_tuning(monkeypatch):
    """Skip the (timing-based, slow) autotune: a fixed pick, stored in the provenance as usual."""
    def autotune(self, *, backends=None, **kw):
        tuned = {"backend": "eager", "block": 128, "steps": 1, "seconds_per_vector_step": {},
                 "skipped": {}}
        self.apply_tuning(tuned)
        return tuned
    monkeypatch.setattr(TrainingJacobian, "autotune", autotune)


def _analyse(path, *, resume=True, **kw):
    return runner.run_analysis(tjac.Recipe.paper(**RECIPE), str(path), backend="eager",
                               resume=resume, **kw)


def _state(path):
    res = open_store(str(path))
    run = res.run(res.runs()[0])
    out = {"status": run.status}
    for which in ("top", "bottom"):
        try:
            t = run.top() if which == "top" else run.bottom()
        except KeyError:
            continue
        out[which] = (t.sigma.tolist(), t.converged.tolist(), t.method)
    try:
        out["all"] = run.sigma("all").tolist()
    except KeyError:
        pass
    s = run.summary
    out["certified"] = {w: s[w]["n_certified"] for w in ("top", "bottom") if w in s}
    return out


CASES = {
    # both ends from the dense path (J's columns checkpointed, the full spectrum stored)
    "dense": dict(k_top=2, k_bottom=2, method="dense", block=128),
    # a Krylov solve (randomized top: one commit of its own, no solver state)
    "krylov": dict(k_top=2, k_bottom=0, method="randomized"),
    # Lanczos: its whole recurrence checkpointed after every step (~600 writes)
    "lanczos": dict(k_top=2, k_bottom=0, method="lanczos", block=8),
}


def _every_kill(tmp_path, case, ns=None):
    kw = CASES[case]
    with kill_at() as count:
        _analyse(tmp_path / "ref.zarr", **kw)
    ref = _state(tmp_path / "ref.zarr")
    assert ref["status"] == "complete"
    total = count["writes"]
    assert total > 10, total
    failures = []
    for n in (ns(total) if ns else range(1, total + 1)):
        path = tmp_path / f"k{n}.zarr"
        with kill_at(n):
            with pytest.raises(Killed):
                _analyse(path, **kw)
        try:
            _analyse(path, **kw)  # a fresh process: a new Writer, nothing in memory
            got = _state(path)
        except Exception as e:  # noqa: BLE001 - collect every boundary that breaks
            failures.append(f"kill at write {n}/{total}: resume failed: {type(e).__name__}: {e}")
            continue
        if got != ref:
            failures.append(f"kill at write {n}/{total}: {got} != {ref}")
    assert not failures, "\n".join(failures[:10]) + f"\n({len(failures)} of {total} boundaries)"


def _sample(stride):
    """The first writes (store and run creation), every ``stride``-th, and the last ones."""
    return lambda total: sorted(set(range(1, 13)) | set(range(13, total, stride))
                                | set(range(total - 7, total + 1)))


@pytest.mark.parametrize("case", ["dense", "krylov"])
def test_a_kill_at_sampled_writes_resumes_to_the_same_run(tmp_path, fixed_tuning, case):
    _every_kill(tmp_path, case, ns=_sample(9))


@pytest.mark.slow
@pytest.mark.parametrize("case", ["dense", "krylov", "lanczos"])
def test_a_kill_at_every_write_resumes_to_the_same_run(tmp_path, fixed_tuning, case):
    """Every write for the dense and randomized paths; every 9th of Lanczos' ~600 (each of its
    saves is ~15 writes, all alike: its own stamp protocol is tested in test_store_cli.py)."""
    _every_kill(tmp_path, case, ns=_sample(9) if case == "lanczos" else None)


@pytest.mark.parametrize("case", ["dense", "krylov"])
def test_a_kill_inside_an_overwrite_leaves_no_committed_run_with_pieces_missing(tmp_path,
                                                                              fixed_tuning, case):
    """--overwrite deletes the old run first: a kill inside that deletion must leave either the old
    run whole or no run at all (its status removed before any of its files), never a "complete"
    run whose chunks are gone (zarr reads missing chunks as zeros)."""
    import shutil

    kw = CASES[case]
    _analyse(tmp_path / "ref.zarr", **kw)
    ref = _state(tmp_path / "ref.zarr")
    for n in range(1, 5):
        path = tmp_path / f"o{n}.zarr"
        shutil.copytree(tmp_path / "ref.zarr", path)
        with kill_at(n):
            with pytest.raises(Killed):
                _analyse(path, resume=False, overwrite=True, **kw)
        runs = open_store(str(path)).runs()
        assert runs == [] or _state(path) == ref, (n, runs)
        _analyse(path, **kw)  # resumes (or starts again) to the same run
        assert _state(path) == ref, n


def test_a_kill_inside_a_lanczos_save_loads_the_previous_save(tmp_path):
    """Kill one Lanczos save at each of its writes: the checkpoint then loads the previous save
    whole (or the new one, once its commit is written) - never nothing, never the new arrays and
    step with the previous save's history and next_check (zarr writes attributes key by key
    unless told otherwise)."""
    import copy
    import json

    import torch

    from tjac import store
    from tjac.checkpoint import LanczosCheckpoint
    from tjac.linalg import svd

    op = TrainingJacobian(tjac.Recipe.paper(**RECIPE), backend="eager")

    class Record:
        states = []

        def load(self):
            return None

        def save(self, st):
            self.states.append(copy.deepcopy(st))

    svd(op, 2, which="top", method="lanczos", tol=1e-10, block=2, checkpoint=Record(),
        raise_on_failure=False)
    states = Record.states
    # a save whose history and next_check differ from the one before (a Ritz check happened)
    i = next(j for j in range(1, len(states)) if states[j]["history"] != states[j - 1]["history"]
             and states[j]["next_check"] != states[j - 1]["next_check"])

    def same(got, st):
        plain = json.loads(json.dumps({k: st[k] for k in ("history", "next_check", "confirm")}))
        return (got["step"] == st["step"] and all(got[k] == plain[k] for k in plain)
                and all(torch.equal(got[k], st[k]) for k in ("U", "V", "B", "gen_state")))

    n, loaded_previous = 0, 0
    while True:
        n += 1
        with store.Writer(str(tmp_path / f"s{n}.zarr")) as w:
            run = w.create_run("r", recipe_json=op.recipe.to_json(), recipe_hash=op.recipe.hash(),
                               provenance={}, theta0=op.theta0.numpy(), thetaT=op.thetaT.numpy())
            ckpt = LanczosCheckpoint(w, w.state_group(run, "top"), op)
            for st in states[:i]:
                ckpt.save(st)
            with kill_at(n) as count:
                try:
                    ckpt.save(states[i])
                except Killed:
                    pass
        with store.Writer(str(tmp_path / f"s{n}.zarr")) as w:  # a fresh process reads the disk
            got = LanczosCheckpoint(w, w.state_group(w.run("r"), "top"), op).load()
        if not count["dead"]:  # the whole save went through
            assert same(got, states[i])
            break
        prev = got is not None and same(got, states[i - 1])
        assert prev or (got is not None and same(got, states[i])), \
            f"kill at write {n} of a save: not one save whole"
        loaded_previous += prev
    assert n > 5 and loaded_previous >= n - 4  # (after the commit: at most the stale deletions)


def tree_digest(path):
    h = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for f in sorted(files):
            if f == ".tjac-lock":
                continue
            p = os.path.join(root, f)
            h.update(p.encode())
            h.update(open(p, "rb").read())
    return h.hexdigest()


CLI = ["run", "--width", "4", "--epochs", "1", "--n-train", "64", "--batch-size", "32", "-q",
       "--png", "none", "--backend", "eager"]


@pytest.mark.parametrize("method", ["randomized", "dense"])
def test_resume_with_other_solve_settings_is_refused_not_mixed(tmp_path, capsys, fixed_tuning,
                                                               method):
    path = str(tmp_path / "s.zarr")
    bottom = ["--k-bottom", "0"] if method == "randomized" else ["--k-bottom", "2"]
    # an incomplete run: killed after its solves were committed, before its summary
    with kill_at() as count:
        assert main([*CLI, "--k-top", "2", *bottom, "--method", method, "--store",
                     str(tmp_path / "ref.zarr")]) == 0
    with kill_at(count["writes"] - 2):
        with pytest.raises(Killed):
            main([*CLI, "--k-top", "2", *bottom, "--method", method, "--store", path])
    capsys.readouterr()
    for done in (False, True):
        before = tree_digest(path)
        for other in (["--k-top", "4", *bottom], ["--k-top", "2", *bottom, "--tol", "1e-6"]):
            code = main([*CLI, *other, "--method", method, "--store", path, "--resume"])
            err = capsys.readouterr().err.strip()
            assert code == 2, err
            assert len(err.splitlines()) == 1 and "was started with" in err and "--overwrite" in err, err
            assert tree_digest(path) == before
        if not done:  # the same settings finish it; the complete run is refused the same way
            assert main([*CLI, "--k-top", "2", *bottom, "--method", method, "--store", path,
                         "--resume"]) == 0
            assert open_store(path).run(open_store(path).runs()[0]).status == "complete"
    run = open_store(path).run(open_store(path).runs()[0])
    assert len(run.sigma("top")) == 2 and run.top().converged.all()
    # --overwrite recomputes with the new k
    assert main([*CLI, "--k-top", "4", *bottom, "--method", method, "--store", path,
                 "--overwrite"]) == 0
    run = open_store(path).run(open_store(path).runs()[0])
    assert len(run.sigma("top")) == 4 and run.top().converged.all()


def test_a_failed_adjoint_check_exits_1_not_2(tmp_path, capsys, monkeypatch):
    """A computation that fails its own verification is exit 1 (the CLI reserves 2 for bad input)."""
    rmatmat = TrainingJacobian.rmatmat
    monkeypatch.setattr(TrainingJacobian, "rmatmat", lambda self, W: 1.01 * rmatmat(self, W))
    code = main([*CLI, "--k-top", "2", "--k-bottom", "0", "--store", str(tmp_path / "s.zarr")])
    err = capsys.readouterr().err.strip()
    assert code == 1, err
    assert len(err.splitlines()) == 1 and "adjoint identity" in err and "Traceback" not in err


def test_a_nondeterministic_model_exits_1_with_one_line(tmp_path, capsys):
    code = main(["run", "--model", "usermodels:noisy", "--epochs", "1", "--n-train", "128",
                 "--batch-size", "32", "--k-top", "2", "--k-bottom", "0", "-q", "--png", "none",
                 "--store", str(tmp_path / "s.zarr")])
    err = capsys.readouterr().err.strip()
    assert code == 1, err
    assert len(err.splitlines()) == 1 and "unseeded randomness in jitter" in err
