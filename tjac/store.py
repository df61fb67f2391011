"""Results in zarr (format 3): schema, single writer, exact resume, reader. The only zarr importer.

Layout (``dimension_names`` everywhere, so ``xarray.open_datatree(path, engine="zarr")`` reads it)::

    results.zarr/                  attrs: tjac_schema, tjac_version
      runs/<run_id>/               attrs: recipe (JSON), recipe_hash, provenance, request, summary;
                                   status (the run's counter: "running", then "complete")
        theta0, thetaT             (param,)
        solves/<top|bottom>/       sigma (triplet,), residual (triplet, side), u, v (triplet, param)
                                   attrs: k, method, tol, norm_estimate, converged, which;
                                   n_committed (= k, the counter)
        spectrum/                  sigma (index,), residual (index, side): all P singular values and
                                   the residual pair of each, when the dense path ran; n_committed
        state/<name>/              solver checkpoints (J columns, Krylov basis), deleted when done
        analyses/<name>/           one analysis of the run (tjac.analysis): its arrays with
                                   dimension names, its parameters and key numbers in attributes;
                                   n_committed = 1 (the counter)

**One commit protocol** for every group (:meth:`Writer.commit_group`): an earlier group of that
name is retired first (its counter removed, then the group deleted); then its arrays are created
and written; then their descriptive attributes; then one counter attribute, alone, last
(``status`` for a run, ``n_committed`` for a solve, the spectrum and the dense checkpoint; ``step``
for a Lanczos checkpoint, written with its other attributes in one write after the save's new
data, which lies where the committed state does not read: :mod:`tjac.checkpoint`). A kill at any
write leaves a store whose committed part is exact (each attribute step is one write of the
group's metadata, :meth:`Writer.set_attrs`): readers and resumes see a group only once its
counter is there (:func:`committed`), and the next write of a group clears the debris of a killed
one. A store is created with its attributes in one write; an empty directory is an unstarted store.
A finished run writes its summary, then ``status = "complete"``.

One writer: ``<store>/.tjac-lock`` holds its pid; a live pid refuses a second writer, a dead one
(a killed run) is taken over. Nothing read from a store is unpickled or eval'd: attributes are JSON.
"""

from __future__ import annotations

import json
import os
import re
import warnings

import numpy as np
import zarr

SCHEMA = 1
COUNTERS = ("status", "n_committed", "step")  # the attributes that commit a group (written last)
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


def committed(g) -> bool:
    """Whether a group's counter is written (:meth:`Writer.commit_group`): a run with a ``status``,
    a solve or spectrum whose ``n_committed`` reaches its length."""
    a = g.attrs
    if "status" in a:
        return a["status"] is not None
    n = a.get("n_committed")
    return bool(n) and n == a.get("k", n)


def list_runs(root) -> list[str]:
    """The committed runs (a run group without its ``status`` is the debris of a killed creation)."""
    if "runs" not in root:
        return []
    runs = root["runs"]
    return sorted(r for r in runs.group_keys() if "status" in runs[r].attrs
                  and runs[r].attrs["status"] is not None)


def run_group(root, run_id: str):
    check_run_id(run_id)
    if run_id not in list_runs(root):
        raise StoreError(f"no run {run_id!r} in this store (runs: {', '.join(list_runs(root)) or 'none'})")
    return root["runs"][run_id]


def solve_arrays(run, which: str):
    """(sigma, residual, u, v, attrs) of a committed solve, arrays lazy; None if absent or
    uncommitted."""
    if "solves" not in run or which not in run["solves"]:
        return None
    g = run["solves"][which]
    if not committed(g) or any(n not in g for n in ("sigma", "residual", "u", "v")):
        return None
    return g["sigma"], g["residual"], g["u"], g["v"], dict(g.attrs)


_ANALYSIS_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")


def check_analysis_name(name: str) -> str:
    if not isinstance(name, str) or not _ANALYSIS_NAME.match(name):
        raise StoreError(f"analysis name {name!r} must match [a-z][a-z0-9_-]* (at most 64 "
                         f"characters)")
    return name


def list_analyses(run) -> list[str]:
    """The committed analyses of a run."""
    if "analyses" not in run:
        return []
    g = run["analyses"]
    return sorted(n for n in g.group_keys() if committed(g[n]))


def analysis_group(run, name: str):
    """The committed group ``analyses/<name>`` of a run, or None."""
    check_analysis_name(name)
    if name not in list_analyses(run):
        return None
    return run["analyses"][name]


def _spectrum(run):
    if "spectrum" not in run or "sigma" not in run["spectrum"]:
        return None
    g = run["spectrum"]
    n = g.attrs.get("n_committed")
    # stores written before the spectrum had a counter: committed once the run is complete
    if n != g["sigma"].shape[0] and not (n is None and run.attrs.get("status") == "complete"):
        return None
    return g


def full_spectrum(run):
    """All P singular values (descending) when the dense path committed them, else None."""
    g = _spectrum(run)
    return None if g is None else g["sigma"][:]


def spectrum_residual(run):
    """(P, 2) residual pairs of the full spectrum's triplets; None when absent (stores written
    before they were kept, or no full spectrum)."""
    g = _spectrum(run)
    return None if g is None or "residual" not in g else g["residual"][:]


# -- writing ---------------------------------------------------------------------------------------
class Writer:
    """The single writer of a store. Use as a context manager (the lock is released on exit)."""

    def __init__(self, path: str, *, create: bool = True):
        self.path = os.fspath(path)
        unstarted = os.path.isdir(self.path) and not os.listdir(self.path)  # killed at creation
        if os.path.exists(self.path) and not unstarted:
            self.root = _open_existing(self.path, "r+")
        else:
            if not create:
                raise StoreError(f"store {self.path!r} does not exist")
            parent = os.path.dirname(os.path.abspath(self.path))
            if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
                raise StoreError(f"cannot create store {self.path!r}: {parent!r} is not a writable "
                                 f"directory")
            from . import __version__
            # the root with its attributes in one write: a kill leaves no foreign-looking store
            self.root = zarr.open_group(self.path, mode="w-", zarr_format=3,
                                        attributes={"tjac_schema": SCHEMA,
                                                    "tjac_version": __version__})
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

    # the commit protocol
    def commit_group(self, parent, name: str, *, arrays: dict, attrs: dict, counter: tuple):
        """Write group ``parent/name`` by the store's one protocol (module doc): retire an earlier
        group of that name, create and write ``arrays`` (name -> (data, dimension names, chunks or
        None)), write the descriptive ``attrs``, then the ``counter`` (name, value) alone, last."""
        self.retire(parent, name)
        g = parent.create_group(name, overwrite=True)
        for aname, (x, dims, chunks) in arrays.items():
            x = np.asarray(x)
            a = g.create_array(aname, shape=x.shape, dtype=x.dtype, dimension_names=dims,
                               chunks=chunks or tuple(max(n, 1) for n in x.shape), overwrite=True)
            a[...] = x
        if attrs:
            self.set_attrs(g, **attrs)
        self.set_attrs(g, **dict([counter]))
        return g

    def retire(self, parent, name: str) -> None:
        """Delete ``parent/name``, its counter first: a kill inside the deletion leaves an
        uncommitted group (ignored, and cleared by its next write), never a committed one with
        pieces missing."""
        if name not in parent:
            return
        g = parent[name]
        if isinstance(g, zarr.Group) and any(c in g.attrs for c in COUNTERS):
            g.attrs.put({k: v for k, v in g.attrs.items() if k not in COUNTERS})
        del parent[name]

    # runs
    def has_run(self, run_id):
        return check_run_id(run_id) in list_runs(self.root)

    def run(self, run_id):
        return self.root["runs"][check_run_id(run_id)]

    def delete_run(self, run_id):
        self.retire(self.root.require_group("runs"), check_run_id(run_id))

    def create_run(self, run_id, *, recipe_json: str, recipe_hash: str, provenance: dict,
                   theta0: np.ndarray, thetaT: np.ndarray, request: dict | None = None):
        """A new run (replacing the debris of a killed creation): theta_0, theta_T, the recipe,
        provenance and ``request`` (the solve settings a resume must repeat), ``status`` last."""
        attrs = {"recipe": recipe_json, "recipe_hash": recipe_hash, "provenance": provenance}
        if request is not None:
            attrs["request"] = request
        return self.commit_group(self.root.require_group("runs"), check_run_id(run_id),
                                 arrays={"theta0": (theta0, ("param",), None),
                                         "thetaT": (thetaT, ("param",), None)},
                                 attrs=attrs, counter=("status", "running"))

    def set_attrs(self, group, **attrs):
        """Merge ``attrs`` into a group's or array's attributes in ONE write of its metadata
        (zarr's ``attrs.update`` writes the metadata once per key: a kill between those writes
        would leave some attributes of one commit with others of the one before)."""
        group.update_attributes(_jsonable(attrs))

    # results
    def commit_solve(self, run, which: str, *, sigma, residual, U, V, **attrs):
        """k triplets (rows of ``U``, ``V`` are u_i, v_i) and their attributes (method, tol,
        norm_estimate, converged, ...); ``n_committed = k`` last."""
        k, P = len(sigma), np.asarray(U).shape[1]
        return self.commit_group(
            run.require_group("solves"), which,
            arrays={"sigma": (np.asarray(sigma, np.float64), ("triplet",), None),
                    "residual": (np.asarray(residual, np.float64), ("triplet", "side"), None),
                    "u": (U, ("triplet", "param"), (1, P)), "v": (V, ("triplet", "param"), (1, P))},
            attrs={**attrs, "k": k, "which": which}, counter=("n_committed", k))

    def solve_committed(self, run, which: str, k: int | None = None) -> bool:
        got = solve_arrays(run, which)
        return got is not None and (k is None or got[4]["n_committed"] == k)

    def commit_spectrum(self, run, sigma: np.ndarray, residual: np.ndarray | None):
        """All P singular values and the residual pair of each triplet (None: values only, from
        a values-only SVD; readers then use the round-off bound of a backward-stable SVD);
        ``n_committed = P`` last."""
        arrays = {"sigma": (np.asarray(sigma, np.float64), ("index",), None)}
        if residual is not None:
            arrays["residual"] = (np.asarray(residual, np.float64), ("index", "side"), None)
        return self.commit_group(run, "spectrum", arrays=arrays, attrs={},
                                 counter=("n_committed", len(sigma)))

    def commit_analysis(self, run, name: str, *, arrays: dict, attrs: dict):
        """Group ``analyses/<name>`` of a run: ``arrays`` maps an array name to (data, dimension
        names); ``attrs`` are the analysis' parameters and key numbers (JSON). Replaces an earlier
        analysis of that name by the commit protocol; a complete run's metadata is consolidated
        again afterwards."""
        check_analysis_name(name)
        reserved = set(attrs) & (set(COUNTERS) | {"k", "analysis"})
        if reserved:
            raise StoreError(f"analysis attributes may not use the reserved names "
                             f"{sorted(reserved)} (the store's commit counters)")
        out = {}
        for aname, (x, dims) in arrays.items():
            x = np.asarray(x)
            if x.dtype == object or x.ndim != len(dims):
                raise ValueError(f"analysis array {aname!r}: {x.ndim} dimensions, {len(dims)} "
                                 f"names {tuple(dims)!r}")
            out[aname] = (x, tuple(dims), None)
        g = self.commit_group(run.require_group("analyses"), name, arrays=out,
                              attrs={**attrs, "analysis": name}, counter=("n_committed", 1))
        if run.attrs.get("status") == "complete":
            zarr.consolidate_metadata(self.path)
        return g

    def spectrum_committed(self, run) -> bool:
        return _spectrum(run) is not None

    # solver checkpoints
    def state_group(self, run, name):
        return run.require_group("state").require_group(name)

    def state_array(self, g, name, shape, dtype, dims, chunks=None, fresh=False):
        """Array ``name`` of checkpoint group ``g``: the existing one when its shape matches and
        ``fresh`` is False, else created anew (``fresh``: no chunk of an earlier use is left)."""
        if not fresh and name in g and tuple(g[name].shape) == tuple(shape):
            return g[name]
        return g.create_array(name, shape=shape, chunks=chunks or shape, dtype=dtype,
                              dimension_names=dims, overwrite=True)

    def drop_state(self, run, name):
        if "state" in run:
            self.retire(run["state"], name)

    def finish(self, run, summary):
        """The summary, then the run's counter ``status = "complete"``."""
        self.set_attrs(run, summary=summary)
        self.set_attrs(run, status="complete")
        if "state" in run and not list(run["state"].keys()):
            del run["state"]
        zarr.consolidate_metadata(self.path)


    # moving a whole run between stores (a distributed sweep's ranks: tjac.scale)
    def import_run(self, run_id: str, manifest: dict, data: list) -> None:
        """Write a complete run exported by :func:`export_run` (from another store, another rank)
        by the commit protocol: an earlier run of that id is retired; every group's arrays are
        written before its attributes, every counter after its group's data, and the run's
        ``status`` last of all. Names are checked as every store name is (no path leaves the
        run's group)."""
        check_run_id(run_id)
        groups, arrays = manifest.get("groups"), manifest.get("arrays")
        if not isinstance(groups, list) or not isinstance(arrays, list) or len(arrays) != len(data):
            raise StoreError(f"run {run_id!r}: a malformed export (groups/arrays)")
        runs = self.root.require_group("runs")
        self.retire(runs, run_id)
        top = runs.create_group(run_id, overwrite=True)

        def resolve(path: str, *, array: bool):
            parts = path.split("/") if path else []
            if any(not _NAME.match(p) for p in parts) or (array and not parts):
                raise StoreError(f"run {run_id!r}: the export names {path!r}, not a store path")
            g = top
            for p in parts[:-1] if array else parts:
                g = g.require_group(p)
            return g, (parts[-1] if array else None)

        for meta, x in zip(arrays, data):
            g, name = resolve(str(meta["path"]), array=True)
            x = np.asarray(x).reshape(meta["shape"])
            a = g.create_array(name, shape=x.shape, dtype=x.dtype,
                               dimension_names=meta.get("dims") or None,
                               chunks=tuple(meta.get("chunks") or x.shape) or None,
                               overwrite=True)
            a[...] = x
            if meta.get("attrs"):
                self.set_attrs(a, **meta["attrs"])
        # deepest groups first, so a parent's counter is never written before its children's
        for meta in sorted(groups, key=lambda m: -str(m["path"]).count("/") - bool(m["path"])):
            g, _ = resolve(str(meta["path"]), array=False)
            attrs = dict(meta.get("attrs") or {})
            counters = {k: attrs.pop(k) for k in COUNTERS if k in attrs}
            if attrs:
                self.set_attrs(g, **attrs)
            if counters:
                self.set_attrs(g, **counters)
        zarr.consolidate_metadata(self.path)


_NAME = re.compile(r"^(?!zarr\.json$)(?!__)[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")  # no zarr
# metadata file and no zarr-reserved "__" name: a group or array name, nothing else


def export_run(root, run_id: str) -> tuple[dict, list]:
    """A committed run as (manifest, arrays): the manifest is plain JSON (each group's path and
    attributes; each array's path, shape, chunks, dimension names and attributes) and ``arrays``
    the arrays' data in the manifest's order. :meth:`Writer.import_run` writes it into another
    store."""
    run = run_group(root, run_id)
    groups, arrays, data = [], [], []

    def walk(g, path):
        groups.append({"path": path, "attrs": dict(g.attrs)})
        for name, a in sorted(g.arrays()):
            arrays.append({"path": f"{path}/{name}" if path else name, "shape": list(a.shape),
                           "chunks": list(a.chunks), "dtype": str(a.dtype),
                           "dims": list(a.metadata.dimension_names or []),
                           "attrs": dict(a.attrs)})
            data.append(np.asarray(a[...]))
        for name, sub in sorted(g.groups()):
            walk(sub, f"{path}/{name}" if path else name)

    walk(run, "")
    return {"run": run_id, "groups": groups, "arrays": arrays}, data


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
