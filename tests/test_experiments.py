"""The paper's experiments (tjac.analysis.{experiments,response,restricted,bulk,analyze}) against
independent computations written here: a reparametrised module trained with torch.optim and
autograd, direct formulas for KL and movement, scipy's subspace_angles, a dense output Jacobian,
and the bulk prediction's own definition on data with planted low-variance directions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

import tjac
from tjac import cli, store
from tjac.cli import analyze as cli_analyze
from tjac import analyze_store as analyze_mod
from tjac.analysis.experiments import regions_of
from tjac.analysis import (AnalysisResult, Complement, movement, ood_kl, output_jacobian_null,
                           overlap_runs, perturbation_response, predict_bulk, restricted_sweep,
                           restricted_training, subspace_overlap)
from tjac.analyze_store import analyze, spectra_side_by_side
from tjac.analysis.plots import analysis_figure, bulk_prediction_figure
from tjac.linalg import materialize

WIDTH, N_TRAIN, BATCH, EPOCHS = 4, 64, 32, 2


def recipe(**kw):
    base = dict(width=WIDTH, epochs=EPOCHS, n_train=N_TRAIN, batch_size=BATCH, activation="tanh")
    base.update(kw)
    return tjac.Recipe.paper(**base)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small products on a shared CPU: one intra-op thread (restored afterwards)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def dense():
    """The tiny run's operator and the full SVD of its J (P = 310)."""
    op = tjac.TrainingJacobian(recipe())
    U, S, Vh = torch.linalg.svd(materialize(op))
    return op, U.numpy(), S.numpy(), Vh.T.numpy()


def _commit_run(w, run_id, op, U, S, V, k):
    run = w.create_run(run_id, recipe_json=op.recipe.to_json(), recipe_hash=op.recipe.hash(),
                       provenance={}, theta0=op.theta0.numpy(), thetaT=op.thetaT.numpy())
    P = len(S)
    for which, idx in (("top", np.arange(k)), ("bottom", np.arange(P - 1, P - 1 - k, -1))):
        if k:
            w.commit_solve(run, which, sigma=S[idx], residual=np.zeros((k, 2)), U=U[:, idx].T,
                           V=V[:, idx].T, method="dense", tol=1e-8, norm_estimate=float(S[0]),
                           converged=[True] * k)
    w.finish(run, {})


@pytest.fixture(scope="module")
def stored(dense, tmp_path_factory):
    """A store with run 'a' (top and bottom 8 from the dense SVD), run 'b' (another orthonormal
    set standing for a second seed) and run 'c' (no solves)."""
    op, U, S, V = dense
    path = str(tmp_path_factory.mktemp("exp") / "s.zarr")
    rng = np.random.default_rng(5)
    Q = np.linalg.qr(V[:, :8] + 0.5 / np.sqrt(len(S)) * rng.standard_normal(V[:, :8].shape))[0]
    with store.Writer(path) as w:
        _commit_run(w, "a", op, U, S, V, 8)
        Vb = _ext(Q, V)
        _commit_run(w, "b", op, Vb, S, Vb, 8)
        _commit_run(w, "c", op, U, S, V, 0)
    return path


def _ext(Q, V):
    """A (P, P) orthonormal matrix whose first 8 columns are Q and last 8 span the bottom of V."""
    P = V.shape[0]
    out = np.zeros((P, P))
    out[:, :8] = Q
    B = V[:, -8:] - Q @ (Q.T @ V[:, -8:])
    out[:, -8:] = np.linalg.qr(B)[0]
    return out


# -- an independent training: a reparametrised module, torch.optim, autograd -------------------------
class Reparam(torch.nn.Module):
    """theta = theta0 + B c, an MLP[4] (tanh) written out; only c is a parameter."""

    def __init__(self, theta0, B):
        super().__init__()
        self.theta0, self.B = theta0, B
        self.c = torch.nn.Parameter(torch.zeros(B.shape[1], dtype=torch.float64))

    def theta(self):
        return self.theta0 + self.B @ self.c

    def forward(self, x, theta=None):
        th = self.theta() if theta is None else theta
        n_in = x.shape[1]
        W0 = th[: WIDTH * n_in].reshape(WIDTH, n_in)
        b0 = th[WIDTH * n_in: WIDTH * n_in + WIDTH]
        o = WIDTH * n_in + WIDTH
        W1 = th[o: o + 10 * WIDTH].reshape(10, WIDTH)
        b1 = th[o + 10 * WIDTH:]
        return torch.tanh(x @ W0.T + b0) @ W1.T + b1


def torch_train(prob, theta0, B):
    """SGD(momentum 0.9) with the cosine schedule over the recipe's consecutive batches."""
    m = Reparam(theta0, torch.as_tensor(B))
    opt = torch.optim.SGD([m.c], lr=0.1, momentum=0.9)
    T = prob.num_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / T)))
    x, y = prob.data.x_train, prob.data.y_train
    per = N_TRAIN // BATCH
    for t in range(T):
        b = t % per
        opt.zero_grad()
        F.cross_entropy(m(x[b * BATCH:(b + 1) * BATCH]), y[b * BATCH:(b + 1) * BATCH]).backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        test = float(F.cross_entropy(m(prob.data.x_test), prob.data.y_test))
    return m.c.detach().numpy(), m.theta().detach(), test


def test_restricted_training_matches_autograd_reparametrisation(dense):
    op, _, _, V = dense
    prob = op.problem
    B = np.linalg.qr(np.random.default_rng(0).standard_normal((op.shape[0], 3)))[0]
    got = restricted_training(prob, B)
    c, _, test = torch_train(prob, op.theta0, B)
    np.testing.assert_allclose(got["c"], c, rtol=1e-9, atol=1e-12)
    assert got["test_loss"] == pytest.approx(test, rel=1e-10)
    assert got["k"] == 3
    # the orthogonal complement of span Q: B = I - Q Q^T, c in R^P
    Q = V[:, :5]
    got = restricted_training(prob, Complement(Q))
    c, theta, test = torch_train(prob, op.theta0, np.eye(len(Q)) - Q @ Q.T)
    assert got["k"] == op.shape[0] - 5
    np.testing.assert_allclose(got["thetaT"].numpy(), theta.numpy(), rtol=1e-9, atol=1e-12)
    assert np.abs(Q.T @ (got["thetaT"] - op.theta0).numpy()).max() < 1e-12  # never moves along Q


def test_restricted_sweep_grid(dense):
    op, _, _, V = dense
    prob = op.problem
    r = restricted_sweep(prob, {"top": V[:, :2], "bottom": V[:, ::-1][:, :4],
                                "not_top": Complement(V[:, :2])}, ks=(1, 4))
    assert r.attrs["subspaces"] == ["top", "bottom"]
    assert np.isnan(r["test_loss"][0, 1]) and np.isfinite(r["test_loss"][1]).all()  # k > K: NaN
    assert r["test_loss"][1, 1] == pytest.approx(restricted_training(prob, V[:, ::-1][:, :4])["test_loss"])
    assert r.attrs["fixed"]["not_top"]["k"] == op.shape[0] - 2
    full = tjac.train(prob)
    assert r.attrs["full"]["test_loss"] == full.test_loss
    np.testing.assert_array_equal(r["k"], [1, 4])


def test_perturbation_response_against_retraining_and_linear_response(dense):
    op, U, S, V = dense
    prob = op.problem
    grid = [1e-6, 1e-3, 1.0]
    r = perturbation_response(prob, V[:, 0], U[:, 0], float(S[0]), grid)
    # independent: train from theta0 + eps v with torch.optim over the full parameters (B = I)
    I = np.eye(op.shape[0])
    _, ref, _ = torch_train(prob, op.theta0, I)
    for i, eps in enumerate(grid):
        _, th, test = torch_train(prob, op.theta0 + eps * torch.as_tensor(V[:, 0]), I)
        d = (th - ref).numpy()
        a = U[:, 0] @ d
        assert r["along"][i] == pytest.approx(a, rel=1e-6, abs=1e-13)
        assert r["complement"][i] == pytest.approx(np.linalg.norm(d - a * U[:, 0]), rel=1e-5, abs=1e-12)
        assert r["test_loss"][i] == pytest.approx(test, rel=1e-10)
    # small eps: J v = sigma u (the dense J's triplet)
    assert r["along"][0] / 1e-6 == pytest.approx(S[0], rel=1e-4)
    assert r["complement"][0] / 1e-6 < 1e-4 * S[0]
    np.testing.assert_allclose(r["linear"], np.array(grid) * S[0])
    assert r.attrs["linear_up_to"] >= 1e-6


def test_movement_matches_direct_formula(dense):
    op, _, S, V = dense
    delta = (op.thetaT - op.theta0).numpy()
    r = movement(delta, V, sigma=S, eps=1e-3)
    c = np.array([abs(sum(V[j, i] * delta[j] for j in range(len(delta)))) for i in range(0, 310, 31)])
    np.testing.assert_allclose(r["coefficient"][::31], c, rtol=1e-10, atol=1e-15 * np.abs(delta).sum())
    n2 = float(delta @ delta)
    assert r.attrs["explained"] == pytest.approx(1.0, abs=1e-12)  # a complete basis
    bulk = np.abs(S - 1) <= 1e-3
    assert r.attrs["share_bulk"] == pytest.approx(float(((V[:, bulk].T @ delta) ** 2).sum() / n2), rel=1e-10)
    assert r.attrs["n_bulk"] == int(bulk.sum())
    # a partial basis leaves the rest outside
    part = movement(delta, V[:, :8], sigma=S[:8])
    assert part.attrs["share_outside"] == pytest.approx(1 - ((V[:, :8].T @ delta) ** 2).sum() / n2)


def test_subspace_overlap_matches_scipy():
    rng = np.random.default_rng(1)
    P = 60
    common = rng.standard_normal((P, 2))
    A = np.linalg.qr(np.c_[common, rng.standard_normal((P, 3))])[0]
    B = np.linalg.qr(np.c_[common + 1e-3 * rng.standard_normal((P, 2)), rng.standard_normal((P, 5))])[0]
    r = subspace_overlap(A, B, n_random=40, rng=3)
    th = np.sort(scipy.linalg.subspace_angles(A, B))
    np.testing.assert_allclose(r["cosine"], np.cos(th), atol=1e-12)
    assert r.attrs["geodesic"] == pytest.approx(np.linalg.norm(th), rel=1e-12)
    assert r["cosine"][1] > 0.999  # the planted shared plane
    assert r.attrs["random_mean_cos2"] == pytest.approx(7 / 60, rel=0.3)  # E cos^2 = k_b / P
    assert r.attrs["random_geodesic"] > r.attrs["geodesic"]


def test_overlap_runs_builds_on_compare(stored):
    res = tjac.open(stored)
    a, b = res.run("a"), res.run("b")
    r = overlap_runs(a, b, "top", n_random=3)
    A, B = a.vectors("top", slice(0, 8))[1].T, b.vectors("top", slice(0, 8))[1].T
    th = np.sort(scipy.linalg.subspace_angles(A, B))
    np.testing.assert_allclose(r["angle"], th, atol=1e-12)
    np.testing.assert_allclose(r["cosine"], np.cos(th), atol=1e-10)
    assert 0.5 < r.attrs["mean_cos2"] < 1.0  # Q was a perturbation of the top subspace


def _oracle_logp(theta, x):
    return torch.log_softmax(Reparam(theta, torch.zeros(len(theta), 0))(x, theta), -1)


def test_ood_kl_matches_direct_formula(dense):
    op, _, S, V = dense
    prob = op.problem
    dirs = V[:, [0, 150, 309]]
    x = prob.data.x_test
    noise = torch.as_tensor(np.random.default_rng(2).standard_normal(tuple(x.shape)))
    inputs = {"test": x, "noise": noise, "inverted": 1 - x}
    r = ood_kl(prob, op.thetaT, dirs, inputs, sigma=S[[0, 150, 309]])
    for i in range(3):
        th2 = op.thetaT + torch.as_tensor(dirs[:, i])
        for j, xs in enumerate(inputs.values()):
            p, q = _oracle_logp(op.thetaT, xs), _oracle_logp(th2, xs)
            kl = (p.exp() * (p - q)).sum(-1)
            assert r["kl_max"][i, j] == pytest.approx(float(kl.max()), rel=1e-9, abs=1e-15)
            assert r["kl_mean"][i, j] == pytest.approx(float(kl.mean()), rel=1e-9, abs=1e-15)
    assert set(r.attrs["region_kl_max"]) == {"chaotic", "stable"} | (
        {"bulk"} if abs(S[150] - 1) <= 1e-3 else set())
    default = ood_kl(prob, op.thetaT, dirs[:, :1])
    assert default.attrs["input_sets"] == ["train", "test", "noise", "inverted"]
    assert default["kl_max"][0, 3] == pytest.approx(r["kl_max"][0, 2], rel=1e-12)


def _planted(seed=0, n=256, d=12, n_planted=2, tiny=1e-5):
    rng = np.random.default_rng(seed)
    R = np.linalg.qr(rng.standard_normal((d - 1, d - 1)))[0]
    Z = rng.standard_normal((n, d - 1))
    Z[:, :n_planted] *= tiny  # low-variance directions, not axis-aligned after rotation
    X = np.c_[Z @ R.T, np.zeros(n)]  # the last feature is always zero
    y = rng.integers(0, 3, n)
    return X[:192], y[:192], X[192:], y[192:]


def test_predict_bulk_on_planted_low_variance_directions():
    data = _planted()
    r = tjac.Recipe.paper(dataset=data, width=5, epochs=2, batch_size=64, preprocess="none")
    got = predict_bulk(r, eps=1e-3, threshold=1e-6, measured=40)
    X = data[0][:192]
    lam = np.linalg.eigvalsh(X.T @ X / len(X))
    n_low = int((lam <= 1e-6).sum())
    assert n_low == 3  # two planted + the zero feature
    assert got.attrs["n_low_directions"] == n_low
    assert got.attrs["predicted"] == n_low * 5 + (5 + 1)  # + the softmax shift (SGD)
    assert got.attrs["zero_input"] == 5 and got.attrs["low_variance_extra"] == 2 * 5
    np.testing.assert_allclose(got["second_moment"], np.clip(lam, 0, None), atol=1e-12)
    assert got.attrs["error"] == got.attrs["predicted"] - 40
    # the default threshold: eps / sum_t eta_t / (1 - momentum)
    T = 3 * 2
    eta = sum(0.1 * 0.5 * (1 + math.cos(math.pi * t / T)) for t in range(T)) / (1 - 0.9)
    assert predict_bulk(r, eps=1e-3).attrs["threshold"] == pytest.approx(1e-3 / eta, rel=1e-12)
    # Adam: no softmax-shift singular vectors
    assert predict_bulk(tjac.Recipe.paper(dataset=data, width=5, epochs=2, batch_size=64,
                                          preprocess="none", optimizer="adam"),
                        threshold=1e-6).attrs["predicted"] == n_low * 5


def test_output_jacobian_null_against_dense_jacobian(dense):
    op, _, S, V = dense
    prob = op.problem
    order = np.argsort(np.abs(S - 1), kind="stable")
    bulk = V[:, order[:120]]
    x = prob.data.x_train
    G = torch.autograd.functional.jacobian(lambda th: _oracle_logp(th, x).reshape(-1),
                                           op.thetaT).numpy()
    ev, N = np.linalg.eigh(G.T @ G)
    # k-planes are defined where the eigenvalues have a gap: the exact null space, then beyond
    null = int((ev <= 310 * np.finfo(float).eps * ev.max()).sum())
    gap = [k for k in range(null + 1, 300) if ev[k] - ev[k - 1] > 1e-3 * ev[k]]
    ks = [null, gap[0], [k for k in gap if k > 120][0]]  # the last: beyond K = 120
    r = output_jacobian_null(prob, op.thetaT, bulk, ks=ks, n_random=2)
    assert r.attrs["null_dim"] == null
    for j, k in enumerate(ks):
        c = np.cos(scipy.linalg.subspace_angles(bulk[:, :min(k, 120)], N[:, :k]))
        assert r["mean_cos2"][j] == pytest.approx((c ** 2).mean(), abs=1e-6)
    assert r["mean_cos2"][-1] == pytest.approx(np.linalg.norm(N[:, :ks[-1]].T @ bulk) ** 2 / 120, abs=1e-6)
    np.testing.assert_allclose(r["gram_eigenvalues"], ev, atol=1e-9 * ev.max())
    assert r["random_mean_cos2"][-1] < 0.5
    assert r.attrs["outputs"] == "log_softmax"


def test_every_analysis_round_trips_through_the_store(stored, tmp_path):
    out = analyze(stored, "a", other="b", ks=(1, 2), eps_grid=(1e-3, 1.0), k_ood=2, n_random=2)
    run = tjac.open(stored).run("a")
    names = {"movement", "overlap-top", "overlap-bottom", "perturbation-top", "perturbation-bulk",
             "restricted", "ood", "jacobian-null", "bulk"}
    assert names <= set(run.analyses()) and names == set(out)
    for n, r in out.items():
        a = run.analysis(n)
        assert set(a.arrays) == set(r.arrays)
        for k, (x, dims) in r.arrays.items():
            np.testing.assert_array_equal(a[k], x)
            assert a.dims[k] == tuple(dims)
        assert a.attrs["analysis"] == n and a.attrs["seconds"] == pytest.approx(r.attrs["seconds"])
        assert analysis_figure(run, n, str(tmp_path / f"{n}.png")).endswith(".png")
    # without the dense path the bulk stands in as stated
    ones = tjac.analysis.structural_ones(tjac.Problem(recipe()))
    mv = run.analysis("movement").attrs
    assert mv["n_bulk"] == ones.n_exact_singular > 0 and mv["share_bulk"] < 1e-20  # never moves
    assert "structural" in run.analysis("perturbation-bulk").attrs["notes"]
    assert run.analysis("restricted").attrs["notes"]["bulk"].startswith("random k-planes")
    assert run.analysis("bulk").attrs["measured"] is None  # partial spectrum: bounds only
    v = spectra_side_by_side({"a": run, "b": tjac.open(stored).run("b")})
    np.testing.assert_array_equal(v["sigma"][0][: len(run.spectrum().sigma)], run.spectrum().sigma)
    bulk_prediction_figure([{"label": "a", "predicted": 3, "measured": 4}], str(tmp_path / "b.png"))
    assert (tmp_path / "b.png").stat().st_size > 0


@pytest.mark.slow
def test_dense_path_round_trips(stored, dense):
    out = analyze(stored, "a", what="movement,bulk,restricted", dense=True, ks=(1, 4))
    _, _, S, _ = dense
    assert out["movement"].attrs["explained"] == pytest.approx(1.0, abs=1e-10)
    assert out["bulk"].attrs["measured"] == int((np.abs(S - 1) <= 1e-3).sum())
    assert tjac.open(stored).run("a").analysis("restricted").attrs["source"] == "dense"


# -- bad input: one line ----------------------------------------------------------------------------
def _one_line(excinfo, *words):
    msg = str(excinfo.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg


def test_bad_input_is_one_line_value_error(stored, dense):
    op, U, S, V = dense
    delta = (op.thetaT - op.theta0).numpy()
    with pytest.raises(ValueError) as e:
        movement(delta, V[:, :3] * 2)
    _one_line(e, "orthonormal")
    with pytest.raises(ValueError) as e:
        restricted_training(op.problem, V[:100, :3])
    _one_line(e, "(310, k)")
    with pytest.raises(ValueError) as e:
        subspace_overlap(V[:, :2], V[:-1, :2])
    _one_line(e, "shape")
    with pytest.raises(ValueError) as e:
        movement(delta, V[:, :3], eps=0)
    _one_line(e, "positive")
    with pytest.raises(ValueError) as e:
        perturbation_response(op.problem, V[:, 0], U[:, 0], float(S[0]), [1e-3, -1.0])
    _one_line(e, "positive")
    with pytest.raises(ValueError) as e:
        analyze(stored, "a", what="movement,nonsense")
    _one_line(e, "nonsense", "expected one of")
    with pytest.raises(ValueError) as e:
        analyze(stored, "c", what="perturbation")
    _one_line(e, "no committed top solve", "--k-top")
    with pytest.raises(ValueError) as e:
        analyze(stored, "a", what="overlap")
    _one_line(e, "--other")
    with pytest.raises(ValueError) as e:
        analyze_mod.commit_result(AnalysisResult("x", {}, {"k": 1}), stored, "a")
    _one_line(e, "'k'")


def _cli(argv):
    """tjac's parser conventions with the analyze subcommand (cli.main once wired)."""
    p = cli._Parser(prog="tjac")
    common = cli._Parser(add_help=False)
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=cli._Parser)
    cli_analyze.add_parser(sub, [common])
    try:
        return cli_analyze.cmd_analyze(p.parse_args(argv))
    except (cli.BadInput, ValueError, KeyError) as e:
        return str(e.args[0] if isinstance(e, KeyError) else e)


def test_cli_bad_input_and_names(stored, capsys):
    assert cli_analyze.WHAT == analyze_mod.WHAT
    assert "unknown analysis 'bogus'" in _cli(["analyze", stored, "--run", "a", "--what", "bogus"])
    assert "positive" in _cli(["analyze", stored, "--run", "a", "--eps", "-1"])
    assert "positive" in _cli(["analyze", stored, "--run", "a", "--eps-grid", "1e-3,0"])
    assert "holds 3 runs" in _cli(["analyze", stored])
    assert "no run 'zz'" in _cli(["analyze", stored, "--run", "zz"])
    assert "no committed top solve" in _cli(["analyze", stored, "--run", "c", "--what", "movement"])
    assert _cli(["analyze", stored, "--run", "a", "--what", "bulk,movement"]) == 0
    out = capsys.readouterr().out
    assert "bulk: predicted" in out and "movement:" in out
    if "analyze" in cli.build_parser()._subparsers._group_actions[0].choices:  # once wired
        assert cli.main(["analyze", stored, "--run", "a", "--what", "bogus"]) == 2


def test_reproduce_paper_script_runs_end_to_end(tmp_path):
    """examples/reproduce_paper.py on a tiny recipe: every figure, the table, and the analyses in
    the store; only the clean run solves for its bottom (the others' overlaps use their tops)."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "paper"
    p = subprocess.run([sys.executable, os.path.join(root, "examples", "reproduce_paper.py"),
                        "--out", str(out), "--width", "4", "--epochs", "1", "--k", "2",
                        "--bulk-widths", "4", "--threads", "1"],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    res = tjac.open(str(out / "paper.zarr"))
    clean = res.run("clean")
    assert len(clean.sigma("bottom")) == 2
    for v in ("seed1", "shuffled", "noise", "adam"):
        assert len(res.run(v).sigma("top")) == 2
        with pytest.raises(KeyError):
            res.run(v).sigma("bottom")
    names = set(clean.analyses())
    assert {"movement", "overlap-top", "restricted", "ood", "overlap-shuffled-top",
            "variants"} <= names and "overlap-shuffled-bottom" not in names
    md = (out / "results.md").read_text()
    assert "| total (runs, experiments, figures) |" in md and "clean-w4" in md
    pngs = {f.name for f in out.iterdir() if f.suffix == ".png"}
    assert {"variants.png", "bulk-prediction.png", "restricted.png"} <= pngs
    again = subprocess.run(  # into the same folder: complete runs are reused as they are
        [sys.executable, os.path.join(root, "examples", "reproduce_paper.py"), "--out", str(out),
         "--width", "4", "--epochs", "1", "--k", "2", "--bulk-widths", "", "--threads", "1",
         "--bottom-runs", "all"], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    with pytest.raises(KeyError):
        tjac.open(str(out / "paper.zarr")).run("seed1").sigma("bottom")
    other = subprocess.run(  # another recipe under the same run ids: refused, not reused
        [sys.executable, os.path.join(root, "examples", "reproduce_paper.py"), "--out", str(out),
         "--width", "5", "--epochs", "1", "--k", "2", "--threads", "1"],
        capture_output=True, text=True, timeout=600)
    assert other.returncode == 2 and "error: run 'clean'" in other.stderr, other.stderr[-500:]
    bad = subprocess.run([sys.executable, os.path.join(root, "examples", "reproduce_paper.py"),
                          "--out", str(tmp_path / "x"), "--variants", "clean,bogus"],
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "unknown variant 'bogus'" in bad.stderr
    assert not (tmp_path / "x").exists()  # refused before anything is written


def test_known_regions_add_the_structural_ones_and_still_contain_the_truth(stored, dense):
    from tjac.analysis.structural import structural_ones
    from tjac.analyze_store import known_regions

    op, _, S, _ = dense
    run = tjac.open(stored).run("a")
    n1 = structural_ones(op.problem).n_exact_singular
    for eps in (1e-3, 1e-1):
        plain, reg = run.regions(eps), known_regions(run, eps)
        assert reg["structural_ones"] == n1 > plain["bulk_min"]
        assert reg["bulk_min"] == n1
        exact = dict(zip(("chaotic", "bulk", "stable"),
                         np.bincount(regions_of(S, eps), minlength=3)))
        for name, n in exact.items():
            assert reg[f"{name}_min"] <= n <= reg[f"{name}_max"], (eps, name)
            assert reg[f"{name}_max"] <= plain[f"{name}_max"]
        assert reg["chaotic_max"] < plain["chaotic_max"]  # tightened, not only restated
