"""The paper's figures for a stored run (matplotlib, Agg backend, PNG)."""

from __future__ import annotations

import numpy as np


def spectrum_figure(run, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .query import _bound_only

    sp = run.spectrum()  # the known sigma, descending, each with its certificate
    if not len(sp.sigma):
        raise KeyError(f"run {run.id!r} has nothing to plot yet")
    S = sp.sigma
    if sp.complete:
        idx, note = np.arange(len(S)), "all P singular values (dense)"
    else:  # the top's indices from 0, the bottom's down from P - 1
        kt = len(run.sigma("top")) if _has(run, "top") else 0
        idx = np.concatenate([np.arange(min(kt, len(S))),
                              run.P - len(S) + np.arange(kt, len(S))])
        note = "certified top and bottom only"
    bound = _bound_only(S, sp.certificate)  # sigma only bounds sigma_true from above
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    ax.semilogy(idx[~bound], S[~bound], ".", ms=2)
    if bound.any():
        ax.semilogy(idx[bound], S[bound], "v", ms=3, c="C1", label="upper bound only (r >= 0.1 sigma)")
        ax.legend()
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


def _has(run, which) -> bool:
    try:
        run.sigma(which)
    except KeyError:
        return False
    return True


def density_figure(run, path: str) -> str:
    """The stored spectral density (``analyses/density``) over log10 σ with its ±2 standard-error
    band, and the stored region counts with their brackets against ε (``analyses/counts``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = run.density()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    ax.plot(d.log10_sigma, d.density, color="C0")
    ax.fill_between(d.log10_sigma, np.maximum(d.density - 2 * d.stderr, 0),
                    d.density + 2 * d.stderr, color="C0", alpha=0.25, label="±2 s.e. (probes)")
    ax.axvline(0.0, color="k", lw=0.6, ls=":")
    ax.set(xlabel=r"$\log_{10}\sigma$", ylabel=r"density (values per decade)",
           title=f"{run.id}: density of singular values ({d.method}, {d.probes} probes, "
                 f"{d.steps} steps)")
    ax.legend(fontsize=8)
    ax = axes[1]
    try:
        c = run.counts()
    except KeyError:
        c = None
    if c is not None:
        eps = sorted(e for e in c if e != "info")
        for i, r in enumerate(("chaotic", "bulk", "stable")):
            est = [c[e][r]["estimate"] for e in eps]
            lo = [c[e][r]["estimate"] - c[e][r]["lower"] for e in eps]
            hi = [c[e][r]["upper"] - c[e][r]["estimate"] for e in eps]
            ax.errorbar(eps, est, yerr=[lo, hi], fmt="o-", color=f"C{i}", capsize=3, label=r)
        ax.set_xscale("log")
        ax.set(xlabel=r"$\varepsilon$", ylabel="count (bracket)", title=f"regions, P = {run.P:,}")
        ax.legend(fontsize=8)
    else:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
