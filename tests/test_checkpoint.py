"""The store's Lanczos checkpoint (tjac.checkpoint): a save writes what is new since the last one
(bytes counted at the store), and a kill at any write inside a save leaves the previous save whole
and resumable to bitwise the same sigma as an uninterrupted solve."""
import contextlib
import copy
import json
import shutil

import numpy as np
import pytest
import torch

from test_commit import Killed, kill_at
from tjac import store
from tjac.checkpoint import LanczosCheckpoint
from tjac.linalg import DenseOperator, svd


def planted(P, seed=0):
    """A non-normal operator with singular values 1 ... 1e-3 (log-spaced): the bottom needs the
    whole basis, so a solve takes many steps."""
    g = torch.Generator().manual_seed(seed)
    s = torch.logspace(0, -3, P, dtype=torch.float64)
    Q1, _ = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=torch.float64))
    Q2, _ = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=torch.float64))
    return Q1 @ torch.diag(s) @ Q2.T


class Record:
    """A checkpoint that keeps a copy of every state it is handed (and loads nothing)."""

    def __init__(self):
        self.states = []

    def load(self):
        return None

    def save(self, st):
        self.states.append(copy.deepcopy(st))


def solve(A, kw, checkpoint=None):
    return svd(DenseOperator(A), checkpoint=checkpoint, method="lanczos", raise_on_failure=False,
               **kw)


def new_store(path, P):
    w = store.Writer(str(path))
    run = w.create_run("r", recipe_json="{}", recipe_hash="0", provenance={},
                       theta0=np.zeros(P), thetaT=np.zeros(P))
    return w, LanczosCheckpoint(w, w.state_group(run, "s"), DenseOperator(torch.zeros(P, P,
                                                                          dtype=torch.float64)))


def reopen(path, A):
    """The checkpoint as a fresh process sees it: a new Writer reading the disk."""
    w = store.Writer(str(path))
    return w, LanczosCheckpoint(w, w.state_group(w.run("r"), "s"), DenseOperator(A))


def same(got, st):
    """A loaded state is exactly the saved one (tensors bitwise, the JSON parts equal)."""
    if got is None:
        return False
    plain = json.loads(json.dumps({k: st[k] for k in ("history", "next_check", "confirm")}))
    for k in ("U", "V", "B", "pending", "S_last", "gen_state"):
        if (got[k] is None) != (st[k] is None) or (st[k] is not None
                                                   and not torch.equal(got[k], st[k])):
            return False
    return got["step"] == st["step"] and all(got[k] == plain[k] for k in plain)


@contextlib.contextmanager
def bytes_written():
    """Count the bytes every store write hands the disk (chunks and metadata), by key."""
    from zarr.storage import LocalStore

    out = {}

    def wrap(orig):
        async def write(self, key, value, *args, **kwargs):
            out[key] = out.get(key, 0) + len(value)
            return await orig(self, key, value, *args, **kwargs)
        return write

    with pytest.MonkeyPatch.context() as mp:
        for name in ("set", "set_if_not_exists"):
            mp.setattr(LocalStore, name, wrap(getattr(LocalStore, name)))
        yield out


BOTTOM = dict(k=4, which="bottom", tol=1e-10, block=4)  # no restart: the basis grows to P
TOP = dict(k=3, which="top", tol=1e-12, block=2, max_basis=12)  # thick restarts


def test_a_save_writes_the_new_columns_not_the_whole_B(tmp_path):
    """Each save's bytes are bounded by its new basis vectors and B columns (3 rows of P floats
    each: U, V and B's column), the pending block, S_last, the generator state and the JSON
    attributes; not by B's n^2 (the whole B rewritten at every step was ~1e11 bytes for a
    P ~ 1e4 bottom). The late saves of a solve cost what its early ones do."""
    P = 120
    A = planted(P)
    rec = Record()
    solve(A, BOTTOM, rec)
    states = rec.states
    assert len(states) > 25 and states[-1]["U"].shape[1] >= 0.8 * P
    w, ckpt = new_store(tmp_path / "s.zarr", P)
    per_save, have = [], 0
    with w:
        for st in states:
            with bytes_written() as out:
                ckpt.save(st)
            n = st["U"].shape[1]
            new = n - (0 if st["restarted"] else have)
            have = n
            b = 0 if st["pending"] is None else st["pending"].shape[1]
            s = 0 if st["S_last"] is None else st["S_last"].numel()
            small = 8 * (b * P + s) + st["gen_state"].numel()
            attrs = len(json.dumps({k: st[k] for k in ("history", "confirm")}))
            bound = 8 * 3 * new * P + small + attrs + 8192  # + the fixed-size metadata
            per_save.append((n, sum(out.values()), bound))
    over = [(n, got, bound) for n, got, bound in per_save if got > bound]
    assert not over, (f"saves writing more than their new columns (n, bytes, bound): "
                      f"{over[:3]} ... {over[-1]}")
    # and the basis at the end is what the solve had
    w, ckpt = reopen(tmp_path / "s.zarr", A)
    with w:
        assert same(ckpt.load(), states[-1])


def _kill_inside_save(tmp_path, A, kw, i, ref_S, states):
    """Kill save i at each of its writes in turn; each time a fresh process must load save i - 1
    (or save i, when the kill landed after its commit) and resume to bitwise ref_S."""
    P = A.shape[0]
    base = tmp_path / f"base{i}.zarr"
    w, ckpt = new_store(base, P)
    with w:
        for st in states[:i]:
            ckpt.save(st)
    n, loaded = 0, []
    while True:
        n += 1
        path = tmp_path / f"s{i}-{n}.zarr"
        shutil.copytree(base, path)
        w, ckpt = reopen(path, A)
        with w:
            with kill_at(n) as count:
                try:
                    ckpt.save(states[i])
                except Killed:
                    pass
        w, ckpt = reopen(path, A)
        with w:
            got = ckpt.load()
            if not count["dead"]:
                assert same(got, states[i])
                break
            if i == 0:
                assert got is None, f"kill at write {n} of the first save: a state appeared"
                continue  # (the resume is the whole solve again)
            else:
                prev, new = same(got, states[i - 1]), same(got, states[i])
                assert prev or new, f"kill at write {n} of save {i}: not the previous state whole"
                loaded.append("previous" if prev else "new")
            r = solve(A, kw, ckpt)  # resumes over the killed save's debris
        assert torch.equal(r.S, ref_S), f"kill at write {n} of save {i}: sigma differs"
        shutil.rmtree(path)
    return loaded


@pytest.mark.slow
def test_a_kill_at_any_write_inside_a_save_keeps_the_previous_save(tmp_path):
    """Saves of a growing basis: the first, a late Ritz check (history and next_check change)
    and the last; a kill at every single write of each leaves the previous save loadable
    (never nothing, never a mix; nothing after a killed first save), and the solve resumed from
    the store, over the killed save's debris, ends on bitwise the same sigma."""
    A = planted(48, seed=1)
    kw = dict(BOTTOM, block=2)
    rec = Record()
    ref = solve(A, kw, rec)
    states = rec.states
    check = max(j for j in range(1, len(states) - 1)
                if states[j]["history"] != states[j - 1]["history"]
                and states[j]["next_check"] != states[j - 1]["next_check"])
    assert len(states) > 10 and check > len(states) // 2
    for i in (0, check, len(states) - 1):
        loaded = _kill_inside_save(tmp_path, A, kw, i, ref.S, states)
        assert i == 0 or set(loaded) == {"previous"}  # (no write after a plain save's commit)


@pytest.mark.slow
def test_a_kill_inside_a_thick_restart_save_keeps_the_previous_basis(tmp_path):
    """A thick restart replaces the basis whole: it is written beside the committed one (the
    other slot), so a kill inside it still loads the basis before the restart (after its commit:
    the new one, while the old slot is deleted); the save after a restart appends to the new
    basis."""
    A = planted(40, seed=2)
    rec = Record()
    ref = solve(A, TOP, rec)
    states = rec.states
    restarts = [j for j, st in enumerate(states) if st["restarted"]]
    late = [j for j in restarts if j > len(states) // 2 and not states[j - 1]["restarted"]]
    assert late, "the settings should make the solve restart late"
    for i in (late[-1] - 1, late[-1]):
        loaded = _kill_inside_save(tmp_path, A, TOP, i, ref.S, states)
        assert "previous" in loaded and (i != late[-1] or "new" in loaded)


def _save_stamped(w, g, P, st, save):
    """The layout before slots, as tjac wrote it: every array rewritten in place (B whole) and
    stamped with the save's number, then the attributes."""
    def put(name, x, dims, chunks=None):
        a = w.state_array(g, name, x.shape, str(x.dtype), dims, chunks=chunks)
        a[...] = x
        w.set_attrs(a, save=save)
    for name in ("U", "V"):
        M = np.zeros((P, P))
        M[:st[name].shape[1]] = st[name].T.numpy()
        put(name, M, (f"basis_{name.lower()}", "param"), chunks=(1, P))
    put("pending", st["pending"].T.numpy(), ("pending", "param"))
    put("B", st["B"].numpy(), ("b_row", "b_col"))
    put("S_last", st["S_last"].numpy(), ("s_row", "s_col"))
    put("gen_state", st["gen_state"].numpy(), ("byte",))
    w.set_attrs(g, n_u=st["U"].shape[1], n_v=st["V"].shape[1], n_pending=st["pending"].shape[1],
                next_check=st["next_check"], history=st["history"], b_shape=list(st["B"].shape),
                has_s_last=True, confirm=st.get("confirm"))
    w.set_attrs(g, step=st["step"], save=save)


def test_a_checkpoint_of_the_stamped_layout_resumes_and_is_converted(tmp_path):
    """A solve checkpointed by the tjac before slots resumes from that state to bitwise the same
    sigma; its next save writes the new layout and removes the old arrays."""
    A = planted(40, seed=3)
    kw = dict(BOTTOM, block=2)
    rec = Record()
    ref = solve(A, kw, rec)
    i = len(rec.states) - 4
    path = tmp_path / "s.zarr"
    w, _ = new_store(path, 40)
    with w:
        _save_stamped(w, w.state_group(w.run("r"), "s"), 40, rec.states[i], save=i + 1)
    w, ckpt = reopen(path, A)
    with w:
        assert same(ckpt.load(), rec.states[i])
        r = solve(A, kw, ckpt)
        g = ckpt.g
        assert g.attrs["layout"] == 2 and not {"U", "V", "B", "pending", "gen_state"} & set(g)
        assert same(ckpt.load(), rec.states[-1])
    assert torch.equal(r.S, ref.S)
