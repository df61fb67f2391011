"""Replay backends (tjac.replay): each must give the eager path's J V and J^T W to ~1e-12, and the
choice must be made, recorded and refused the way the docs say."""
import pytest
import torch

import tjac
from tjac import bench, replay
from tjac.replay.autotune import decide, preference
from tjac.trajectory import Problem, Trajectory

from conftest import assert_close, tiny

needs_compiler = pytest.mark.skipif(not replay.compiler_available(),
                                    reason="torch.compile (inductor) needs a C++ compiler")

MLP_CASES = {
    "sgd": dict(),
    "sgd-depth3-tanh": dict(hidden=(6, 5, 7), activation="tanh"),
    "sgd-relu-no-momentum": dict(activation="relu", momentum=0.0),
    "nesterov-wd": dict(nesterov=True, weight_decay=1e-2),
    "adam": dict(optimizer="adam", lr=0.01),
    "adamw": dict(optimizer="adamw", lr=0.01, weight_decay=1e-2),
    "wide-hidden": dict(hidden=(40, 36), n_train=64),  # `out` >= 32: the batched-GEMM branch
}


def _pair(r, backend, policy="all", k=9, seed=0):
    op = tjac.TrainingJacobian(r, checkpoint=policy, backend="eager")
    gen = torch.Generator().manual_seed(seed)
    V = torch.randn(op.shape[0], k, generator=gen, dtype=torch.float64)
    W = torch.randn(op.shape[0], k, generator=gen, dtype=torch.float64)
    ref = op.matmat(V), op.rmatmat(W)
    op.backend = backend
    assert op.backend == backend
    return ref, (op.matmat(V), op.rmatmat(W))


@pytest.mark.parametrize("case", sorted(MLP_CASES))
def test_fused_matches_eager(case):
    (jv, jtw), (fv, ftw) = _pair(tiny(**MLP_CASES[case]), "fused")
    assert_close(fv, jv, 1e-12, f"fused J V ({case})")
    assert_close(ftw, jtw, 1e-12, f"fused J^T W ({case})")


@pytest.mark.parametrize("policy", ["sqrt", 3])
def test_fused_vjp_under_every_checkpoint_policy(policy):
    r = tiny(epochs=3, optimizer="adam", lr=0.01)
    (_, jtw), (_, ftw) = _pair(r, "fused", policy=policy)
    assert_close(ftw, jtw, 1e-12, f"fused J^T W, checkpoint={policy}")


def test_fused_float32_agrees_with_float64():
    r64 = tiny()
    (jv, _), _ = _pair(r64, "eager")
    op = tjac.TrainingJacobian(tiny(dtype="float32"), backend="fused")
    V = torch.randn(op.shape[0], 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = op.matmat(V.float())
    assert out.dtype == torch.float32
    assert_close(out, jv, 1e-4, "float32 fused vs float64 eager")


def test_fused_narrow_blocks_match_eager_with_and_without_the_cache():
    """Every width takes the block-major path (k = 1 and 3 here), cached or not: the arithmetic
    must not depend on the checkpoint policy (test_operator holds policies bit-identical)."""
    prob = Problem(tiny())
    traj = Trajectory(prob, prob.init_theta())
    for k in (1, 3):
        V = torch.randn(k, prob.num_params, generator=torch.Generator().manual_seed(k),
                        dtype=torch.float64)
        e = replay.EagerReplay(prob, traj)
        ref = e.jvp(V), e.vjp(V)
        on, off = replay.FusedMLPReplay(prob, traj), replay.FusedMLPReplay(prob, traj)
        off.cache_fraction = 0.0
        for rp in (on, off, on):  # cold, uncached, warm
            assert_close(rp.jvp(V), ref[0], 1e-12, f"fused J V, k = {k}")
            assert_close(rp.vjp(V), ref[1], 1e-12, f"fused J^T W, k = {k}")
        assert on._cache and off._cache is False
        assert torch.equal(on.jvp(V), off.jvp(V)) and torch.equal(on.vjp(V), off.vjp(V))


@pytest.mark.parametrize("case", sorted(MLP_CASES))
def test_fused_primal_cache_is_bitwise_neutral_and_bounded(case, monkeypatch):
    """Replays reading the cached primal half of each step equal uncached ones bit for bit (JVP and
    VJP, every step cached by the first replay); the cache is not kept when it would not fit or
    when the trajectory is checkpointed."""
    r = tiny(**MLP_CASES[case])
    prob = Problem(r)
    traj = Trajectory(prob, prob.init_theta())
    V = torch.randn(9, prob.num_params, generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64)
    sparse = replay.FusedMLPReplay(prob, Trajectory(prob, prob.init_theta(), checkpoint=3))
    assert torch.equal(sparse.vjp(V), replay.FusedMLPReplay(prob, traj).vjp(V))
    assert sparse._cache is False  # checkpointing asked to save memory: no cache
    off = replay.FusedMLPReplay(prob, traj)
    off.cache_fraction = 0.0
    on = replay.FusedMLPReplay(prob, traj)
    ref = off.jvp(V), off.vjp(V)
    assert off._cache is False
    first = on.jvp(V)
    assert len(on._cache) == prob.num_steps
    for _ in range(2):  # warm: everything from the cache
        assert torch.equal(on.jvp(V), ref[0]) and torch.equal(on.vjp(V), ref[1])
    assert torch.equal(first, ref[0])
    monkeypatch.setattr(replay.fused, "available_bytes", lambda device: 1000)
    small = replay.FusedMLPReplay(prob, traj)
    assert torch.equal(small.jvp(V), ref[0]) and small._cache is False


@pytest.mark.parametrize("opt", [{}, dict(optimizer="adam", lr=0.01)])
def test_eager_jvp_reads_stored_states_where_it_can_and_replays_training_where_it_cannot(opt):
    """With every state stored and an optimizer linear in g (SGD), each step of the eager JVP is
    an HVP at the stored theta_t (no gradient); Adam's tangent map reads g, so it replays
    training. Either way J V is the one a sqrt-checkpointed operator (which replays) gives."""
    r = tiny(epochs=2, **opt)
    full = tjac.TrainingJacobian(r, checkpoint="all", backend="eager")
    sqrt = tjac.TrainingJacobian(tiny(epochs=2, **opt), checkpoint="sqrt", backend="eager")
    V = torch.randn(full.shape[0], 3, generator=torch.Generator().manual_seed(2),
                    dtype=torch.float64)
    prob, calls = full.problem, {"grad_hvp": 0, "hvp": 0}
    for name in calls:
        real = getattr(prob, name)

        def spy(*a, _real=real, _name=name, **kw):
            calls[_name] += 1
            return _real(*a, **kw)
        setattr(prob, name, spy)
    out = full.matmat(V)
    T = prob.num_steps
    assert calls == ({"grad_hvp": 0, "hvp": T} if not opt else {"grad_hvp": T, "hvp": 0})
    assert_close(out, sqrt.matmat(V), 1e-12, "stored-state J V vs replayed")


def test_partial_replay_is_the_tangent_after_s_steps():
    """jvp(V, steps=s) (used by the autotuner) is the JVP of a run cut after s steps."""
    r = tiny(epochs=3)
    prob = Problem(r)
    op = tjac.TrainingJacobian(prob, backend="fused")
    V = torch.randn(op.shape[0], 9, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    short = tjac.TrainingJacobian(tiny(epochs=3), backend="eager")
    # a run of 2 steps with the same schedule is not a prefix (the cosine depends on T), so compare
    # backends on the same prefix instead, and against the full replay at s = T
    e = replay.make(prob, op.trajectory, "eager")
    assert_close(op._replay.jvp(V.T, steps=2).T, e.jvp(V.T, steps=2).T, 1e-12, "2-step prefix")
    assert_close(op._replay.jvp(V.T, steps=10**6).T, short.matmat(V), 1e-12, "steps beyond T")
    assert not torch.allclose(e.jvp(V.T, steps=2), e.jvp(V.T))


@needs_compiler
@pytest.mark.slow
def test_compiled_matches_eager_including_a_narrower_block():
    """The compiled products equal eager's, and they are the compiled graphs' own: the replay's
    check against eager falls back to eager on a mismatch, which equal products alone would not
    notice."""
    r = tiny(optimizer="adam", lr=0.01)
    op = tjac.TrainingJacobian(r, backend="eager", checkpoint=3)
    gen = torch.Generator().manual_seed(0)
    V = torch.randn(op.shape[0], 4, generator=gen, dtype=torch.float64)
    ref_v, ref_w = op.matmat(V), op.rmatmat(V)
    op.backend = "compiled"
    assert_close(op.matmat(V), ref_v, 1e-12, "compiled J V")
    assert_close(op.rmatmat(V), ref_w, 1e-12, "compiled J^T W")
    assert_close(op.matmat(V[:, :3]), ref_v[:, :3], 1e-12, "compiled, narrower block (zero-padded)")
    rp = op._replay
    assert rp.fallback == {} and {("jvp", False), ("vjp", False)} <= rp._verified, rp.fallback


@needs_compiler
@pytest.mark.slow
def test_compiled_on_the_zoo_matches_eager_or_falls_back():
    """torch.compile of torch.func steps: the CNN compiles correctly; the transformer's compiled VJP
    came out wrong (9%) on torch 2.13, which the guard must catch. Either way the products must be
    the eager ones to 1e-12."""
    for fam, hidden in (("cnn", (3,)), ("transformer", (8,))):
        r = tiny(family=fam, hidden=hidden, n_train=64, epochs=1)
        op = tjac.TrainingJacobian(r, backend="eager")
        V = torch.randn(op.shape[0], 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        jv, jtw = op.matmat(V), op.rmatmat(V)
        op.backend = "compiled"
        assert_close(op.matmat(V), jv, 1e-12, f"compiled J V ({fam})")
        assert_close(op.rmatmat(V), jtw, 1e-12, f"compiled J^T W ({fam})")
        if fam == "cnn":
            assert not op._replay.fallback


@needs_compiler
def test_compiled_graphs_are_shared_per_problem_and_separate_across_problems():
    """One compile per problem serves all its replays (the autotuner's is the operator's), and each
    problem has its own code object: dynamo's recompile limit (8 graphs per code object) must not
    be shared by every problem in a process (it was: a benchmark sweep silently ran eagerly)."""
    p1, p2 = Problem(tiny()), Problem(tiny())
    a = replay.CompiledReplay(p1, Trajectory.start_only(p1, p1.init_theta()))
    b = replay.CompiledReplay(p1, Trajectory.start_only(p1, p1.init_theta()))
    c = replay.CompiledReplay(p2, Trajectory.start_only(p2, p2.init_theta()))
    assert a._jvp_c is b._jvp_c and a._vjp_c is b._vjp_c
    for f, g in ((a._jvp_c, c._jvp_c), (a._vjp_c, c._vjp_c)):
        assert f is not g
        assert f._torchdynamo_orig_callable.__code__ is not g._torchdynamo_orig_callable.__code__


def test_start_only_trajectory_serves_jvps_and_refuses_the_rest():
    prob = Problem(tiny())
    full = Trajectory(prob, prob.init_theta())
    start = Trajectory.start_only(prob, prob.init_theta())
    V = torch.randn(5, prob.num_params, generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64)
    assert torch.equal(replay.EagerReplay(prob, start).jvp(V), replay.EagerReplay(prob, full).jvp(V))
    with pytest.raises(RuntimeError, match="only theta_0"):
        replay.EagerReplay(prob, start).vjp(V)
    with pytest.raises(RuntimeError, match="only theta_0"):
        start.thetaT


def test_compiled_guard_falls_back_to_eager_on_a_wrong_graph(caplog, monkeypatch):
    """The guard itself, with a deliberately wrong 'compiled' step (no compiler needed: the graphs
    are replaced before anything is compiled, so the compiler check is bypassed)."""
    monkeypatch.setattr(replay.support, "compiler_available", lambda: True)
    op = tjac.TrainingJacobian(tiny(), backend="eager")
    W = torch.randn(op.shape[0], 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = op.rmatmat(W)
    op.backend = "compiled"
    rp = op._replay
    rp._vjp_c = lambda state, bs, *a: tuple(1.01 * b for b in bs)  # wrong by 1% per step
    with caplog.at_level("WARNING", logger="tjac.replay"):
        out = op.rmatmat(W)
    assert torch.equal(out, ref)  # the eager product, not the wrong one
    assert "wrong VJP" in rp.fallback["vjp"] and "wrong VJP" in caplog.text
    assert torch.equal(op.rmatmat(W), ref)  # and it stays eager
    rp._jvp_c = lambda state, ds, *a: (state, tuple(2 * d for d in ds))
    with pytest.raises(replay.CompileMismatch, match="wrong JVP"):
        rp.jvp(W.T, steps=2)  # a partial replay (the autotuner's) raises instead


def test_backend_resolution_and_refusals():
    from tjac import cli

    assert cli.BACKENDS == ("auto",) + replay.BACKENDS  # the CLI's literal copy has not drifted
    mlp = Problem(tiny())
    cnn = Problem(tiny(family="cnn", hidden=(2,), n_train=64, epochs=1))
    assert replay.resolve(mlp, "auto") == "fused"
    assert replay.resolve(cnn, "auto") == "eager"
    with pytest.raises(replay.Unsupported, match="built-in MLP"):
        replay.resolve(cnn, "fused")
    with pytest.raises(replay.Unsupported, match="dropout"):
        replay.resolve(Problem(tiny(dropout=0.1)), "fused")
    with pytest.raises(ValueError, match="unknown replay backend 'jit'"):
        tjac.TrainingJacobian(tiny(), backend="jit")
    assert replay.resolve(Problem(tiny(dropout=0.1)), "auto") == "eager"


def test_compiled_without_a_compiler_is_refused_up_front(monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(replay.Unsupported, match="C.. compiler"):
        tjac.TrainingJacobian(tiny(), backend="compiled")
    out = replay.autotune(Problem(tiny()), blocks=(2,), steps=1)
    assert "C++ compiler" in out["skipped"]["compiled"] and out["backend"] != "compiled"


def test_autotune_picks_a_measured_pair_and_explains_skips():
    prob = Problem(tiny())
    # the threshold is far above any replay here, so the skip does not depend on this machine's
    # load (with the default 1 s, a tiny replay on a busy 2-core host was once projected above it)
    # (tiny=0: timed although P x T is small)
    out = replay.autotune(prob, blocks=(2, 4), steps=2, compile_threshold_s=1e6, tiny=0)
    assert out["backend"] in out["seconds_per_vector_step"]
    table = out["seconds_per_vector_step"]
    assert set(table) >= {"eager", "fused"}
    order = preference(list(table) + ["compiled"], (2, 4), "fused")
    assert (out["backend"], out["block"]) == decide(table, order)
    # a replay below the threshold cannot pay for a compile: skipped with the reason
    if replay.compiler_available():
        assert "would not pay off" in out["skipped"]["compiled"]
    else:
        assert "C++ compiler" in out["skipped"]["compiled"]
    only = replay.autotune(prob, blocks=(3,), backends=["eager"], steps=1)
    assert (only["backend"], only["block"]) == ("eager", 3)
    assert only["seconds_per_vector_step"] == {}  # one candidate: nothing to time
    with pytest.raises(replay.Unsupported):
        replay.autotune(Problem(tiny(family="cnn", hidden=(2,), n_train=64, epochs=1)),
                       backends=["fused"])


def test_operator_autotune_switches_to_the_measured_pick_and_keeps_the_products():
    op = tjac.TrainingJacobian(tiny(), backend="eager", block_size=128)
    V = torch.randn(op.shape[0], 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = op.matmat(V), op.rmatmat(V)
    tuned = op.autotune(blocks=(2, 4), backends=["eager", "fused"], steps=2)
    assert (op.backend, op.block_size) == (tuned["backend"], tuned["block"])
    assert tuned["block"] in (2, 4)
    assert_close(op.matmat(V), ref[0], 1e-12, "J V after autotune")
    assert_close(op.rmatmat(V), ref[1], 1e-12, "J^T W after autotune")
    op.apply_tuning({"backend": "fused", "block": 3})  # a stored pick (a resume) is used as is
    assert (op.backend, op.block_size) == ("fused", 3)
    assert bench.autotune is replay.autotune  # the name it was first published under


def test_runner_records_the_backend_in_provenance(tmp_path):
    from tjac import runner
    from tjac.query import open as open_store

    r = tiny()
    out = runner.run_analysis(r, str(tmp_path / "s.zarr"), k_top=2, k_bottom=2, method="dense",
                              backend="eager")
    prov = open_store(str(tmp_path / "s.zarr")).run(out.run_id).provenance
    assert prov["autotune"]["backend"] == "eager"
    # a tiny run times nothing, and says why
    assert prov["autotune"]["seconds_per_vector_step"] == {}
    assert "P x T" in prov["autotune"]["reason"]


def test_cli_refuses_an_unsupported_backend(tmp_path, capsys):
    from tjac.cli import main

    cfg = tmp_path / "cnn.toml"
    cfg.write_text('family = "cnn"\nhidden = [2]\nepochs = 1\nn_train = 64\n')
    assert main(["run", "--config", str(cfg), "--backend", "fused", "--store",
                 str(tmp_path / "s.zarr"), "--k-top", "1", "--k-bottom", "0", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert "built-in MLP" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "s.zarr").exists()
    assert main(["bench", "--backends", "eager,jit", "-q"]) == 2
    assert "--backends" in capsys.readouterr().err


def test_autotune_stops_widening_where_blocks_stop_paying():
    from tjac.replay.autotune import stop_widening

    assert not stop_widening([0.63, 0.4, 0.3, 0.2, 0.09])          # the fused MLP: always falling
    assert not stop_widening([0.207, 0.184])                        # too few widths to judge
    assert not stop_widening([0.207, 0.184, 0.25])                  # one worse width: go on
    assert stop_widening([0.207, 0.184, 0.25, 0.3])                 # two in a row > 1.25x the best
    assert not stop_widening([0.2, 0.3, 0.35, 0.1])                 # a wide one wins again: go on
    # where every width is cheap to measure all are, in order (no stop: the pick stays the same
    # from run to run whatever the timing noise)
    out = replay.autotune(Problem(tiny()), blocks=(8, 1, 2, 4), backends=["eager"], steps=1,
                          tiny=0)
    assert list(out["seconds_per_vector_step"]["eager"]) == ["1", "2", "4", "8"]
    assert not [k for k in out["skipped"] if "wider than" in k]


def test_decide_keeps_the_default_within_the_margin_and_switches_beyond_it():
    """The pick rule on synthetic medians (no timing): the default, first in the fixed order,
    stays unless another candidate is at least 20% cheaper per vector."""
    import numpy as np

    order = preference(["eager", "fused", "double-backward"], (1, 4, 128), "fused")
    assert order[0] == ("fused", 128) and order[1] == ("fused", 4)
    assert order[3:6] == [("eager", 128), ("eager", 4), ("eager", 1)]
    # equal true costs under +-10% noise: the ratio of any two stays above 0.8, never a switch
    rng = np.random.default_rng(0)
    for _ in range(500):
        noisy = {b: {str(w): float(rng.uniform(0.9, 1.1)) for w in (1, 4, 128)}
                 for b in ("fused", "eager", "double-backward")}
        assert decide(noisy, order) == ("fused", 128)
    # a candidate 19% cheaper does not switch; 20% and more do
    assert decide({"fused": {"128": 1.0, "4": 0.81}}, order) == ("fused", 128)
    assert decide({"fused": {"128": 1.0, "4": 0.8}}, order) == ("fused", 4)
    assert decide({"fused": {"128": 1.0}, "eager": {"1": 0.5}}, order) == ("eager", 1)
    # among candidates within 20% of the cheapest, the earlier in the order: noise between two
    # winners (4 at 0.5 or 0.45, 1 at 0.45 or 0.5) does not flip the width either
    for c4, c1 in ((0.5, 0.45), (0.45, 0.5)):
        assert decide({"fused": {"128": 1.0, "4": c4, "1": c1}}, order) == ("fused", 4)
    # the default not measured (widening stopped): the first measured one within the margin
    assert decide({"eager": {"1": 1.0, "4": 0.9}}, order) == ("eager", 4)
    assert decide({}, order) is None


def _fake(costs, calls, warm=None):
    """A ``measure`` for autotune: seconds per vector-step from ``costs`` {(backend, width): s},
    the warm-up first (``warm``: {(backend, width): s}, default the cost), recording each call."""
    def measure(name, k):
        calls.append((name, k))
        c = costs[(name, k)]
        return [(warm or {}).get((name, k), c), c * 1.02, c, c * 0.99]
    return measure


@needs_compiler
def test_autotune_on_injected_costs_switches_only_on_a_clear_win_and_gates_compiled():
    prob = Problem(tiny(width=8))
    T = prob.num_steps
    base = {("fused", 128): 1.0, ("fused", 4): 0.9, ("eager", 128): 2.0, ("eager", 4): 2.0}
    kw = dict(blocks=(4, 128), backends=["eager", "fused", "compiled"], steps=2, tiny=0)
    calls = []
    assert T < 20  # (one product's replays at 1 s per vector-step: shorter than a compile)
    out = replay.autotune(prob, measure=_fake(base, calls), products=1, **kw)
    assert (out["backend"], out["block"]) == ("fused", 128)  # 10% cheaper: noise, no switch
    assert "the default" in out["reason"]
    # the solve's replays (1 product: T x 1 s) are shorter than a compile (20 s): not measured
    assert ("compiled", 128) not in calls and "would not pay off" in out["skipped"]["compiled"]
    assert out["seconds_per_vector_step"]["fused"] == {"4": 0.9, "128": 1.0}  # the medians
    out = replay.autotune(prob, measure=_fake({**base, ("fused", 4): 0.7}, []), products=1, **kw)
    assert (out["backend"], out["block"]) == ("fused", 4)
    # compiled 40% cheaper; its compile (warm-up minus cost: 100 s) against the saving over the
    # projected solve (0.4 s x T x products), which must exceed both directions' compiles
    comp = {**base, ("compiled", 128): 0.6}
    warm = {("compiled", 128): 0.6 + 100.0 / (128 * 2)}
    few = replay.autotune(prob, measure=_fake(comp, [], warm), products=int(200 / (0.4 * T)),
                          **kw)
    assert few["backend"] == "fused" and "less than its compiles" in few["skipped"]["compiled"]
    many = replay.autotune(prob, measure=_fake(comp, [], warm), products=int(300 / (0.4 * T)),
                           **kw)
    assert (many["backend"], many["block"]) == ("compiled", 128)


def test_a_tiny_replay_times_nothing_and_takes_the_default():
    calls = []
    prob = Problem(tiny())
    assert prob.num_params * prob.num_steps <= replay.autotune.__globals__["TINY_PARAM_STEPS"]
    out = replay.autotune(prob, measure=_fake({}, calls))
    assert calls == [] and out["seconds_per_vector_step"] == {}
    assert (out["backend"], out["block"]) == ("fused", 128) and "P x T" in out["reason"]
    cnn = replay.autotune(Problem(tiny(family="cnn", hidden=(2,), n_train=64, epochs=1)),
                          measure=_fake({}, calls))
    assert calls == [] and (cnn["backend"], cnn["block"]) == ("eager", 128)


def test_resume_reuses_the_stored_pick(tmp_path, monkeypatch):
    """A run interrupted after its autotune resumes with the pick stored in its provenance, not a
    new one (here the stored pick differs from what a fresh tune would make)."""
    from tjac import runner
    from tjac.operator import TrainingJacobian
    from tjac.query import open as open_store

    path, r = str(tmp_path / "s.zarr"), tiny()

    def killed(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as mp:
        mp.setattr(runner, "_krylov_resumable", killed)
        with pytest.raises(KeyboardInterrupt):
            runner.run_analysis(r, path, k_top=2, k_bottom=0, method="randomized",
                                backend="eager", block=3)
    stored = open_store(path).run(open_store(path).runs()[0]).provenance["autotune"]
    assert (stored["backend"], stored["block"]) == ("eager", 3)

    def no_tuning(self, **kw):
        raise AssertionError("a resume must not tune again")

    monkeypatch.setattr(TrainingJacobian, "autotune", no_tuning)
    out = runner.run_analysis(r, path, k_top=2, k_bottom=0, method="randomized", resume=True,
                              block=3)  # (backend 'auto' now: the stored pick still wins)
    assert (out.summary["backend"], out.summary["block"]) == ("eager", 3)


def test_two_identical_tiny_runs_give_bitwise_identical_sigma(tmp_path, caplog):
    import logging

    import numpy as np

    from tjac.cli import main
    from tjac.query import open as open_store

    args = ["run", "--width", "4", "--epochs", "2", "--n-train", "128", "--batch-size", "32",
            "--k-top", "3", "--k-bottom", "3", "--png", "none", "-q"]
    sig = []
    for name in ("a", "b"):
        with caplog.at_level(logging.INFO, logger="tjac"):  # (what -v shows)
            assert main(args + ["--store", str(tmp_path / f"{name}.zarr")]) == 0
        assert "autotune: fused at width 128 (the default: P x T" in caplog.text
        caplog.clear()
        res = open_store(str(tmp_path / f"{name}.zarr"))
        run = res.run(res.runs()[0])
        assert run.provenance["autotune"]["seconds_per_vector_step"] == {}  # nothing timed
        sig.append((run.top().sigma, run.bottom().sigma, run.sigma("all")))
    for x, y in zip(*sig):
        assert np.array_equal(x, y)


def test_scale_passes_backend_and_block_to_every_run(tmp_path):
    from tjac.cli import main
    from tjac.query import open as open_store

    path = str(tmp_path / "s.zarr")
    assert main(["scale", "--widths", "2,3", "--epochs", "1", "--k-top", "2", "--k-bottom", "2",
                 "--no-density", "--backend", "eager", "--block", "5", "--store", path,
                 "--png", str(tmp_path / "s.png"), "-q"]) == 0
    res = open_store(path)
    assert len(res.runs()) == 2
    for rid in res.runs():
        run = res.run(rid)
        tuned = run.provenance["autotune"]
        assert (tuned["backend"], tuned["block"]) == ("eager", 5)
        assert run.summary["block"] == 5 and run.summary["backend"] == "eager"
    assert main(["scale", "--widths", "2", "--epochs", "1", "--family", "cnn", "--backend",
                 "fused", "--store", str(tmp_path / "c.zarr"), "-q"]) == 2
