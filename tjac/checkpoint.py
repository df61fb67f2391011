"""The store's format for a Lanczos solve in progress: ``runs/<id>/state/<top|bottom>/``.

The whole recurrence of :func:`tjac.linalg.svd` (method ``lanczos``) is saved after every step:
the bases ``U`` and ``V`` (rows = basis vectors, one chunk per row, so a step appends rows), the
pending block, the projected matrix ``B``, the residual coupling ``S_last`` and the generator
state. Attributes: ``n_u``, ``n_v``, ``n_pending``, ``step``, ``next_check``, ``history``,
``b_shape``, ``has_s_last``, ``confirm`` (the search for missed copies of a multiple value
under way, or null) and ``save`` (the number of the last complete save).

Rows first, counters last (:mod:`tjac.store`'s commit protocol); the whole basis is rewritten
only after a thick restart. Each save has a number (one step can be saved twice, around a thick
restart). Each array is marked dirty before its data is written and stamped with the save's number
after; then the group's descriptive attributes (``n_u`` ... ``confirm``) in one write; then its
counters ``step`` and ``save`` in a last one: a kill anywhere inside a save leaves some array whose
stamp differs from the group's ``save``, and :meth:`LanczosCheckpoint.load` then refuses the state
(the solve restarts, from the same seed, to the same result) instead of mixing two saves' data.
(Writing the attributes key by key, as zarr's ``attrs.update`` does, let a kill leave a new
``save`` with the previous save's ``history`` and ``next_check``: a resume that was not exact.)
"""

from __future__ import annotations

import numpy as np
import torch

DIRTY = -1  # an array's "save" stamp while it is being rewritten


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
        w, g, P = self.w, self.g, self.P
        save = int(g.attrs.get("save", 0)) + 1
        U, V = st["U"], st["V"]
        nu, nv = U.shape[1], V.shape[1]
        have_u = 0 if st["restarted"] else int(g.attrs.get("n_u", 0))
        have_v = 0 if st["restarted"] else int(g.attrs.get("n_v", 0))
        b = st["pending"].shape[1] if st["pending"] is not None else 0

        def put(name, shape, dtype, dims, write, chunks=None):
            a = w.state_array(g, name, shape, dtype, dims, chunks=chunks)
            w.set_attrs(a, save=DIRTY)
            write(a)
            w.set_attrs(a, save=save)

        def rows(M, have, n):
            def write(a):
                if n > have:
                    a[have:n] = _to_np(M[:, have:n].T)
            return write

        def whole(x):
            def write(a):
                a[:] = x
            return write

        put("U", (P, P), "float64", ("basis_u", "param"), rows(U, have_u, nu), chunks=(1, P))
        put("V", (P, P), "float64", ("basis_v", "param"), rows(V, have_v, nv), chunks=(1, P))
        put("pending", (max(b, 1), P), "float64", ("pending", "param"),
            whole(_to_np(st["pending"].T)) if b else (lambda a: None))
        put("B", tuple(st["B"].shape), "float64", ("b_row", "b_col"), whole(_to_np(st["B"])))
        if st["S_last"] is not None:
            put("S_last", tuple(st["S_last"].shape), "float64", ("s_row", "s_col"),
                whole(_to_np(st["S_last"])))
        gs = st["gen_state"].numpy()
        put("gen_state", gs.shape, "uint8", ("byte",), whole(gs))
        # the store's commit protocol: the descriptive attributes in one write, then the counters
        # (``step`` and the save's number, which the arrays' stamps must match) in a last one
        w.set_attrs(g, n_u=nu, n_v=nv, n_pending=b, next_check=st["next_check"],
                    history=st["history"], b_shape=list(st["B"].shape),
                    has_s_last=st["S_last"] is not None, confirm=st.get("confirm"))
        w.set_attrs(g, step=st["step"], save=save)
        if self.on_save is not None:
            self.on_save()

    def load(self) -> dict | None:
        """The last complete save as tensors on the operator's device, or None (no save yet, or a
        save that a kill interrupted)."""
        g = self.g
        if "step" not in g.attrs:
            return None
        a = dict(g.attrs)
        names = ["U", "V", "pending", "B", "gen_state"] + (["S_last"] if a.get("has_s_last") else [])
        if any(n not in g or g[n].attrs.get("save") != a.get("save") for n in names):
            return None  # the run died inside a save: start the solve again rather than mix steps
        dt, dev = self.op.dtype, self.op.device

        def t(x):
            return torch.from_numpy(np.asarray(x)).to(dev, dt)

        return {"U": t(g["U"][: a["n_u"]]).T.contiguous(),
                "V": t(g["V"][: a["n_v"]]).T.contiguous(),
                "B": t(g["B"][:]),
                "pending": t(g["pending"][: a["n_pending"]]).T.contiguous() if a["n_pending"] else None,
                "S_last": t(g["S_last"][:]) if a.get("has_s_last") else None, "step": a["step"],
                "next_check": a["next_check"], "history": a["history"],
                "confirm": a.get("confirm"),
                "gen_state": torch.from_numpy(np.asarray(g["gen_state"][:]).copy())}
