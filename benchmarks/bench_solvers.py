"""Products and wall time to certify top-16/top-64 and bottom-16/32 at tol 1e-8, side by side with
scipy's svds (ARPACK, PROPACK, LOBPCG) on the same operator and with the dense path.

(a) a synthetic J-shaped operator, P = 20,000: 80 sigma from 1e3 down to 1 + 1e-3 (so top-64 stays
    in the chaotic region), a bulk of 18,932 at 1 (500 jittered by up to 1e-6, the rest exactly 1),
    a tail of 988 from 0.99 down to 1e-8;
    non-normal (U = signed permutation, V = product of Householder reflections).
(b) the paper recipe (P = 4810, float64) through TrainingJacobian.to_scipy().

Every row reports the same certificate: max_i hypot(||J v - s u||, ||J^T u - s v||) / sigma_max from
fresh products, and the error of sigma against the reference where one is known.

    python benchmarks/bench_solvers.py [--quick] [--only synthetic|paper]
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
import _env  # noqa: E402

import tjac  # noqa: E402
from tjac.linalg import ConvergenceError, fresh_residuals, svd  # noqa: E402


class Synthetic:
    """J = Ub diag(s) Vb^T applied implicitly (O(P) per product)."""

    def __init__(self, P=20_000, seed=0):
        g = np.random.default_rng(seed)
        n_top, n_tail = 80, 988
        top = np.logspace(3, np.log10(1 + 1e-3), n_top)
        bulk = np.ones(P - n_top - n_tail)
        bulk[:500] += g.uniform(-1e-6, 1e-6, 500)
        tail = np.logspace(np.log10(0.99), -8, n_tail)
        self.s = np.sort(np.concatenate([top, bulk, tail]))[::-1].copy()
        self.perm = g.permutation(P)
        self.sign = g.choice([-1.0, 1.0], P)
        self.h = [x / np.linalg.norm(x) for x in g.standard_normal((3, P))]
        self.shape, self.dtype, self.device = (P, P), torch.float64, torch.device("cpu")
        self.S = torch.from_numpy(self.s)
        self.pm = torch.from_numpy(self.perm)
        self.sg = torch.from_numpy(self.sign)[:, None]
        self.H = [torch.from_numpy(x)[:, None] for x in self.h]

    def _V(self, X):  # V X with V = H0 H1 H2
        for h in reversed(self.H):
            X = X - 2 * h @ (h.T @ X)
        return X

    def _Vt(self, X):
        for h in self.H:
            X = X - 2 * h @ (h.T @ X)
        return X

    def _U(self, X):
        out = torch.empty_like(X)
        out[self.pm] = self.sg * X
        return out

    def _Ut(self, X):
        return self.sg * X[self.pm]

    def matmat(self, X):
        return self._U(self.S[:, None] * self._Vt(X))

    def rmatmat(self, Y):
        return self._V(self.S[:, None] * self._Ut(Y))

    def to_scipy(self):
        from scipy.sparse.linalg import LinearOperator

        mm = lambda X: self.matmat(torch.from_numpy(np.asarray(X).reshape(self.shape[0], -1))).numpy()  # noqa
        rmm = lambda X: self.rmatmat(torch.from_numpy(np.asarray(X).reshape(self.shape[0], -1))).numpy()  # noqa
        return LinearOperator(self.shape, matvec=lambda x: mm(x).ravel(), rmatvec=lambda x: rmm(x).ravel(),
                              matmat=mm, rmatmat=rmm, dtype=np.float64)


class CountedScipy:
    def __init__(self, A, budget=None):
        from scipy.sparse.linalg import LinearOperator

        self.n_mv = self.n_rmv = 0

        def check():
            if budget is not None and self.n_mv + self.n_rmv >= budget:
                raise BudgetExceeded(f"product budget {budget} exhausted")

        def mv(x):
            check()
            x = np.asarray(x)
            self.n_mv += 1 if x.ndim == 1 else x.shape[1]
            return A.matmat(x.reshape(A.shape[0], -1)).reshape(x.shape)

        def rmv(x):
            check()
            x = np.asarray(x)
            self.n_rmv += 1 if x.ndim == 1 else x.shape[1]
            return A.rmatmat(x.reshape(A.shape[0], -1)).reshape(x.shape)

        self.op = LinearOperator(A.shape, matvec=mv, rmatvec=rmv, matmat=mv, rmatmat=rmv, dtype=A.dtype)


def row(name, S, res, smax, products, seconds, ref=None, converged=None, note=""):
    cert = float(np.hypot(res[:, 0], res[:, 1]).max() / smax) if len(S) else float("nan")
    out = {"solver": name, "products": int(products), "seconds": round(seconds, 3),
           "certificate_rel": cert, "converged": bool(converged) if converged is not None else cert <= 1e-8,
           "note": note}
    if ref is not None and len(S):
        out["sigma_error_rel"] = float(np.abs(np.asarray(S)[: len(ref)] - ref[: len(S)]).max() / smax)
    print(f"    {name:34s} products {products:7d}  {seconds:8.2f}s  cert {cert:.1e}  "
          f"{'ok' if out['converged'] else 'NOT CERTIFIED'} {note}", flush=True)
    return out


def ours(op, k, which, method, ref, smax, **kw):
    t = time.perf_counter()
    try:
        r = svd(op, k, which=which, method=method, tol=1e-8, **kw)
        ok = True
    except ConvergenceError as e:
        r, ok = e.result, False
    dt = time.perf_counter() - t
    return row(f"tjac {method}" + (f" block={kw['block']}" if "block" in kw else ""), r.S.numpy(),
               r.residuals.numpy(), smax, r.num_matvecs + r.num_rmatvecs, dt, ref, ok)


SCIPY_MAXITER = {"arpack": 300, "propack": 10_000, "lobpcg": 500}  # caps: ~1e4 products each
BUDGET = 20_000  # products per scipy solve


class BudgetExceeded(RuntimeError):
    pass


def scipy_svds(op, k, which, solver, ref, smax, maxiter, budget=None):
    """svds in this process, stopped after ``budget`` products (PROPACK's 'SM' can run for hours).
    (A forked child with a timeout deadlocks in OpenMP after torch has used its thread pool.)"""
    from scipy.sparse.linalg import svds

    c = CountedScipy(op.to_scipy(), budget=budget or BUDGET)
    t = time.perf_counter()
    try:
        U, S, Vt = svds(c.op, k=k, which="LM" if which == "top" else "SM", solver=solver,
                        maxiter=SCIPY_MAXITER[solver], random_state=0, tol=1e-8)
    except Exception as e:  # budget, ARPACK no-convergence, PROPACK failures: record, don't crash
        return row(f"scipy svds {solver}", [], np.zeros((0, 2)), smax, c.n_mv + c.n_rmv,
                   time.perf_counter() - t, converged=False,
                   note=f"failed: {type(e).__name__}: {str(e)[:80]}")
    dt = time.perf_counter() - t
    n = c.n_mv + c.n_rmv
    order = np.argsort(-S) if which == "top" else np.argsort(S)
    S, U, V = S[order], U[:, order], Vt[order].T
    res = fresh_residuals(op, torch.from_numpy(S.copy()), torch.from_numpy(U.copy()),
                          torch.from_numpy(V.copy())).numpy()  # certification, not counted
    return row(f"scipy svds {solver}", S, res, smax, n, dt, ref)


def bench(op, ref_top, ref_bottom, smax, cases, maxiter, save=None):
    out = []
    for which, k in cases:
        print(f"  {which}-{k}", flush=True)
        ref = ref_top if which == "top" else ref_bottom
        rows = []
        if which == "top":
            rows.append(ours(op, k, which, "lanczos", ref, smax))
            rows.append(ours(op, k, which, "randomized", ref, smax))
        else:
            rows.append(ours(op, k, which, "lanczos", ref, smax))
        for solver in ("arpack", "propack", "lobpcg"):
            rows.append(scipy_svds(op, k, which, solver, ref, smax, maxiter))
        out.append({"which": which, "k": k, "rows": rows})
        if save is not None:
            save(out)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", choices=["synthetic", "paper", "paper-scipy"])
    ap.add_argument("--budget", type=int, default=None, help="products per scipy solve")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    a.out = a.out or os.path.join(os.path.dirname(__file__), "results",
                                  f"solvers{'-' + a.only if a.only else ''}.json")
    result = {"tol": 1e-8, "certificate": "max hypot(||Jv-su||, ||J^T u - s v||) / sigma_max"}
    global BUDGET
    BUDGET = a.budget or BUDGET
    if a.only == "paper-scipy":  # scipy's top-16 on the real operator, merged into solvers-paper.json
        path = os.path.join(os.path.dirname(__file__), "results", "solvers-paper.json")
        with open(path) as f:
            result = json.load(f)
        op = tjac.TrainingJacobian(tjac.Recipe.paper())
        ref = np.array(result["paper_spectrum_top64"]) if "paper_spectrum_top64" in result else None
        smax = result["paper_spectrum"]["sigma_max"]
        rows = [scipy_svds(op, 16, "top", s_, ref, smax, None) for s_ in ("arpack", "lobpcg", "propack")]
        result["paper"]["scipy_top16"] = rows
        result["paper"]["scipy_top16_note"] = f"product budget {BUDGET} per solve"
        _env.write(path, result)
        return
    if a.only in (None, "synthetic"):
        P = 4000 if a.quick else 20_000
        syn = Synthetic(P)
        print(f"synthetic P={P}", flush=True)
        result["synthetic"] = {"P": P, "cases": bench(
            syn, syn.s, syn.s[::-1], syn.s[0], [("top", 16), ("top", 64), ("bottom", 16)],
            maxiter=3000 if a.quick else 15_000)}
    if a.only in (None, "paper"):
        op = tjac.TrainingJacobian(tjac.Recipe.paper(**({"width": 16} if a.quick else {})))
        P = op.shape[0]
        print(f"paper recipe P={P}", flush=True)
        from tjac.analysis import spectrum_summary, structural_ones

        t = time.perf_counter()
        J, U, S, V = tjac.linalg.dense_svd(op)  # the dense path: all P triplets
        t_dense = time.perf_counter() - t
        n_dense = op.num_matvecs
        result["paper_spectrum"] = spectrum_summary(S, P=P, structural=structural_ones(op.problem))
        smax = float(S[0])
        idx = torch.arange(P - 1, P - 33, -1)
        res = torch.stack([(J @ V[:, idx] - U[:, idx] * S[idx]).norm(dim=0),
                           (J.T @ U[:, idx] - V[:, idx] * S[idx]).norm(dim=0)], 1)
        del J, U, V
        top_ref = S[:64].numpy()
        dense_row = row("tjac dense (all P sigma)", S[idx].numpy(), res.numpy(), smax, n_dense,
                        t_dense, S.flip(0)[:32].numpy(), True)
        result["paper"] = {"P": P, "dense": dense_row, "R_seconds": op.time_trajectory}
        path = a.out.replace(".json", "-paper.json") if a.only is None else a.out

        def save(cases):
            result["paper"]["cases"] = cases
            _env.write(path, result)

        save([])
        print("  bottom-32 Krylov (capped at an 800-vector basis)", flush=True)
        result["paper"]["bottom32_lanczos_capped"] = ours(op, 32, "bottom", "lanczos",
                                                          S.flip(0).numpy(), smax, maxiter=50)
        save([])
        bench(op, top_ref, S.flip(0).numpy(), smax, [("top", 16), ("top", 32)] if a.quick else
              [("top", 16), ("top", 32), ("top", 64)], maxiter=2000, save=save)
    _env.write(a.out, result)


if __name__ == "__main__":
    main()
