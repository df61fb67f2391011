"""Read-only queries over a results store: ``tjac.open(path).run(id).top(10)``.

Vectors are read lazily (one (1, P) chunk per triplet); nothing is written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from . import store
from .linalg.regions import EPSILONS, region_counts
from .recipe import Recipe


@dataclass(frozen=True)
class Triplets:
    sigma: np.ndarray
    residuals: np.ndarray       # (k, 2): ||J v - s u||, ||J^T u - s v||
    converged: np.ndarray
    method: str


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

    def _solve(self, which):
        if which not in ("top", "bottom"):
            raise ValueError(f"unknown which {which!r}; expected 'top' or 'bottom'")
        got = store.solve_arrays(self._g, which)
        if got is None or not got[4].get("n_committed"):
            raise KeyError(f"run {self.id!r} has no committed {which} solve")
        return got

    def _k(self, which, k):
        n = int(self._solve(which)[4]["n_committed"])
        if k is None:
            return n
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"`k` must be a positive integer, got {k!r}")
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
        return self._triplets("top", k)

    def bottom(self, k=None) -> Triplets:
        return self._triplets("bottom", k)

    def _triplets(self, which, k):
        k = self._k(which, k)
        sig, res, _, _, a = self._solve(which)
        return Triplets(np.asarray(sig[:k]), np.asarray(res[:k]),
                        np.asarray(a.get("converged", [False] * k)[:k]), a.get("method", "?"))

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

    def regions(self, eps=1e-3) -> dict:
        """Chaotic / bulk / stable counts at ``eps``: from the full spectrum when stored (complete),
        else over the committed top and bottom values only (``complete`` is False)."""
        import torch

        try:
            S = self.sigma("all")
        except KeyError:
            parts = []
            for w in ("top", "bottom"):
                try:
                    parts.append(self.sigma(w))
                except KeyError:
                    pass
            S = np.unique(np.concatenate(parts)) if parts else np.zeros(0)
        return region_counts(torch.from_numpy(np.asarray(S, dtype=np.float64)), eps, P=self.P).as_dict()

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

    def as_dict(self) -> dict:
        return {"id": self.id, "status": self.status, "recipe": json.loads(self.attrs["recipe"]),
                "summary": self.summary, "provenance": self.provenance}


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
        return {"path": self.path, "schema": self._root.attrs.get("tjac_schema"),
                "tjac_version": self._root.attrs.get("tjac_version"),
                "runs": {r: {"status": self.run(r).status, "P": self.run(r).P,
                             "recipe_hash": self.run(r).attrs.get("recipe_hash")}
                         for r in self.runs()}}


def open(path) -> Results:  # noqa: A001 (mirrors zarr.open / xarray.open_*)
    """Open a results store read-only."""
    return Results(path)
