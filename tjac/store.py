"""Results in zarr (format 3): schema, single writer, exact resume, reader. The only zarr importer.

Layout (``dimension_names`` everywhere, so ``xarray.open_datatree(path, engine="zarr")`` reads it)::

    results.zarr/                  attrs: tjac_schema, tjac_version
      runs/<run_id>/               attrs: recipe (JSON), recipe_hash, provenance, status, summary
        theta0, thetaT             (param,)
        solves/<top|bottom>/       sigma (triplet,), residual (triplet, side), u, v (triplet, param)
                                   attrs: n_committed, method, tol, converged, products, ...
        spectrum/sigma             (index,) all P singular values when the dense path ran
        state/<name>/              solver checkpoints (J columns, Krylov basis), deleted when done

Writes are ordered data first, counter (``n_committed`` attr) last, so a crash at any point leaves
a store whose committed part is exact; a resumed run ignores anything past the counter. One writer:
``<store>/.tjac-lock`` holds its pid; a live pid refuses a second writer, a dead one (a killed run)
is taken over. Nothing read from a store is unpickled or eval'd: attributes are JSON.
"""

from __future__ import annotations

import json
import os
import re
import warnings

import numpy as np
import zarr

SCHEMA = 1
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
LOCK = ".tjac-lock"

warnings.filterwarnings("ignore", message=".*Consolidated metadata.*")
warnings.filterwarnings("ignore", message=r".*\.tjac-lock is not recognized.*")


def zarr_version() -> str:
    return zarr.__version__


class StoreError(ValueError):
    """A store that cannot be used as asked (missing, foreign, newer, corrupt, locked)."""


def check_run_id(run_id: str) -> str:
    if not isinstance(run_id, str) or not _RUN_ID.match(run_id) or ".." in run_id:
        raise StoreError(f"run id {run_id!r} must match [A-Za-z0-9][A-Za-z0-9_.-]* (no '..', "
                         f"at most 128 characters)")
    return run_id


def _open_existing(path: str, mode: str):
    if not os.path.exists(path):
        raise StoreError(f"store {path!r} does not exist")
    if not os.path.isfile(os.path.join(path, "zarr.json")):
        raise StoreError(f"{path!r} is not a zarr v3 store (no zarr.json)")
    try:
        with open(os.path.join(path, "zarr.json")) as f:
            json.load(f)
        root = zarr.open_group(path, mode=mode, use_consolidated=False)
        attrs = dict(root.attrs)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise StoreError(f"store {path!r} is corrupt: {type(e).__name__}: {e}") from None
    schema = attrs.get("tjac_schema")
    if schema is None:
        raise StoreError(f"{path!r} is a zarr store but not a tjac store (no tjac_schema attribute)")
    if not isinstance(schema, int) or schema > SCHEMA:
        raise StoreError(f"store {path!r} has schema {schema!r}, newer than this tjac reads "
                         f"({SCHEMA}); upgrade tjac")
    return root


# -- reading ---------------------------------------------------------------------------------------
def open_read(path: str):
    """The root group, validated, read-only."""
    return _open_existing(os.fspath(path), "r")


def list_runs(root) -> list[str]:
    if "runs" not in root:
        return []
    return sorted(root["runs"].group_keys())


def run_group(root, run_id: str):
    check_run_id(run_id)
    if run_id not in list_runs(root):
        raise StoreError(f"no run {run_id!r} in this store (runs: {', '.join(list_runs(root)) or 'none'})")
    return root["runs"][run_id]


def solve_arrays(run, which: str):
    """(sigma, residual, u, v, attrs) of a committed solve, arrays lazy; None if absent."""
    if "solves" not in run or which not in run["solves"]:
        return None
    g = run["solves"][which]
    return g["sigma"], g["residual"], g["u"], g["v"], dict(g.attrs)


def full_spectrum(run):
    if "spectrum" in run and "sigma" in run["spectrum"]:
        return run["spectrum"]["sigma"][:]
    return None


# -- writing ---------------------------------------------------------------------------------------
class Writer:
    """The single writer of a store. Use as a context manager (the lock is released on exit)."""

    def __init__(self, path: str, *, create: bool = True):
        self.path = os.fspath(path)
        if os.path.exists(self.path):
            self.root = _open_existing(self.path, "r+")
        else:
            if not create:
                raise StoreError(f"store {self.path!r} does not exist")
            parent = os.path.dirname(os.path.abspath(self.path))
            if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
                raise StoreError(f"cannot create store {self.path!r}: {parent!r} is not a writable "
                                 f"directory")
            self.root = zarr.open_group(self.path, mode="w-", zarr_format=3)
            from . import __version__
            self.root.attrs.update({"tjac_schema": SCHEMA, "tjac_version": __version__})
        self._lock()

    def _lock(self):
        lock = os.path.join(self.path, LOCK)
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(open(lock).read().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and _alive(pid):
                raise StoreError(f"store {self.path!r} is being written by process {pid}; "
                                 f"one writer at a time") from None
            os.remove(lock)  # stale lock of a dead writer: take over
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        self._locked = True

    def close(self):
        if getattr(self, "_locked", False):
            try:
                os.remove(os.path.join(self.path, LOCK))
            except FileNotFoundError:
                pass
            self._locked = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # runs
    def has_run(self, run_id):
        return check_run_id(run_id) in list_runs(self.root)

    def run(self, run_id):
        return self.root["runs"][check_run_id(run_id)]

    def delete_run(self, run_id):
        runs = self.root.require_group("runs")
        del runs[check_run_id(run_id)]

    def create_run(self, run_id, *, recipe_json: str, recipe_hash: str, provenance: dict,
                   theta0: np.ndarray, thetaT: np.ndarray):
        run = self.root.require_group("runs").create_group(check_run_id(run_id))
        for name, x in (("theta0", theta0), ("thetaT", thetaT)):
            a = run.create_array(name, shape=x.shape, chunks=x.shape, dtype=x.dtype,
                                 dimension_names=("param",))
            a[:] = x
        run.attrs.update({"recipe": recipe_json, "recipe_hash": recipe_hash,
                          "provenance": provenance, "status": "running"})
        return run

    def set_attrs(self, group, **attrs):
        group.attrs.update(_jsonable(attrs))

    # solves: triplets committed in order, counter last
    def solve_group(self, run, which, P, dtype, k):
        g = run.require_group("solves").require_group(which)
        if "sigma" not in g:
            g.create_array("sigma", shape=(k,), chunks=(max(k, 1),), dtype="float64",
                           dimension_names=("triplet",))
            g.create_array("residual", shape=(k, 2), chunks=(max(k, 1), 2), dtype="float64",
                           dimension_names=("triplet", "side"))
            for n in ("u", "v"):
                g.create_array(n, shape=(k, P), chunks=(1, P), dtype=dtype,
                               dimension_names=("triplet", "param"))
            g.attrs.update({"n_committed": 0, "k": k})
        return g

    def commit_triplets(self, g, start, sigma, residual, U, V):
        """Write triplets [start, start+n) then advance the counter (rows = triplets)."""
        n = len(sigma)
        g["u"][start:start + n] = U
        g["v"][start:start + n] = V
        g["residual"][start:start + n] = residual
        g["sigma"][start:start + n] = sigma
        g.attrs["n_committed"] = start + n

    def write_spectrum(self, run, sigma: np.ndarray):
        g = run.require_group("spectrum")
        a = g.create_array("sigma", shape=sigma.shape, chunks=sigma.shape, dtype="float64",
                           dimension_names=("index",), overwrite=True)
        a[:] = sigma

    # solver checkpoints
    def state_group(self, run, name):
        return run.require_group("state").require_group(name)

    def state_array(self, g, name, shape, dtype, dims, chunks=None):
        if name in g and tuple(g[name].shape) == tuple(shape):
            return g[name]
        return g.create_array(name, shape=shape, chunks=chunks or shape, dtype=dtype,
                              dimension_names=dims, overwrite=True)

    def drop_state(self, run, name):
        if "state" in run and name in run["state"]:
            del run["state"][name]

    def finish(self, run, summary):
        run.attrs.update(_jsonable({"summary": summary, "status": "complete"}))
        if "state" in run and not list(run["state"].keys()):
            del run["state"]
        zarr.consolidate_metadata(self.path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (killed, not yet reaped) is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _jsonable(x):
    """Round-trip through JSON so only plain data reaches the attributes."""
    return json.loads(json.dumps(x, default=_default))


def _default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"{type(o).__name__} is not JSON-serialisable")
