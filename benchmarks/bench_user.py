"""A user's own nn.Module through tjac's generic path (torch.func functional_call), side by side.

Target 1 (``mlp``): the paper's MLP (64-64-10, tanh-approximate GELU, digits, SGD momentum) written
as a plain ``nn.Module`` (:func:`paper_mlp`, passed live) against the built-in MLP, from the same
theta_0 (layouts match by name: layers.0.weight, ...). Per-vector seconds of a block JVP and VJP for
builtin eager (hand-derived derivatives), builtin fused, user eager (forward-over-reverse HVPs),
user double-backward (reverse-over-reverse) and user compiled; ratios to builtin eager: the
generic path (the faster of user eager and double-backward, as autotune picks) target <= 1.5x,
user compiled target <= 1.0x.
Fewer epochs than the paper's 25 (costs per step, hence in units of R, do not depend on T).

Target 2 (``cnn``): a CNN with BatchNorm (:func:`bn_cnn`, ~1.06e5 parameters) on MNIST-shaped
synthetic arrays (2,048 train / 512 test, 1x28x28, class templates plus noise, fixed numpy seed),
batch 128, 2 epochs (32 steps). R; per-vector JVP/VJP cost per backend at the solver's block
(k + 8 = 24) and at blocks 1 and 4; certified top-16 (``tjac.svd(op, 16, which="top", tol=1e-6)``)
under a wall-clock cap. ``--solver auto`` (the default) solves as users get it: the operator as its
autotune left it and svd's own choice from the measured costs per block (Lanczos at block 1 when
blocks are not cheaper per vector); ``randomized``/``lanczos`` force a method.

Accuracy before timing: every backend's products against the reference's to ~1e-12 relative and
the adjoint identity <J v, w> = <v, J^T w> on the timed blocks.

    python benchmarks/bench_user.py [--quick] [--targets mlp,cnn] [--solve-minutes 30]
        [--solver auto|randomized|lanczos] [--solve-block B] [--out PATH]
"""
import argparse
import os
import resource
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
import _env  # noqa: E402

import tjac  # noqa: E402
from tjac.bench import plain_run_seconds  # noqa: E402


# -- the user's models ----------------------------------------------------------------------------
class PaperMLP(nn.Module):
    """64 -> 64 -> 10, tanh-approximate GELU, linear output: the paper's net as users write it."""

    def __init__(self, n_in=64, width=64, n_out=10):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(n_in, width), nn.Linear(width, n_out)])

    def forward(self, x):
        return self.layers[1](F.gelu(self.layers[0](x.reshape(x.shape[0], -1)), approximate="tanh"))


def paper_mlp(**kw):
    return PaperMLP(**kw)


class BNConvNet(nn.Module):
    """conv 1->16 3x3, BN, ReLU, 2x2 max pool; conv 16->32 3x3, BN, ReLU, 2x2 max pool;
    linear 1568 -> 64, tanh; linear 64 -> 10."""

    def __init__(self, c1=16, c2=32, hidden=64, n_out=10):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, c1, 3, padding=1), nn.BatchNorm2d(c1)
        self.conv2, self.bn2 = nn.Conv2d(c1, c2, 3, padding=1), nn.BatchNorm2d(c2)
        self.fc1, self.fc2 = nn.Linear(c2 * 7 * 7, hidden), nn.Linear(hidden, n_out)

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        h = F.max_pool2d(F.relu(self.bn2(self.conv2(h))), 2)
        return self.fc2(torch.tanh(self.fc1(h.flatten(1))))


def bn_cnn(**kw):
    torch.manual_seed(0)  # theta_0 is whatever the module holds: make it reproducible
    return BNConvNet(**kw)


def mnist_like(n_train=2048, n_test=512, seed=0):
    """Class-dependent patterns on 28x28: a smooth random template per class (scaled into [0, 1])
    times a random contrast, plus pixel noise; labels balanced at random. Training separates them."""
    rng = np.random.default_rng(seed)
    raw = rng.normal(size=(10, 1, 7, 7))
    templates = np.kron(raw, np.ones((1, 1, 4, 4)))  # 7x7 blocks -> 28x28
    templates = (templates - templates.min()) / (templates.max() - templates.min())

    def draw(n):
        y = rng.integers(0, 10, n)
        contrast = rng.uniform(0.5, 1.0, (n, 1, 1, 1))
        X = np.clip(contrast * templates[y] + 0.3 * rng.normal(size=(n, 1, 28, 28)), 0, 1)
        return X.astype(np.float32), y.astype(np.int64)

    Xtr, ytr = draw(n_train)
    Xte, yte = draw(n_test)
    return Xtr, ytr, Xte, yte


# -- measuring ------------------------------------------------------------------------------------
def _best(fn, repeats):
    ts, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t)
    return min(ts), out


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _adjoint(JV, W, V, JtW):
    """max over columns of |<J v, w> - <v, J^T w>| / (||J v|| ||w||)."""
    lhs, rhs = (JV * W).sum(0), (V * JtW).sum(0)
    return float(((lhs - rhs).abs() / (JV.norm(dim=0) * W.norm(dim=0))).max())


def _write(path, payload):
    """JSON with the environment inside it (``_env.write`` would also rewrite the shared
    results/environment.json, which this benchmark leaves alone)."""
    import json

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(dict(payload, environment=_env.environment()), f, indent=2, sort_keys=True)


def _rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def mlp_target(*, epochs, block, repeats, backends, log):
    rb = tjac.Recipe.paper(epochs=epochs)
    ru = tjac.Recipe.paper(model=paper_mlp, epochs=epochs)
    op_b = tjac.TrainingJacobian(rb, backend="eager", block_size=block)
    op_u = tjac.TrainingJacobian(ru, theta0=op_b.theta0, backend="eager", block_size=block)
    lb = [(p.name, tuple(p.shape)) for p in op_b.param_layout]
    lu = [(p.name, tuple(p.shape)) for p in op_u.param_layout]
    if lb != lu:
        raise RuntimeError(f"layouts differ: builtin {lb} vs user {lu}")
    P = op_b.shape[0]
    thetaT_err = _rel(op_u.thetaT, op_b.thetaT)
    plain_run_seconds(op_b.problem), plain_run_seconds(op_u.problem)  # warm-up
    R_b = min(plain_run_seconds(op_b.problem) for _ in range(repeats))
    R_u = min(plain_run_seconds(op_u.problem) for _ in range(repeats))
    log(f"P={P} T={op_b.num_steps} R builtin {R_b:.3f}s, R user module {R_u:.3f}s; "
        f"theta_T user vs builtin {thetaT_err:.1e}")
    gen = torch.Generator().manual_seed(0)
    V = torch.randn(P, block, generator=gen, dtype=torch.float64)
    W = torch.randn(P, block, generator=gen, dtype=torch.float64)
    # one operator per case: switching an operator's backend rebuilds its replay, which drops the
    # fused primal cache and re-runs the compiled backend's eager check inside the timed products
    op_bf = tjac.TrainingJacobian(rb, theta0=op_b.theta0, backend="fused", block_size=block)
    # the plain module is recognised as an MLP chain (tjac.models.chain): hand-derived
    # derivatives, and the fused backend that "auto" picks; `generic` is the same module kept on
    # torch.func (Problem(model_backend="func")), what a module tjac does not recognise gets
    if not getattr(op_u.problem.model, "recognised", False):
        raise RuntimeError("the plain-module MLP was not recognised as an MLP chain")
    op_uf = tjac.TrainingJacobian(ru, theta0=op_b.theta0, backend="auto", block_size=block)
    generic = tjac.Problem(ru, model_backend="func")
    op_g = tjac.TrainingJacobian(generic, theta0=op_b.theta0, backend="eager", block_size=block)
    cases = [("builtin_eager", op_b, "eager"), ("builtin_fused", op_bf, "fused"),
             ("user_eager", op_u, "eager"), ("user_auto", op_uf, op_uf.backend),
             ("user_generic_eager", op_g, "eager")]
    if "double-backward" in backends:
        op_ud = tjac.TrainingJacobian(generic, theta0=op_b.theta0, backend="double-backward",
                                      block_size=block)
        cases.append(("user_generic_double_backward", op_ud, "double-backward"))
    if "compiled" in backends:
        if tjac.replay.compiler_available():
            op_uc = tjac.TrainingJacobian(generic, theta0=op_b.theta0, backend="eager",
                                          block_size=block)
            cases.append(("user_generic_compiled", op_uc, "compiled"))
            op_urc = tjac.TrainingJacobian(ru, theta0=op_b.theta0, backend="eager",
                                           block_size=block)
            cases.append(("user_compiled", op_urc, "compiled"))
        else:
            log("no C++ compiler: user_compiled not measured")
    out = {"recipe": rb.to_dict(), "user_model": "bench_user:paper_mlp (live)", "P": P,
           "T": op_b.num_steps, "block": block, "repeats": repeats, "R_builtin_seconds": R_b,
           "R_user_seconds": R_u, "thetaT_rel_error_user_vs_builtin": thetaT_err, "cases": {}}
    ref = None
    for name, op, backend in cases:  # accuracy first (also compiles `compiled`, fills caches)
        op.backend = backend
        t = time.perf_counter()
        JV, JtW = op.matmat(V), op.rmatmat(W)
        first = time.perf_counter() - t
        if ref is None:
            ref = (JV, JtW)
        row = {"first_jvp_vjp_seconds": first, "jvp_rel_error_vs_builtin_eager": _rel(JV, ref[0]),
               "vjp_rel_error_vs_builtin_eager": _rel(JtW, ref[1]),
               "adjoint_rel_error": _adjoint(JV, W, V, JtW)}
        if backend == "compiled":
            row["fallback"] = dict(op._replay.fallback)
        out["cases"][name] = row
        log(f"[{name}] agreement with builtin eager: JVP {row['jvp_rel_error_vs_builtin_eager']:.1e}"
            f", VJP {row['vjp_rel_error_vs_builtin_eager']:.1e}; adjoint "
            f"{row['adjoint_rel_error']:.1e}; first products {first:.1f}s")
        if max(row["jvp_rel_error_vs_builtin_eager"], row["vjp_rel_error_vs_builtin_eager"]) > 1e-10:
            raise RuntimeError(f"{name} disagrees with the builtin eager products: {row}")
    # timing: the cases interleaved, round by round, so host load hits them alike
    times = {name: {"jvp": [], "vjp": []} for name, _, _ in cases}
    for _ in range(repeats):
        for name, op, backend in cases:
            times[name]["jvp"].append(_best(lambda: op.matmat(V), 1)[0])
            times[name]["vjp"].append(_best(lambda: op.rmatmat(W), 1)[0])
    for name, _, _ in cases:
        row = out["cases"][name]
        tj, tv = min(times[name]["jvp"]), min(times[name]["vjp"])
        row.update(jvp_seconds_per_vector=tj / block, vjp_seconds_per_vector=tv / block,
                   jvp_per_vector_R=tj / block / R_b, vjp_per_vector_R=tv / block / R_b,
                   jvp_all_seconds=times[name]["jvp"], vjp_all_seconds=times[name]["vjp"])
        log(f"[{name}] block {block}: JVP {tj / block * 1e3:.1f} ms/vector ({tj / block / R_b:.3f} R),"
            f" VJP {tv / block * 1e3:.1f} ms/vector ({tv / block / R_b:.3f} R)")
    base = out["cases"]["builtin_eager"]
    ratios = {}
    for name in out["cases"]:
        if name.startswith("user_"):
            c = out["cases"][name]
            ratios[f"{name}/builtin_eager"] = {
                "jvp": c["jvp_seconds_per_vector"] / base["jvp_seconds_per_vector"],
                "vjp": c["vjp_seconds_per_vector"] / base["vjp_seconds_per_vector"]}
    f = out["cases"]["builtin_fused"]
    ratios["builtin_fused/builtin_eager"] = {
        "jvp": f["jvp_seconds_per_vector"] / base["jvp_seconds_per_vector"],
        "vjp": f["vjp_seconds_per_vector"] / base["vjp_seconds_per_vector"]}
    out["ratios"] = ratios
    # the torch.func path: autotune picks the faster of its two uncompiled backends per run
    generic = [n for n in ("user_generic_eager/builtin_eager",
                           "user_generic_double_backward/builtin_eager") if n in ratios]
    out["user_auto_backend"] = op_uf.backend
    out["targets"] = {
        "user module as users get it (recognised MLP chain, backend auto)/builtin_eager <= 1.5":
            ratios["user_auto/builtin_eager"],
        "user module, eager backend (recognised)/builtin_eager <= 1.5":
            ratios["user_eager/builtin_eager"],
        "not recognised: torch.func (best of eager, double-backward)/builtin_eager (was the "
        "target before MLP chains were recognised)": {
            d: min(ratios[n][d] for n in generic) for d in ("jvp", "vjp")},
        "user_compiled (recognised)/builtin_eager <= 1.0": ratios.get(
            "user_compiled/builtin_eager"),
        "not recognised: user_generic_compiled/builtin_eager": ratios.get(
            "user_generic_compiled/builtin_eager")}
    for k, v in ratios.items():
        log(f"ratio {k}: JVP {v['jvp']:.2f}x, VJP {v['vjp']:.2f}x")
    out["peak_rss_mib_after"] = _rss_mib()
    return out


class _OutOfTime(Exception):
    pass


def cnn_target(*, n_train, n_test, epochs, k, tol, block, backends, solve_minutes, autotune_steps,
               log, method="randomized", solve_block=None):
    t_all = time.perf_counter()
    data = mnist_like(n_train, n_test)
    r = tjac.Recipe.paper(model=bn_cnn, dataset=data, batch_size=128, epochs=epochs)
    t = time.perf_counter()
    op = tjac.TrainingJacobian(r, backend="eager", block_size=block)
    traj = time.perf_counter() - t
    prob = op.problem
    P = op.shape[0]
    R = min(plain_run_seconds(prob) for _ in range(2))
    acc = {}
    try:
        res = tjac.train(prob)
        acc = {key: float(getattr(res, key)) for key in
               ("train_loss", "test_loss", "train_acc", "test_acc") if hasattr(res, key)}
    except Exception as e:  # noqa: BLE001 (reported, not fatal: the operator is what we measure)
        acc = {"error": f"{type(e).__name__}: {e}"}
    log(f"P={P} T={op.num_steps} R={R:.2f}s trajectory pass {traj:.1f}s ({traj / R:.2f} R); "
        f"training {acc}")
    out = {"recipe": r.to_dict(), "user_model": "bench_user:bn_cnn (live)",
           "data": f"mnist_like({n_train}, {n_test}, seed=0): 1x28x28 float32 in [0, 1]",
           "P": P, "T": op.num_steps, "R_seconds": R, "trajectory_seconds": traj,
           "training": acc, "block": block, "backends": {}}
    # Accuracy first, on one vector at full length (a full eager block of 24 costs minutes here):
    # eager's adjoint identity, then compiled against eager. Costs per vector at the solver's
    # block come from autotune's partial replays (JVP, `steps` steps) and from the solve itself.
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(P, 1, generator=gen, dtype=torch.float64)
    w = torch.randn(P, 1, generator=gen, dtype=torch.float64)
    names = (["eager"] + (["double-backward"] if "double-backward" in backends else [])
             + (["compiled"] if "compiled" in backends and tjac.replay.compiler_available()
                else []))
    ref = None
    for name in names:
        op.backend = name
        t = time.perf_counter()
        JV = op.matmat(v)
        first_j = time.perf_counter() - t
        t = time.perf_counter()
        JtW = op.rmatmat(w)
        first_v = time.perf_counter() - t
        row = {}
        if name == "compiled":  # compile (width 1) + the built-in eager check; then time again
            row.update(first_jvp_seconds_incl_compile_and_eager_check=first_j,
                       first_vjp_seconds_incl_compile_and_eager_check=first_v,
                       fallback=dict(op._replay.fallback))
            first_j, JV = _best(lambda: op.matmat(v), 1)
            first_v, JtW = _best(lambda: op.rmatmat(w), 1)
        if ref is None:
            ref = (JV, JtW)
        row.update(adjoint_rel_error=_adjoint(JV, w, v, JtW), jvp_rel_error_vs_eager=_rel(JV, ref[0]),
                   vjp_rel_error_vs_eager=_rel(JtW, ref[1]), block1_jvp_seconds=first_j,
                   block1_vjp_seconds=first_v, block1_jvp_R=first_j / R, block1_vjp_R=first_v / R)
        out["backends"][name] = row
        log(f"[{name}] one vector: JVP {first_j:.1f}s ({first_j / R:.2f} R), VJP {first_v:.1f}s "
            f"({first_v / R:.2f} R); adjoint {row['adjoint_rel_error']:.1e}, vs eager "
            f"{row['jvp_rel_error_vs_eager']:.1e} / {row['vjp_rel_error_vs_eager']:.1e}")
        if row["adjoint_rel_error"] > 1e-10 or max(row["jvp_rel_error_vs_eager"],
                                                   row["vjp_rel_error_vs_eager"]) > 1e-10:
            raise RuntimeError(f"[{name}] inaccurate products: {row}")
    t = time.perf_counter()
    sb = solve_block or (block if method == "randomized" else 1)  # the solver's block width
    blocks = tuple(sorted({1, 4, sb, block})) if method != "randomized" else (block,)
    tuned = op.autotune(blocks=blocks, backends=names, steps=autotune_steps,
                        compile_threshold_s=0.0)
    sps = tuned.get("seconds_per_vector_step", {})
    out["autotune"] = {"pick": {"backend": tuned["backend"], "block": tuned["block"]},
                       "steps": autotune_steps, "seconds": time.perf_counter() - t,
                       "seconds_per_vector_step": sps, "skipped": tuned.get("skipped")}
    for name in names:
        for b_, s_ in sorted((sps.get(name) or {}).items(), key=lambda kv: int(kv[0])):
            out["backends"][name].setdefault("jvp_seconds_per_vector_from_autotune", {})[b_] = \
                s_ * op.num_steps
            log(f"[{name}] block {b_} (autotune, {autotune_steps} steps): JVP "
                f"{s_ * op.num_steps:.2f}s/vector ({s_ * op.num_steps / R:.2f} R)")
    log(f"autotune picked {tuned['backend']} / block {tuned['block']} "
        f"({out['autotune']['seconds']:.0f}s)")
    # the solve's backend: the fastest per vector at the solver's block; its replays (the fresh
    # residuals' blocks of k too) at the block that backend runs fastest per vector
    cand = {n: (sps.get(n) or {}).get(str(sb)) for n in names}
    cand = {n: c for n, c in cand.items() if c is not None}
    fastest = min(cand, key=cand.get) if cand else tuned["backend"]
    per_b = {int(b_): s_ for b_, s_ in (sps.get(fastest) or {}).items() if int(b_) >= sb}
    if method == "auto":  # as users get it: the operator as autotune left it, svd's own choice
        fastest = op.backend
    else:
        op.backend = fastest
        op.block_size = min(per_b, key=per_b.get) if per_b else sb
    per_vs = (sps.get(fastest) or {}).get(str(sb), 0.0) * op.num_steps
    per_pass = 2 * sb * per_vs  # J^T and J on one solver block, assuming VJP ~ JVP
    out["solve_backend"] = fastest
    out["solve_replay_block"] = op.block_size
    tm0, tr0 = op.time_matvec, op.time_rmatvec
    log(f"solve: top-{k}, tol {tol}, {method} (block {sb}) on {fastest} (replays of up to "
        f"{op.block_size}): one step (J and J^T on {sb} vectors) ~{per_pass:.0f}s measured; "
        f"cap {solve_minutes} min")
    history, t0 = [], time.perf_counter()
    r0, p0 = op.num_replays, op.num_matvecs + op.num_rmatvecs
    mv0, rv0 = op.num_matvecs, op.num_rmatvecs
    cap = solve_minutes * 60

    def on_pass(h):
        h = dict(h, elapsed_s=time.perf_counter() - t0, replays=op.num_replays - r0,
                 products=op.num_matvecs + op.num_rmatvecs - p0)
        h.pop("expected_products", None)
        if h.get("checked", True):  # Lanczos: steps with a Ritz extraction; randomized: all
            history.append(h)
            log(f"  step {h.get('iteration', h.get('step'))}: basis {h['basis']}, sigma_max "
                f"{h['sigma_max']:.4g}, max residual {h['max_residual']:.1e}, "
                f"{h['n_converged']}/{k} converged, {h['elapsed_s']:.0f}s, {h['products']} "
                f"products")
        if h["n_converged"] < k and h["elapsed_s"] + per_pass > cap:
            raise _OutOfTime
    solve = {"k": k, "tol": tol, "method": method, "block": sb, "replay_block": op.block_size,
             "backend": fastest, "cap_minutes": solve_minutes}
    try:
        s = tjac.svd(op, k, which="top", tol=tol, method=method, callback=on_pass,
                     **({} if method == "auto" else {"block": sb}))
        cert = s.certificate / float(s.S[0])
        solve.update(plan=s.plan, chosen_method=s.method)
        log(f"plan: {s.plan['method']} ({s.plan['reason']})")
        solve.update(status="certified" if bool(s.converged.all()) else "not converged",
                     wall_seconds=s.wall_time, sigma=[float(x) for x in s.S],
                     max_residual_rel=float(s.residuals.max() / s.S[0]),
                     max_certificate_rel=float(cert.max()), converged=int(s.converged.sum()),
                     products=s.num_matvecs + s.num_rmatvecs)
        log(f"certified top-{k} in {s.wall_time:.0f}s ({solve['products']} products); sigma "
            f"{[round(x, 4) for x in solve['sigma']]}; max residual {solve['max_residual_rel']:.1e}")
    except _OutOfTime:
        el = time.perf_counter() - t0
        rate = el / max(1, history[-1]["products"] if history else 1)  # seconds per product
        rs = [h["max_residual"] for h in history if h["max_residual"] > 0]
        solve.update(status="stopped at the wall-clock cap", wall_seconds=el,
                     seconds_per_product=rate,
                     last_sigma_max=history[-1]["sigma_max"] if history else None,
                     last_max_residual=rs[-1] if rs else None)
        log(f"stopped after {el:.0f}s ({rate:.1f}s per product)")
    except tjac.linalg.ConvergenceError as e:  # partial result carried by the error
        s = e.result
        solve.update(status="ConvergenceError", message=str(e), sigma=[float(x) for x in s.S],
                     converged=int(s.converged.sum()))
    solve.update(replays=op.num_replays - r0, products_counted=op.num_matvecs + op.num_rmatvecs - p0,
                 history=history, jvp_seconds=op.time_matvec - tm0, vjp_seconds=op.time_rmatvec - tr0)
    # per-vector costs at the solver's block on the solve's backend (first VJP includes its compile)
    nj, nv = op.num_matvecs - mv0, op.num_rmatvecs - rv0
    if nj and nv:
        row = out["backends"][fastest]
        row.update(solve_jvp_seconds_per_vector=solve["jvp_seconds"] / nj,
                   solve_vjp_seconds_per_vector=solve["vjp_seconds"] / nv,
                   solve_jvp_per_vector_R=solve["jvp_seconds"] / nj / R,
                   solve_vjp_per_vector_R=solve["vjp_seconds"] / nv / R)
        log(f"[{fastest}] in the solve (block {sb}): JVP {solve['jvp_seconds'] / nj:.2f}s/vector "
            f"({solve['jvp_seconds'] / nj / R:.2f} R), VJP {solve['vjp_seconds'] / nv:.2f}s/vector "
            f"({solve['vjp_seconds'] / nv / R:.2f} R)")
    out["solve"] = solve
    out["peak_rss_mib_after"] = _rss_mib()
    out["total_seconds"] = time.perf_counter() - t_all
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true",
                    help="1-epoch MLP, a tiny CNN problem (256 examples, 1 epoch), eager only")
    ap.add_argument("--targets", default="mlp,cnn")
    ap.add_argument("--backends", default="eager,double-backward,compiled",
                    help="user-module backends")
    ap.add_argument("--solve-minutes", type=float, default=30.0,
                    help="wall-clock cap on the top-16 solve (then: rate and projection)")
    ap.add_argument("--autotune-steps", type=int, default=2,
                    help="steps per candidate in the CNN's op.autotune (which picks the solve's backend)")
    ap.add_argument("--solver", default="auto", choices=("auto", "randomized", "lanczos"),
                    help="the CNN's top-k solver (auto: tjac.svd's choice from the operator's "
                         "autotune measurements, as users get it)")
    ap.add_argument("--solve-block", type=int, default=None,
                    help="the solver's block width (default: k + 8 for randomized, 1 for "
                         "lanczos; auto chooses its own)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.manual_seed(0)
    out = a.out or os.path.join(os.path.dirname(__file__), "results",
                                "user-quick.json" if a.quick else "user-models.json")
    backends = ("eager",) if a.quick else tuple(a.backends.split(","))
    targets = a.targets.split(",")
    t0 = time.perf_counter()

    def log(s):
        print(f"[{time.perf_counter() - t0:7.1f}s] {s}", flush=True)

    res = {"torch_threads": torch.get_num_threads(), "results": {},
           "note": "ratios side by side in one process; R = one plain training run (tjac's trainer)"}
    if "mlp" in targets:
        log("target 1: the paper's MLP as a user nn.Module vs the built-in MLP")
        res["results"]["mlp"] = mlp_target(epochs=1 if a.quick else 5, block=32,
                                           repeats=1 if a.quick else 3, backends=backends, log=log)
        _write(out, res)
    if "cnn" in targets:
        log("target 2: CNN + BatchNorm on MNIST-shaped arrays, top-16")
        kw = dict(n_train=256, n_test=64, epochs=1, k=4, block=12) if a.quick else \
            dict(n_train=2048, n_test=512, epochs=2, k=16, block=24)
        res["results"]["cnn"] = cnn_target(tol=1e-6, backends=backends, solve_minutes=a.solve_minutes,
                                           autotune_steps=a.autotune_steps, log=log,
                                           method=a.solver, solve_block=a.solve_block, **kw)
    res["peak_rss_mib"] = _rss_mib()
    res["wall_seconds"] = time.perf_counter() - t0
    _write(out, res)
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
