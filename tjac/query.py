"""Read-only queries over a results store: ``tjac.open(path).run(id).top(10)``.

Vectors are read lazily (one (1, P) chunk per triplet); nothing is written. Only committed groups
are read (:func:`tjac.store.committed`). Each triplet carries its certificate r = hypot(residuals)
and whether it is an upper bound only (r >= 0.1 sigma, :func:`tjac.linalg.bound_only`), computed on
read, so stores of any version answer the same way.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace

import numpy as np

from . import store
from .analysis.regions import EPSILONS, region_counts
from .recipe import Recipe

log = logging.getLogger(__name__)


def _bound_only(sigma: np.ndarray, certificate: np.ndarray) -> np.ndarray:
    """:func:`tjac.linalg.bound_only` (the one rule) on numpy arrays."""
    import torch

    from .linalg import bound_only

    return bound_only(torch.from_numpy(np.asarray(sigma, np.float64)),
                      torch.from_numpy(np.asarray(certificate, np.float64))).numpy()


def roundoff_certificate(S: np.ndarray, P: int) -> np.ndarray:
    """The certificate of values from a backward-stable SVD of a formed J without residuals: a
    conservative p(P) = P in LAPACK's backward-error bound p(P) eps ||J||."""
    return np.full(P, P * np.finfo(np.float64).eps * (float(S[0]) if P else 0.0))


@dataclass(frozen=True)
class Triplets:
    """The singular values at one end of a run (``top`` descending, ``bottom`` ascending), each
    with its certificate; the first ``n_vectors`` with stored singular vectors
    (:meth:`Run.vectors`).

    ``n_requested`` is the k asked (None: all the solve stored) and ``n_available`` how many are
    known at that end: the solve's triplets, or all P where the full spectrum is stored (the rows
    past the solve's then come from it, values and certificates without vectors). Fewer than
    asked are returned only where fewer are known; ``note`` then says so ("" otherwise).
    """
    sigma: np.ndarray
    residuals: np.ndarray       # (k, 2): ||J v - s u||, ||J^T u - s v||; NaN where not measured
    converged: np.ndarray       # the solver's criterion: both residuals <= tol * sigma_max
    method: str
    certificate: np.ndarray     # r = hypot(residuals): |sigma - sigma_true| <= r
    bound_only: np.ndarray      # r >= 0.1 sigma (tjac.linalg.bound_only): sigma only bounds sigma_true
    n_vectors: int              # rows [0, n_vectors) have stored u, v
    n_requested: int | None
    n_available: int
    note: str
    U: np.ndarray | None = None  # (P, n) left / right singular vectors as columns, where loaded
    V: np.ndarray | None = None  # (the analyses of tjac.analyze_store; None: read them lazily)

    @classmethod
    def from_svd(cls, S, U, V, *, method: str = "dense") -> "Triplets":
        """All P triplets of a full SVD of a formed J (descending), each with the backward-error
        round-off bound of LAPACK's SVD as its certificate (:func:`roundoff_certificate`; no
        residuals measured: NaN)."""
        S = np.asarray(S, np.float64)
        P = len(S)
        r = roundoff_certificate(S, P)
        return cls(S, np.full((P, 2), np.nan), np.ones(P, bool), method, r, _bound_only(S, r),
                   P, None, P, "", U, V)

    def head(self, n: int) -> "Triplets":
        """The first ``n`` rows (values, certificates and any loaded vectors)."""
        cut = {f: getattr(self, f)[:n] for f in ("sigma", "residuals", "converged", "certificate",
                                                 "bound_only")}
        vec = {f: None if getattr(self, f) is None else getattr(self, f)[:, :n] for f in ("U", "V")}
        return replace(self, **cut, **vec, n_vectors=min(n, self.n_vectors))

    @property
    def certified(self) -> np.ndarray:
        """Converged and measured: sigma_true = sigma to within r < 0.1 sigma."""
        return self.converged & ~self.bound_only

    @property
    def n_missing(self) -> int:
        """How many of the k asked are not known (0 unless fewer are known than asked)."""
        return 0 if self.n_requested is None else max(0, self.n_requested - len(self.sigma))


@dataclass(frozen=True)
class Spectrum:
    """The known singular values of a run (descending) and the certificate r of each."""
    sigma: np.ndarray
    certificate: np.ndarray
    P: int
    source: str                 # how the certificates were obtained (see Run.spectrum)

    @property
    def complete(self) -> bool:
        return len(self.sigma) == self.P


@dataclass(frozen=True)
class Analysis:
    """One stored analysis of a run (``analyses/<name>``): arrays with their dimension names and
    the attributes (parameters and key numbers)."""
    name: str
    arrays: dict                # name -> np.ndarray
    dims: dict                  # name -> tuple of dimension names
    attrs: dict

    def __getitem__(self, key):
        return self.arrays[key]


class Run:
    """One stored run."""

    def __init__(self, group, run_id):
        self._g, self.id = group, run_id
        self.attrs = dict(group.attrs)

    @property
    def recipe(self) -> Recipe:
        return Recipe.from_json(self.attrs["recipe"])

    @property
    def status(self) -> str:
        return self.attrs.get("status", "unknown")

    @property
    def summary(self) -> dict:
        return self.attrs.get("summary", {})

    @property
    def provenance(self) -> dict:
        return self.attrs.get("provenance", {})

    @property
    def P(self) -> int:
        return int(self._g["theta0"].shape[0])

    def theta0(self) -> np.ndarray:
        """θ₀ as stored (``param_layout`` order of the recipe's operator)."""
        return np.asarray(self._g["theta0"][:])

    def thetaT(self) -> np.ndarray:
        """θ_T as stored."""
        return np.asarray(self._g["thetaT"][:])

    def _solve(self, which, required=True):
        if which not in ("top", "bottom"):
            raise ValueError(f"unknown which {which!r}; expected 'top' or 'bottom'")
        got = store.solve_arrays(self._g, which)
        if got is None or not got[4].get("n_committed"):
            if not required:
                return None
            raise KeyError(f"run {self.id!r} has no committed {which} solve")
        return got

    def _k(self, which, k):
        n = int(self._solve(which)[4]["n_committed"])
        if k is None:
            return n
        _check_k(k)
        return min(k, n)

    def sigma(self, which="top") -> np.ndarray:
        """All committed singular values at that end (``top`` descending, ``bottom`` ascending);
        ``which='all'`` gives the full spectrum when the dense path ran."""
        if which == "all":
            s = store.full_spectrum(self._g)
            if s is None:
                raise KeyError(f"run {self.id!r} has no full spectrum (only the dense path stores one)")
            return np.asarray(s)
        sig, _, _, _, a = self._solve(which)
        return np.asarray(sig[: a["n_committed"]])

    def top(self, k=None) -> Triplets:
        """The k largest singular values with their certificates (None: all the top solve stored).
        Past the solve's triplets they come from the full spectrum where it is stored; where fewer
        than k are known, those known (``n_requested``/``n_available``/``note`` say so, logged)."""
        return self._triplets("top", k)

    def bottom(self, k=None) -> Triplets:
        """The k smallest, ascending; as :meth:`top`."""
        return self._triplets("bottom", k)

    def _triplets(self, which, k):
        if k is not None:
            _check_k(k)
        got = self._solve(which, required=False)
        S = store.full_spectrum(self._g)
        if got is None and (k is None or S is None):
            self._solve(which)  # raises: nothing known at that end
        sig, res, _, _, a = got if got is not None else (None, None, None, None, {})
        n = int(a.get("n_committed", 0))
        m = n if k is None else min(k, n)
        sigma = np.asarray(sig[:m], np.float64) if m else np.zeros(0)
        residuals = np.asarray(res[:m], np.float64) if m else np.zeros((0, 2))
        certificate = np.hypot(residuals[:, 0], residuals[:, 1])
        converged = np.zeros(m, dtype=bool)
        conv = a.get("converged") or []
        converged[:min(m, len(conv))] = np.asarray(conv[:m], dtype=bool)
        method = a.get("method", "dense" if got is None else "?")
        available = n if S is None else len(S)
        if k is not None and k > n and S is not None:  # the rest from the full spectrum
            sigma, residuals, certificate, converged, method = self._from_spectrum(
                which, k, a, (sigma, residuals, certificate, converged), method)
        note = ""
        if k is not None and len(sigma) < k:
            why = (f"J has only P = {available} singular values" if S is not None else
                   f"the {which} solve stored {n} and the run has no full spectrum (only the "
                   f"dense path stores one)")
            note = (f"{k} {which} singular values asked, {len(sigma)} known: {why}")
            log.warning("run %s: %s", self.id, note)
        return Triplets(sigma, residuals, converged, method, certificate,
                        _bound_only(sigma, certificate), n_vectors=m, n_requested=k,
                        n_available=available, note=note)

    def _from_spectrum(self, which, k, a, head, method):
        """``head`` (the solve's rows) extended to min(k, P) rows by :meth:`spectrum`'s values and
        certificates (residuals NaN where only the values are stored); converged by the solver's
        criterion (residuals, else the certificate, <= tol * sigma_max) at the solve's tol."""
        import torch

        from .linalg import default_tol

        sigma, residuals, certificate, converged = head
        sp = self.spectrum()
        P, n = len(sp.sigma), len(sigma)
        idx = np.arange(n, min(k, P))
        if which == "bottom":
            idx = P - 1 - idx
        R = store.spectrum_residual(self._g)
        r_new = np.full((len(idx), 2), np.nan) if R is None else np.asarray(R, np.float64)[idx]
        c_new = sp.certificate[idx]
        tol = a.get("tol") or default_tol(torch.float64)
        conv_new = (c_new if R is None else r_new.max(1, initial=0.0)) <= tol * sp.sigma[0]
        if method != "dense":
            method = f"{method}+dense"  # the solve's rows, then the dense path's spectrum
        return (np.concatenate([sigma, sp.sigma[idx]]), np.concatenate([residuals, r_new]),
                np.concatenate([certificate, c_new]), np.concatenate([converged, conv_new]),
                method)

    def vectors(self, which, idx):
        """(u, v) rows for triplet index or slice ``idx`` (reads only those chunks)."""
        _, _, u, v, a = self._solve(which)
        n = int(a["n_committed"])
        if isinstance(idx, (int, np.integer)):
            if not 0 <= idx < n:
                raise IndexError(f"triplet index {idx} out of range 0..{n - 1}")
        elif isinstance(idx, slice):
            idx = slice(*idx.indices(n))
        else:
            raise TypeError("`idx` must be an int or a slice")
        return np.asarray(u[idx]), np.asarray(v[idx])

    def residuals(self, which="top") -> np.ndarray:
        return self._triplets(which, None).residuals

    def spectrum(self) -> Spectrum:
        """The known singular values, descending, each with its certificate r:

        * the dense path's full spectrum: r = hypot of the residual pair stored for every triplet
          (``source="residuals"``; residuals of the formed J, as the dense path's solves carry).
          A store written before those were kept has them for its top/bottom triplets only; every
          other value gets the stated round-off bound of a backward-stable SVD,
          r = P * eps * sigma_max (``source="round-off bound ..."``).
        * otherwise the committed top and bottom triplets (indices [0, k_top) and [P - k_bottom, P),
          counted once where they overlap), each with its own certificate; the rest are unknown.
        """
        P = self.P
        ends = {}
        for which in ("top", "bottom"):
            try:
                t = self._triplets(which, None)
            except KeyError:
                continue
            ends[which] = (t.sigma, t.certificate)
        S = store.full_spectrum(self._g)
        if S is not None:
            S = np.asarray(S, dtype=np.float64)
            res = store.spectrum_residual(self._g)
            if res is not None:
                return Spectrum(S, np.hypot(res[:, 0], res[:, 1]), P, "residuals")
            r = roundoff_certificate(S, P)
            if "top" in ends:
                r[:len(ends["top"][1])] = ends["top"][1]
            if "bottom" in ends:
                kb = len(ends["bottom"][1])
                r[P - kb:] = ends["bottom"][1][::-1]
            return Spectrum(S, r, P, "round-off bound P * eps * sigma_max (residuals for the "
                                     "stored top and bottom triplets)")
        sig, cert = [np.zeros(0)], [np.zeros(0)]
        kt = 0
        if "top" in ends:
            sig.append(ends["top"][0])
            cert.append(ends["top"][1])
            kt = len(ends["top"][0])
        if "bottom" in ends:
            keep = max(0, min(len(ends["bottom"][0]), P - kt))  # global index P-1-j >= k_top
            sig.append(ends["bottom"][0][:keep][::-1])
            cert.append(ends["bottom"][1][:keep][::-1])
        return Spectrum(np.concatenate(sig), np.concatenate(cert), P, "top and bottom triplets")

    def regions(self, eps=1e-3) -> dict:
        """Chaotic / bulk / stable at ``eps`` over :meth:`spectrum`, each value certified to its r:
        a count at face value (``None`` unless all P values are known), its bounds
        (``<region>_min``/``_max``), how many values are ``ambiguous`` (within r of a boundary) and
        how many ``unknown`` (see :class:`tjac.analysis.Regions`)."""
        import torch

        sp = self.spectrum()
        return region_counts(torch.from_numpy(sp.sigma), eps, P=self.P,
                             certificate=torch.from_numpy(sp.certificate)).as_dict()

    def spectrum_summary(self, structural=None, epsilons=EPSILONS) -> dict:
        """:func:`tjac.analysis.spectrum_summary` of :meth:`spectrum` (what ``tjac run`` stores)."""
        import torch

        from .analysis.summary import spectrum_summary

        sp = self.spectrum()
        out = spectrum_summary(torch.from_numpy(sp.sigma), P=self.P,
                               certificate=torch.from_numpy(sp.certificate), structural=structural,
                               epsilons=epsilons)
        out["certificate_source"] = sp.source
        return out

    def solve_summary(self, which) -> dict:
        """k, method, the first and last sigma, how many triplets are certified, upper bounds only
        (converged, r >= 0.1 sigma) or unconverged, and the largest certificate r / sigma_max."""
        t = self._triplets(which, None)
        a = self._solve(which)[4]
        return {"k": int(len(t.sigma)), "method": t.method,
                "sigma_first": float(t.sigma[0]), "sigma_last": float(t.sigma[-1]),
                "n_certified": int(t.certified.sum()),
                "n_bound_only": int((t.converged & t.bound_only).sum()),
                "n_unconverged": int((~t.converged).sum()),
                "max_residual_rel": float(t.certificate.max() if t.certificate.size else 0.0) /
                max(float(a.get("norm_estimate") or 1.0), 1e-300)}

    def alignment(self, which="top") -> np.ndarray:
        """|u_i . v_i| for the committed triplets."""
        _, _, u, v, a = self._solve(which)
        n = int(a["n_committed"])
        return np.array([abs(float(np.dot(u[i], v[i]))) for i in range(n)])

    def compare(self, other: "Run", which="top", k=None) -> np.ndarray:
        """Principal angles (radians, ascending) between this run's and ``other``'s right singular
        subspaces at that end (e.g. across seeds)."""
        import scipy.linalg

        if other.P != self.P:
            raise ValueError(f"runs have different P ({self.P} vs {other.P})")
        k1, k2 = self._k(which, k), other._k(which, k)
        A = self.vectors(which, slice(0, k1))[1].T
        B = other.vectors(which, slice(0, k2))[1].T
        return scipy.linalg.subspace_angles(A, B)[::-1]

    def analyses(self) -> list[str]:
        """Names of the committed analyses of this run (``tjac analyze``, :mod:`tjac.analysis`)."""
        return store.list_analyses(self._g)

    def analysis(self, name: str) -> Analysis:
        """A committed analysis, read whole (analyses are small: curves and counts)."""
        g = store.analysis_group(self._g, name)
        if g is None:
            raise KeyError(f"run {self.id!r} has no analysis {name!r} "
                           f"(stored: {', '.join(self.analyses()) or 'none'})")
        arrays, dims = {}, {}
        for n in sorted(g.array_keys()):
            a = g[n]
            arrays[n] = np.asarray(a[...])
            dims[n] = tuple(a.metadata.dimension_names or ())
        attrs = {k: v for k, v in g.attrs.items() if k not in store.COUNTERS}
        return Analysis(name, arrays, dims, attrs)

    def density(self):
        """The stored spectral density (``analyses/density``, written by ``tjac analyze --what
        density`` or :func:`tjac.analyze_store.analyze_density`) as a :class:`tjac.analysis.Density`."""
        from .analysis.density import Density

        a = self.analysis("density")
        at = a.attrs
        return Density(a["log10_sigma"], a["density"], a["stderr"], float(at["bandwidth"]),
                       at["method"], int(at["P"]), int(at["probes"]), int(at["steps"]),
                       int(at["products"]))

    def counts(self) -> dict:
        """The stored matrix-free region counts (``analyses/counts``): {eps: {region: {estimate,
        lower, upper, stderr, resolved}}}, with the method, probes, steps and products under
        ``"info"``; ``resolved`` is False where the step budget ended before the quadrature part
        of the bracket reached ``rtol``."""
        a = self.analysis("counts")
        out = {}
        for i, e in enumerate(a["eps"]):
            out[float(e)] = {r: {**{f: float(a[f"{r}_{f}"][i]) for f in
                                    ("estimate", "lower", "upper", "stderr")},
                                 "resolved": bool(a[f"{r}_resolved"][i])
                                 if f"{r}_resolved" in a.arrays else None}
                             for r in ("chaotic", "bulk", "stable")}
        out["info"] = {k: v for k, v in a.attrs.items() if k != "analysis"}
        return out

    def as_dict(self) -> dict:
        return {"id": self.id, "status": self.status, "recipe": json.loads(self.attrs["recipe"]),
                "summary": self.summary, "provenance": self.provenance}


def _check_k(k) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"`k` must be a positive integer, got {k!r}")


class Results:
    """A read-only handle on a store."""

    def __init__(self, path):
        self.path = str(path)
        self._root = store.open_read(self.path)

    def runs(self) -> list[str]:
        return store.list_runs(self._root)

    def run(self, run_id: str) -> Run:
        return Run(store.run_group(self._root, run_id), run_id)

    def info(self) -> dict:
        """Store, runs and, per committed solve, how many triplets are certified, upper bounds only
        or unconverged."""
        runs = {}
        for rid in self.runs():
            run = self.run(rid)
            solves = {}
            for which in ("top", "bottom"):
                try:
                    s = run.solve_summary(which)
                except KeyError:
                    continue
                solves[which] = {"k": s["k"], "certified": s["n_certified"],
                                 "bound_only": s["n_bound_only"], "unconverged": s["n_unconverged"]}
            runs[rid] = {"status": run.status, "P": run.P,
                         "recipe_hash": run.attrs.get("recipe_hash"), "solves": solves}
        return {"path": self.path, "schema": self._root.attrs.get("tjac_schema"),
                "tjac_version": self._root.attrs.get("tjac_version"), "runs": runs}


def open(path) -> Results:  # noqa: A001 (mirrors zarr.open / xarray.open_*)
    """Open a results store read-only."""
    return Results(path)
