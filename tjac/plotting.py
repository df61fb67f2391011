"""The paper's figures for a stored run (matplotlib, Agg backend, PNG)."""

from __future__ import annotations

import numpy as np


def spectrum_figure(run, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    try:
        S, idx, note = run.sigma("all"), None, "all P singular values (dense)"
    except KeyError:
        parts, idx = [], []
        for which in ("top", "bottom"):
            try:
                s = run.sigma(which)
            except KeyError:
                continue
            parts.append(s)
            idx.append(np.arange(len(s)) if which == "top" else run.P - 1 - np.arange(len(s)))
        if not parts:
            raise KeyError(f"run {run.id!r} has nothing to plot yet")
        S, idx, note = np.concatenate(parts), np.concatenate(idx), "certified top and bottom only"
    order = np.argsort(-S)
    S = S[order]
    idx = np.arange(len(S)) if idx is None else np.asarray(idx)[order]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    ax.semilogy(idx, S, ".", ms=2)
    ax.axhline(1.0, ls="--", c="k", lw=0.8)
    ax.set(xlabel="index i", ylabel=r"$\sigma_i$", title=f"singular values of J ({note})")
    ax = axes[1]
    ax.semilogy(idx, np.abs(S - 1) + 1e-17, ".", ms=2)
    ax.set(xlabel="index i", ylabel=r"$|\sigma_i - 1|$", title="distance from 1 (bulk ~ 0)")
    ax = axes[2]
    for which, c in (("top", "C0"), ("bottom", "C3")):
        try:
            a, s = run.alignment(which), run.sigma(which)
        except KeyError:
            continue
        ax.semilogx(s, a, ".", c=c, label=which)
    ax.set(xlabel=r"$\sigma_i$", ylabel=r"$|u_i \cdot v_i|$", title="alignment of singular vectors",
           ylim=(-0.05, 1.05))
    ax.legend()
    r = run.recipe
    fig.suptitle(f"run {run.id}: {r.describe()}, {r.optim.name}, {r.epochs} epochs, P={run.P}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
