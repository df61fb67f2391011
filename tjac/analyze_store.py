r"""Analyses of a stored run, stored in it (the pure functions live in :mod:`tjac.analysis`; this
module applies them to a store and commits what they return): :func:`analyze` runs the paper's experiments
(:mod:`tjac.analysis`) and :func:`analyze_density` the matrix-free counts and density, and each
result is committed to ``runs/<id>/analyses/<name>``.

Singular vectors come from the run's committed top and bottom solves (no dense J), or, with
``dense=True``, from a full SVD of J formed through products (small P only). Without the dense
path the bulk has no explicit singular vectors, so each experiment that needs bulk directions says
what stands for them (attribute ``notes``):

* ``perturbation`` (bulk), ``ood``, ``jacobian-null``: the structural sigma = 1 directions
  (:mod:`tjac.analysis.structural`): exactly in the bulk, but only part of it;
* ``restricted``: random k-planes inside the orthogonal complement of the computed top and bottom
  subspaces (the bulk lies there; so do the uncomputed chaotic and stable directions), and that
  whole complement for "bulk (all)";
* ``movement``: the top and bottom directions and the structural sigma = 1 directions; the rest
  of ||theta_T - theta_0||^2 is ``share_outside``.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import torch

from . import query, rebuild, store
from .query import Triplets
from .analysis.regions import COUNT_EPSILONS, REGIONS
from .analysis.experiments import (AnalysisResult, _need_solve, check_eps, check_eps_grid,
                                   complement_basis, movement, overlap_runs, random_basis,
                                   regions_of, subspace_overlap)

log = logging.getLogger(__name__)

WHAT = ("movement", "overlap", "perturbation", "restricted", "ood", "jacobian-null", "bulk",
        "density")
DENSE_MAX_P = 8000


def _stored(run, which):
    """The run's stored solve at ``which`` with its singular vectors loaded (None: not solved)."""
    try:
        run.sigma(which)
    except KeyError:
        return None
    t = run._triplets(which, None)
    u, v = run.vectors(which, slice(0, len(t.sigma)))
    return replace(t, U=np.asarray(u, np.float64).T, V=np.asarray(v, np.float64).T)


def _dense(problem, run) -> tuple[Triplets, object]:
    """All P triplets of the formed J and the problem whose training reproduced theta_T."""
    from .linalg import materialize

    P = run.P
    if P > DENSE_MAX_P:
        raise ValueError(f"--dense forms J (P x P); P = {P} > {DENSE_MAX_P}: use the stored solves")
    op = rebuild.operator_of(run, problem)  # theta_T checked against the stored one
    U, S, Vh = torch.linalg.svd(materialize(op))
    return Triplets.from_svd(S.cpu().numpy(), U.cpu().numpy(), Vh.T.cpu().numpy()), op.problem


def _check_what(what) -> list[str]:
    if what is None:
        return list(WHAT)
    if isinstance(what, str):
        what = [w.strip() for w in what.split(",") if w.strip()]
    bad = [w for w in what if w not in WHAT]
    if bad or not what:
        raise ValueError(f"unknown analysis {', '.join(map(repr, bad)) or 'list (empty)'}; "
                         f"expected one of {', '.join(WHAT)}")
    return list(dict.fromkeys(what))


# left out of "all that apply" where they cannot run
_OPTIONAL = ("overlap", "ood", "jacobian-null", "density")


def _applicable(todo, explicit, run, oth, problem, ones, top, bottom, *, dense, eps, eps_grid,
                ks) -> list[str]:
    """``todo`` with every analysis' preconditions checked before any work: one asked for by name
    that cannot run is refused (ValueError, one line; nothing computed or written); of "all that
    apply" (``explicit`` False) the optional ones that cannot run are left out and the others
    refused."""
    from .analysis.bulk import MAX_DENSE_P

    P, out = run.P, []

    def need(r, which):
        try:
            _need_solve(r, which)
        except ValueError as e:
            return str(e)

    def why(w):
        if w == "overlap":
            if oth is None:
                return "analysis 'overlap' needs a second run (--other RUN, e.g. another seed)"
            if oth.P != P:
                return (f"analysis 'overlap' compares runs of one P: run {run.id!r} has P = {P}, "
                        f"run {oth.id!r} P = {oth.P}")
            if not (dense and set(todo) - {"bulk", "overlap"}) and not any(
                    _stored(run, e) is not None and _stored(oth, e) is not None
                    for e in ("top", "bottom")):
                return ("analysis 'overlap' needs the same solve (top or bottom) in both runs; "
                        + (need(run, "top") or need(oth, "top")))
        if w == "density" and not eps < 1:
            return f"analysis 'density' counts |sigma - 1| <= eps for eps in (0, 1), got {eps}"
        if w == "ood" and problem.recipe.loss != "cross_entropy":
            return (f"analysis 'ood' compares class probabilities: it needs loss 'cross_entropy', "
                    f"not {problem.recipe.loss!r}")
        if w == "jacobian-null" and P > MAX_DENSE_P:
            return (f"analysis 'jacobian-null' forms G^T G densely (P x P); P = {P} > "
                    f"{MAX_DENSE_P}")
        if w == "jacobian-null" and not dense and ones.basis.shape[1] == 0:
            return ("analysis 'jacobian-null' has no bulk directions without the dense path: this "
                    "recipe has no structural sigma = 1 directions; rerun with --dense (small P)")
        if not dense and top is None and (w == "perturbation" or (
                bottom is None and w in ("movement", "ood", "restricted"))):
            return need(run, "top")
        if w == "perturbation" and eps_grid is not None:
            check_eps_grid(eps_grid)
        if w == "restricted" and (not ks or any(isinstance(k, bool) or not isinstance(k, int)
                                                or k < 1 for k in ks)):
            return f"analysis 'restricted': `ks` must hold positive integers, got {list(ks)}"
        return None

    for w in todo:
        reason = why(w)
        if reason is None:
            out.append(w)
        elif explicit or w not in _OPTIONAL:
            raise ValueError(reason)
        else:
            log.info("analysis %r left out: %s", w, reason)
    if dense and set(out) - {"bulk", "overlap"} and P > DENSE_MAX_P:
        raise ValueError(f"--dense forms J (P x P); P = {P} > {DENSE_MAX_P}: use the stored solves")
    return out


def analyze(store_path, run_id: str, what=None, *, other: str | None = None, eps: float = 1e-3,
            dense: bool = False, rng: int = 0, eps_grid=None, ks=(1, 2, 4, 8, 16, 32),
            k_ood: int = 8, n_random: int = 20, commit: bool = True, log_fn=None) -> dict:
    """Run the experiments ``what`` (names in :data:`WHAT`, a list or comma-separated; None: all
    that apply: ``overlap`` needs ``other``, a second run of the same P) on run ``run_id`` and
    store each (``commit``). Returns {analysis name: :class:`AnalysisResult`}, with the seconds each
    took in its attrs (``seconds``)."""
    import time

    from .analysis.structural import structural_ones

    explicit = what is not None
    todo = _check_what(what)
    if not explicit:
        todo.remove("density")  # costs products (or a dense J): asked for by name only
    eps = check_eps(eps)
    res = query.open(store_path)
    run = res.run(run_id)
    oth = res.run(other) if other is not None else None
    top, bottom = _stored(run, "top"), _stored(run, "bottom")
    problem = rebuild.problem_of(run)  # the stored data, recipe and theta_0, or refused
    ones = structural_ones(problem)
    todo = _applicable(todo, explicit, run, oth, problem, ones, top, bottom, dense=dense, eps=eps,
                       eps_grid=eps_grid, ks=ks)
    # theta_T retrained and checked before any product or write (the dense path's operator's own
    # training checks it; analyze_density checks its operator's)
    full = full_other = None
    if dense and set(todo) - {"bulk", "overlap"}:
        full, problem = _dense(problem, run)
    elif set(todo) - {"density"}:
        problem = rebuild.trained(run, problem)
    if full is not None and "overlap" in todo:
        full_other, _ = _dense(rebuild.problem_of(oth), oth)
    P = run.P
    out = {}
    say = log_fn or (lambda s: None)
    ctx = _Ctx(run, oth, problem, full, top, bottom, ones, eps, rng, P, full_other)
    jobs = {"movement": lambda: [ctx.movement()],
            "overlap": lambda: ctx.overlap(n_random),
            "perturbation": lambda: ctx.perturbation(eps_grid),
            "restricted": lambda: [ctx.restricted(ks)],
            "ood": lambda: [ctx.ood(k_ood)],
            "jacobian-null": lambda: [ctx.jacobian_null()],
            "bulk": lambda: [ctx.bulk()],
            "density": lambda: _density(store_path, run_id, eps, rng)}
    for w in todo:
        t = time.perf_counter()
        results = jobs[w]()
        dt = time.perf_counter() - t
        for r in results:
            r.attrs.setdefault("source", full.method if full is not None else "solves")
            r.attrs["seconds"] = dt / len(results)
            if commit and not r.attrs.get("committed"):
                commit_result(r, store_path, run_id)
            out[r.name] = r
            say(key_numbers(r))
    return out


class _Ctx:
    def __init__(self, run, other, problem, full, top, bottom, ones, eps, rng, P, full_other=None):
        self.run, self.other, self.problem, self.full = run, other, problem, full
        self.full_other = full_other
        self.top, self.bottom, self.ones, self.eps, self.rng, self.P = top, bottom, ones, eps, rng, P

    # the directions -------------------------------------------------------------------------------
    def ends(self):
        """(sigma, U, V) of the known triplets: all (dense) or top then bottom."""
        if self.full is not None:
            return self.full.sigma, self.full.U, self.full.V
        parts = [t for t in (self.top, self.bottom) if t is not None]
        if not parts:
            _need_solve(self.run, "top")
        if len(parts) == 2 and len(self.top.sigma) + len(self.bottom.sigma) > self.P:
            keep = self.P - len(self.top.sigma)  # the bottom's last ones are the top's
            parts[1] = parts[1].head(keep)
        return (np.concatenate([p.sigma for p in parts]), np.concatenate([p.U for p in parts], 1),
                np.concatenate([p.V for p in parts], 1))

    def bulk_basis(self):
        """(V ordered nearest sigma = 1 first, sigma, U, note) of the bulk at eps."""
        if self.full is not None:
            s = self.full.sigma
            order = np.argsort(np.abs(s - 1), kind="stable")
            order = order[np.abs(s[order] - 1) <= self.eps]
            return self.full.V[:, order], s[order], self.full.U[:, order], "dense SVD"
        B = self.ones.basis.cpu().numpy()
        if B.shape[1] == 0:
            raise ValueError("no bulk directions without the dense path: this recipe has no "
                             "structural sigma = 1 directions; rerun with --dense (small P)")
        return B, np.ones(B.shape[1]), B, ("structural sigma = 1 directions (exact, a subset of "
                                          "the bulk)")

    # the experiments --------------------------------------------------------------------------------
    def movement(self):
        s, _, V = self.ends()
        delta = np.asarray(self.run.thetaT(), np.float64) - np.asarray(self.run.theta0(), np.float64)
        note = "all P directions (dense)"
        if self.full is None:
            note = "top and bottom directions; share_outside is the rest"
            B = self.ones.basis.cpu().numpy()
            if B.shape[1] and float(np.abs(V.T @ B).max()) <= 1e-6:  # exact sigma = 1, apart
                V, s = np.concatenate([V, B], 1), np.concatenate([s, np.ones(B.shape[1])])
                note = ("top and bottom directions and the structural sigma = 1 directions; "
                        "share_outside is the rest")
        r = movement(delta, V, sigma=s, eps=self.eps)
        r.attrs["notes"] = note
        return r

    def overlap(self, n_random):
        out = []
        for which in ("top", "bottom"):
            have = [_stored(r, which) is not None for r in (self.run, self.other)]
            if all(have):
                out.append(overlap_runs(self.run, self.other, which, n_random=n_random, rng=self.rng))
        if self.full is not None:
            A = self.bulk_basis()[0]
            Bf = self.full_other
            o = np.argsort(np.abs(Bf.sigma - 1), kind="stable")
            o = o[np.abs(Bf.sigma[o] - 1) <= self.eps]
            r = subspace_overlap(A, Bf.V[:, o], n_random=min(n_random, 5), rng=self.rng,
                                 name="overlap-bulk")
            r.attrs.update(which="bulk", run=self.run.id, other=self.other.id)
            out.append(r)
        if not out:
            _need_solve(self.other, "top")
        return out

    def perturbation(self, eps_grid):
        from .analysis.response import EPS_GRID, perturbation_response

        grid = EPS_GRID if eps_grid is None else eps_grid
        s, U, V = self.ends()
        i = int(np.argmax(s))
        out = [perturbation_response(self.problem, V[:, i], U[:, i], float(s[i]), grid,
                                     name="perturbation-top")]
        out[0].attrs["notes"] = "largest singular value"
        if self.full is None and self.ones.basis.shape[1] == 0:
            return out  # no bulk direction known without the dense path
        Vb, sb, Ub, note = self.bulk_basis()
        if self.full is not None:  # a bulk direction that is not exactly 1 (median |sigma - 1|)
            d = np.abs(sb - 1)
            cand = np.flatnonzero(d > 1e-12)
            j = int(cand[len(cand) // 2]) if len(cand) else 0
        else:
            j = 0
        r = perturbation_response(self.problem, Vb[:, j], Ub[:, j], float(sb[j]), grid,
                                  name="perturbation-bulk")
        r.attrs["notes"] = note
        return out + [r]

    def restricted(self, ks):
        from .analysis.restricted import Complement, Whole, restricted_sweep

        K = max(ks)
        subs, notes = {}, {}
        if self.full is not None:
            s, V = self.full.sigma, self.full.V
            subs["top"], subs["bottom"] = V, V[:, ::-1]
            Vb = self.bulk_basis()[0]
            subs["bulk"] = Vb
            nonbulk = V[:, np.abs(s - 1) > self.eps]
            if nonbulk.shape[1]:
                subs["complement_of_bulk"] = Whole(nonbulk)
            subs["bulk_all"] = Whole(Vb)
            notes["bulk"] = "dense SVD, nearest sigma = 1 first"
        else:
            _, _, V = self.ends()
            if self.top is not None:
                subs["top"] = self.top.V
            if self.bottom is not None:
                subs["bottom"] = self.bottom.V
            subs["bulk"] = complement_basis(V, min(K, self.P - V.shape[1]), self.rng)
            subs["complement_of_bulk"] = Whole(V)
            subs["bulk_all"] = Complement(V)
            notes.update(bulk="random k-planes in the orthogonal complement of the computed top "
                              "and bottom subspaces",
                         complement_of_bulk="span of the computed top and bottom directions",
                         bulk_all="the whole orthogonal complement of the computed top and bottom")
        subs["random"] = random_basis(self.P, min(K, self.P), self.rng)
        return restricted_sweep(self.problem, subs, ks, notes=notes)

    def ood(self, k):
        from .analysis.response import ood_kl

        s, _, V = self.ends()
        n = len(s)
        if self.full is not None:
            idx = np.r_[np.arange(min(k, n)), np.arange(max(n - k, 0), n)]
        else:
            nt = 0 if self.top is None else len(self.top.sigma)
            idx = np.r_[np.arange(min(k, nt)), nt + np.arange(min(k, n - nt))]
        if self.full is None and self.ones.basis.shape[1] == 0:
            Vb, sb, note = V[:, :0], s[:0], "none known without the dense path"
        else:
            Vb, sb, _, note = self.bulk_basis()
        dirs = np.concatenate([V[:, idx], Vb[:, :k]], 1)
        sig = np.concatenate([s[idx], sb[:k]])
        r = ood_kl(self.problem, self.run.thetaT(), dirs, sigma=sig, eps=self.eps,
                   rng=self.rng)
        r.attrs["notes"] = f"top and bottom {k}; bulk directions: {note}"
        return r

    def jacobian_null(self):
        from .analysis.bulk import output_jacobian_null

        Vb, _, _, note = self.bulk_basis()
        r = output_jacobian_null(self.problem, self.run.thetaT(), Vb, rng=self.rng)
        r.attrs["notes"] = f"bulk directions: {note}"
        return r

    def bulk(self):
        from .analysis.bulk import predict_bulk

        if self.full is not None:
            measured = int((np.abs(self.full.sigma - 1) <= self.eps).sum())
        else:
            measured = known_regions(self.run, self.eps, self.problem)
        return predict_bulk(self.problem, self.eps, measured=measured)


def _density(store_path, run_id, eps, seed) -> list:
    """Matrix-free region counts at 1e-2 and ``eps`` and the density
    (:func:`analyze_density`, which stores ``counts`` and ``density``)."""

    got = analyze_density(store_path, run_id, eps=tuple(sorted({1e-2, float(eps)}, reverse=True)),
                          seed=seed)
    info = {k: got[k] for k in ("method", "probes", "steps", "products", "deflated_top")}
    counts = {repr(e): {r: [c["estimate"], c["lower"], c["upper"]] for r, c in v.items()}
              for e, v in got["counts"].items()}
    return [AnalysisResult("counts", {}, {**info, "counts": counts, "committed": True})]



def analyze_density(path, run_id: str, *, eps=COUNT_EPSILONS, probes: int = 16, seed: int = 0,
                    rtol: float = 0.05, max_steps: int = 2000, method: str = "auto",
                    deflate_top: bool = True, bandwidth: float = 0.05, op=None,
                    confidence: float = 0.95, reorth: str = "full") -> dict:
    """Region counts at each ``eps`` (with brackets) and the density of a stored run, written to
    its ``analyses/counts`` and ``analyses/density``. The operator is rebuilt from the stored
    recipe (or passed as ``op``); with ``deflate_top`` the run's certified top triplets are
    deflated (counted exactly). One quadrature serves every ``eps``: its steps are those the
    smallest ``eps`` needs for the bulk count to reach ``rtol``. ``reorth``: the Lanczos
    vectors' reorthogonalization (:func:`tjac.analysis.slq`; 'auto' drops it only when the full
    basis would not fit). The operator (rebuilt or given) must be the run's: its data, recipe hash,
    theta_0 and theta_T are checked against the stored ones before any product
    (:mod:`tjac.rebuild`; :class:`tjac.store.StoreError` otherwise, nothing written)."""
    eps = tuple(float(e) for e in eps)
    if not eps or any(not 0 < e < 1 for e in eps):
        raise ValueError(f"every eps must be in (0, 1), got {eps!r}")
    run = query.open(path).run(run_id)
    if op is None:  # the stored data, recipe, theta_0 and theta_T, or refused
        op = rebuild.operator_of(run)
    else:
        if op.shape[0] != run.P:
            raise ValueError(f"the operator has P = {op.shape[0]}, run {run_id!r} has P = "
                             f"{run.P}")
        rebuild.same_inputs(run, run.id, op.problem, "analyze")
        rebuild.check_thetaT(run, op.thetaT, op.problem)
    deflate, n_defl = None, 0
    if deflate_top:
        try:
            t = run.top()
            keep = np.flatnonzero(t.certified)
            keep = keep[keep == np.arange(len(keep))]  # a certified prefix of the top
            if len(keep):
                _, v = run.vectors("top", slice(0, len(keep)))
                Vt = torch.linalg.qr(torch.from_numpy(v.T.copy()))[0]
                deflate, n_defl = (Vt, t.sigma[: len(keep)]), len(keep)
        except KeyError:
            pass
    e0 = min(eps)
    from .analysis.density import count_regions, slq

    q = slq(op, probes=probes, steps=max_steps, seed=seed, deflate=deflate,
            target=(max(1 - e0, 0.0), 1 + e0), rtol=rtol, method=method, reorth=reorth)
    counts = {e: count_regions(q, e, confidence=confidence) for e in eps}
    dens = q.density(bandwidth=bandwidth)
    common = {"method": q.method, "probes": q.probes, "steps": q.steps, "products": q.products,
              "seconds": q.seconds, "seed": seed, "rtol": rtol, "confidence": confidence,
              "deflated_top": n_defl, "sigma_max": q.sigma_max, "P": q.P,
              "max_steps": max_steps, "reorth": q.reorth}
    arrays = {"eps": (np.array(eps), ("eps",))}
    for r in REGIONS:
        for f in ("estimate", "lower", "upper", "stderr"):
            arrays[f"{r}_{f}"] = (np.array([getattr(counts[e][r], f) for e in eps]), ("eps",))
        # the quadrature part of the bracket reached rtol of the count (else: a wider bracket)
        arrays[f"{r}_resolved"] = (np.array([q.resolved(counts[e][r], rtol) for e in eps]),
                                   ("eps",))
    with store.Writer(path, create=False) as w:
        g = w.run(run_id)
        w.commit_analysis(g, "counts", arrays=arrays, attrs=common)
        w.commit_analysis(g, "density", arrays={
            "log10_sigma": (dens.log10_sigma, ("grid",)), "density": (dens.density, ("grid",)),
            "stderr": (dens.stderr, ("grid",))}, attrs={**common, "bandwidth": dens.bandwidth})
    return {"counts": {e: {r: c.as_dict() for r, c in counts[e].items()} for e in eps},
            "density": dens, **common}


def commit_result(result: AnalysisResult, store_path, run_id: str) -> None:
    """Store ``result`` as ``runs/<run_id>/analyses/<name>`` (replacing an earlier one of that
    name) by the store's commit protocol."""
    clash = sorted({"k", *store.COUNTERS} & set(result.attrs))
    if clash:  # the store reads these as a group's commit counter (tjac.store.committed)
        raise ValueError(f"analysis attributes may not be named {clash}")
    with store.Writer(store_path, create=False) as w:
        if not w.has_run(run_id):
            raise store.StoreError(f"no run {run_id!r} in {store_path!r}")
        w.commit_analysis(w.run(run_id), result.name, arrays=result.arrays, attrs=result.attrs)


def key_numbers(r: AnalysisResult) -> str:
    """One line of the numbers that matter for an analysis."""
    a = r.attrs
    f = (lambda x: "n/a" if x is None else f"{x:.3g}")
    if r.name == "counts":
        return "counts: " + "; ".join(
            f"eps={e}: " + ", ".join(f"{n} {v[0]:.0f} [{v[1]:.0f}, {v[2]:.0f}]"
                                     for n, v in d.items())
            for e, d in a["counts"].items()) + f" ({a['method']}, {a['products']:,} products)"
    if r.name == "movement":
        parts = [f"{n} {f(a.get('share_' + n))}" for n in ("chaotic", "bulk", "stable")
                 if ("share_" + n) in a]
        return (f"movement: norm(theta_T - theta_0) = {a['delta_norm']:.4g}; share of its square: "
                f"{', '.join(parts)}, outside the known directions {f(a['share_outside'])}")
    if r.name.startswith("overlap"):
        return (f"{r.name}: geodesic {a['geodesic']:.3f} (random {f(a['random_geodesic'])}), mean "
                f"cos^2 {a['mean_cos2']:.3f} (random {f(a['random_mean_cos2'])})")
    if r.name.startswith("perturbation"):
        return (f"{r.name}: sigma {a['sigma']:.6g}, linear response up to eps = "
                f"{f(a['linear_up_to'])}; diverged at {a['n_diverged']} of {len(r['eps'])} eps")
    if r.name == "restricted":
        te = r["test_acc"]
        k = r["k"]
        rows = [f"{n} {f(te[i][np.isfinite(te[i])][-1]) if np.isfinite(te[i]).any() else 'n/a'}"
                for i, n in enumerate(a["subspaces"])]
        fixed = [f"{n} (k={v['k']}) {f(v['test_acc'])}" for n, v in a["fixed"].items()]
        return (f"restricted: test acc at the largest k <= {int(k[-1])}: {', '.join(rows)}; "
                f"{', '.join(fixed)}; full {f(a['full']['test_acc'])}")
    if r.name == "ood":
        reg = a.get("region_kl_max", {})
        return "ood: mean max-KL per region " + "; ".join(
            f"{n}: " + ", ".join(f"{s} {v:.2g}" for s, v in d.items()) for n, d in reg.items())
    if r.name == "jacobian-null":
        k = r["k"]
        j = int(np.searchsorted(k, max(a["K"], a["null_dim"])))
        j = min(j, len(k) - 1)
        return (f"jacobian-null: mean cos^2 of {a['K']} bulk directions with the {int(k[j])}-dim "
                f"near-null space (exact null {a['null_dim']}): {r['mean_cos2'][j]:.3f}, noise "
                f"inputs {r['noise_mean_cos2'][j]:.3f}, random {r['random_mean_cos2'][j]:.3f}")
    if r.name == "bulk":
        return (f"bulk: predicted {a['predicted']} (zero-input {a['zero_input']}, low-variance "
                f"{a['low_variance_extra']}, softmax shift {a['softmax_shift']}; {a['first_layer']})"
                f", measured {a.get('measured', 'n/a')}"
                + (f" [{a['measured_min']}, {a['measured_max']}]" if a.get("measured") is None
                   and "measured_min" in a else ""))
    return f"{r.name}: " + ", ".join(f"{k}={v}" for k, v in a.items() if isinstance(v, (int, float)))


def known_regions(run, eps: float, problem=None) -> dict:
    """:meth:`tjac.query.Run.regions` tightened by the structural sigma = 1 directions
    (:mod:`tjac.analysis.structural`, exact whatever the solves found): the bulk holds at least
    that many at any eps, so the other regions' upper bounds drop by what the bulk's lower bound
    gains. ``structural_ones`` says how many there are (None when the run's recipe cannot be
    rebuilt here, e.g. in-memory data, or its data changed since (:func:`tjac.rebuild.problem_of`):
    then the counts are the stored solves' alone). Counts already exact are left alone; a
    structural count above the bulk's upper bound (the solves certify more values outside the bulk
    than the derivation allows) is reported (``structural_conflict``) and not applied."""
    from .analysis.structural import structural_ones

    reg = dict(run.regions(eps))
    try:
        n1 = int(structural_ones(problem if problem is not None
                                 else rebuild.problem_of(run)).n_exact_singular)
    except (ValueError, ImportError) as e:  # a recipe naming in-memory arrays, a live module,
        # code that does not import here (DataError, ModelError, ImportPathError), or data that
        # changed since the run (StoreError)
        log.warning("run %s: structural sigma = 1 directions not derived (%s)", run.id, e)
        reg["structural_ones"] = None
        return reg
    reg["structural_ones"] = n1
    if reg.get("bulk") is None and n1 > reg["bulk_min"]:
        if n1 > reg["bulk_max"]:
            reg["structural_conflict"] = True
            return reg
        reg["bulk_min"] = n1
        for name, other in (("chaotic", "stable"), ("stable", "chaotic")):
            reg[f"{name}_max"] = min(reg[f"{name}_max"],
                                     run.P - n1 - reg[f"{other}_min"])
    return reg


# -- 7. variants side by side --------------------------------------------------------------------
def spectra_side_by_side(runs: dict, eps: float = 1e-3, name: str = "variants") -> AnalysisResult:
    """The known spectra of several runs ({label: :class:`tjac.query.Run`}), NaN-padded, with
    |sigma - 1| and their regions at ``eps`` (attrs ``regions`` {label: counts})."""
    eps = check_eps(eps)
    if not runs:
        raise ValueError("`runs` is empty")
    sp = {k: r.spectrum() for k, r in runs.items()}
    n = max(len(s.sigma) for s in sp.values())
    S = np.full((len(sp), n), np.nan)
    for i, s in enumerate(sp.values()):
        S[i, :len(s.sigma)] = s.sigma
    regions = {k: known_regions(r, eps) for k, r in runs.items()}
    reg = np.where(np.isfinite(S), regions_of(np.nan_to_num(S, nan=1.0), eps), -1)
    return AnalysisResult(name, {"sigma": (S, ("run", "index")),
                                 "distance_from_one": (np.abs(S - 1), ("run", "index")),
                                 "region": (reg, ("run", "index"))},
                          {"labels": list(runs), "run_ids": [r.id for r in runs.values()],
                           "eps": eps, "regions": regions,
                           "P": {k: r.P for k, r in runs.items()},
                           "complete": {k: s.complete for k, s in sp.items()}})
