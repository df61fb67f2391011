"""The store's format for a Lanczos solve in progress: ``runs/<id>/state/<top|bottom>/``.

The recurrence of :func:`tjac.linalg.svd` (method ``lanczos``) is saved after every step, and a
save writes what is new since the last one:

* the bases ``U_<s>``, ``V_<s>`` and ``BT_<s>`` (B's columns) are rows of (P, P) arrays, one chunk
  per row; a step appends its new basis vectors and B's new columns as rows past the committed
  count (B is block upper triangular and its earlier columns never change between restarts). A
  thick restart replaces the basis whole: it is written into the other basis slot (``s`` = 0 or 1),
  beside the committed one, which is deleted once the new one is committed;
* the small dense parts, the pending block, the residual coupling ``S_last`` and the generator
  state, alternate between two slots, ``pending_<t>``, ``S_last_<t>``, ``gen_state_<t>``: a save
  writes the slot that the committed state does not use;
* the group's attributes name the committed state: ``layout`` (2), ``basis`` (s), ``slot`` (t),
  ``n_u``, ``n_v``, ``n_b`` (basis and B columns), ``n_pending``, ``has_s_last``, ``next_check``,
  ``history``, ``confirm`` (the search for missed copies of a multiple value under way, or null),
  ``step`` and ``save`` (the number of the last complete save).

The commit protocol: data first, all of it where the committed state does not read (rows past the
committed counts, the other slot), then the attributes in ONE write of the group's metadata (an
atomic file replace), which commits the save; deletions of what no longer belongs to the
committed state come after it. A kill at any point inside a save therefore leaves the previous
save complete and loadable: the resume continues from it, exactly, and overwrites the dead save's
debris.

Stores written before this layout (``U``, ``V``, ``B``, ``pending``, ``S_last``, ``gen_state``,
rewritten in place with save stamps, no ``layout`` attribute) still load; their next save writes
the whole state in this layout and then removes the old arrays.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

log = logging.getLogger(__name__)

LAYOUT = 2
_OLD = ("U", "V", "B", "pending", "S_last", "gen_state")  # the layout before slots (stamped)
_SMALL = ("pending", "S_last", "gen_state")


def _to_np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


class LanczosCheckpoint:
    """``load()``/``save(state)`` of one Lanczos solve in the zarr group ``g`` (written through the
    store's single :class:`tjac.store.Writer` ``w``); ``op`` gives P, dtype and device."""

    def __init__(self, w, g, op):
        self.w, self.g, self.op = w, g, op
        self.P = op.shape[0]
        self.on_save = None  # called after every save (progress bars)

    def save(self, st: dict) -> None:
        """Write ``st`` (the recurrence after a step, :func:`tjac.linalg.lanczos.gkl`'s
        ``on_step``) by the module's protocol: what is new, where nothing committed is read,
        then one commit."""
        w, g, P = self.w, self.g, self.P
        a = dict(g.attrs)
        ours = a.get("layout") == LAYOUT and "step" in a
        U, V, B = st["U"], st["V"], st["B"]
        n = U.shape[1]
        if V.shape[1] != n or tuple(B.shape) != (n, n):
            raise ValueError(f"a Lanczos state has {n} U and {V.shape[1]} V vectors and a "
                             f"{tuple(B.shape)} B: the bases and B's size must agree")
        if ours:  # the committed basis slot and small-parts slot
            have, basis, slot = int(a["n_b"]), int(a["basis"]), int(a["slot"])
        else:  # a first save (or one over the layout before slots): slots 0
            have, basis, slot = 0, 1, 1
        # a new basis (restart, first save) is written whole, into the slot not committed
        new_basis = not ours or st["restarted"] or have > n
        if new_basis:
            have, basis = 0, 1 - basis
        slot = 1 - slot

        def rows(name, M, dims):  # columns have:n of M as rows of the basis slot's array
            arr = w.state_array(g, f"{name}_{basis}", (P, P), "float64", dims, chunks=(1, P),
                                fresh=new_basis)
            if n > have:
                arr[have:n] = M
        rows("U", _to_np(U[:, have:n].T), ("basis_u", "param"))
        rows("V", _to_np(V[:, have:n].T), ("basis_v", "param"))
        cols = np.zeros((n - have, P))  # B's new columns, zero below n: whole chunks, no stale rows
        cols[:, :n] = _to_np(B[:, have:n].T)
        rows("BT", cols, ("b_col", "b_row"))

        def small(name, x, dims):  # whole, into the slot the committed state does not use
            arr = w.state_array(g, f"{name}_{slot}", x.shape, str(x.dtype), dims)
            arr[...] = x
        b = 0 if st["pending"] is None else st["pending"].shape[1]
        if b:
            small("pending", _to_np(st["pending"].T).astype(np.float64),
                  (f"pending_{slot}", "param"))
        if st["S_last"] is not None:
            small("S_last", _to_np(st["S_last"]).astype(np.float64),
                  (f"s_row_{slot}", f"s_col_{slot}"))
        small("gen_state", st["gen_state"].numpy(), ("byte",))
        # the commit: one write of the group's metadata names the new state
        save = int(a.get("save", 0)) + 1
        w.set_attrs(g, layout=LAYOUT, basis=basis, slot=slot, n_u=n, n_v=n, n_b=n, n_pending=b,
                    has_s_last=st["S_last"] is not None, next_check=st["next_check"],
                    history=st["history"], confirm=st.get("confirm"), step=st["step"], save=save)
        # after it: what the committed state no longer reads (a kill here leaves only debris)
        stale = list(_OLD) if not ours else []
        if new_basis and ours:
            stale += [f"{x}_{1 - basis}" for x in ("U", "V", "BT")]
        for name in stale:
            if name in g:
                del g[name]
        if self.on_save is not None:
            self.on_save()

    def load(self) -> dict | None:
        """The last complete save as tensors on the operator's device, or None (no save yet, or
        a state whose arrays are missing)."""
        g = self.g
        if "step" not in g.attrs:
            return None
        a = dict(g.attrs)
        if a.get("layout") is None:
            return self._load_stamped(a)
        if a["layout"] != LAYOUT:
            log.warning("Lanczos checkpoint layout %r is not this tjac's (%d): the solve starts "
                        "again", a["layout"], LAYOUT)
            return None
        s, t, n = a["basis"], a["slot"], a["n_b"]
        names = [f"U_{s}", f"V_{s}", f"BT_{s}", f"gen_state_{t}"]
        names += [f"pending_{t}"] if a["n_pending"] else []
        names += [f"S_last_{t}"] if a.get("has_s_last") else []
        missing = [x for x in names if x not in g]
        if missing:
            log.warning("Lanczos checkpoint lacks %s: the solve starts again", ", ".join(missing))
            return None
        return self._state(a, g[f"U_{s}"][:a["n_u"]], g[f"V_{s}"][:a["n_v"]],
                           np.asarray(g[f"BT_{s}"][:n, :n]).T,
                           g[f"pending_{t}"][:a["n_pending"]] if a["n_pending"] else None,
                           g[f"S_last_{t}"][:] if a.get("has_s_last") else None,
                           g[f"gen_state_{t}"][:])

    def _load_stamped(self, a: dict) -> dict | None:
        """A state in the layout before slots: each array stamped with its save's number; a
        stamp that differs from the group's ``save`` is a save a kill interrupted (refused)."""
        g = self.g
        names = ["U", "V", "pending", "B", "gen_state"] + (["S_last"] if a.get("has_s_last")
                                                            else [])
        if any(x not in g or g[x].attrs.get("save") != a.get("save") for x in names):
            return None  # the run died inside a save: start the solve again rather than mix steps
        return self._state(a, g["U"][: a["n_u"]], g["V"][: a["n_v"]], g["B"][:],
                           g["pending"][: a["n_pending"]] if a["n_pending"] else None,
                           g["S_last"][:] if a.get("has_s_last") else None, g["gen_state"][:])

    def _state(self, a, U, V, B, pending, S_last, gen_state) -> dict:
        dt, dev = self.op.dtype, self.op.device

        def t(x):
            return torch.from_numpy(np.ascontiguousarray(x)).to(dev, dt)

        return {"U": t(U).T.contiguous(), "V": t(V).T.contiguous(), "B": t(B),
                "pending": None if pending is None else t(pending).T.contiguous(),
                "S_last": None if S_last is None else t(S_last), "step": a["step"],
                "next_check": a["next_check"], "history": a["history"],
                "confirm": a.get("confirm"),
                "gen_state": torch.from_numpy(np.asarray(gen_state).copy())}
