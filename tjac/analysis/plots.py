"""Figures of stored analyses in the paper's style (matplotlib, Agg backend, PNG).

:func:`analysis_figure` draws one stored analysis of a run (``run.analysis(name)``); the figure kind
follows the analysis name (``movement``, ``overlap-*``, ``perturbation-*``, ``restricted``, ``ood``,
``jacobian-null``, ``bulk``, ``variants``). :func:`bulk_prediction_figure` plots predicted against
measured bulk sizes over several runs.
"""

from __future__ import annotations

import numpy as np

from .regions import REGIONS

REGION_COLORS = {"chaotic": "C3", "bulk": "C2", "stable": "C0"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def analysis_figure(run, name: str, path: str) -> str:
    """Draw ``run.analysis(name)`` into ``path`` (PNG); returns the path."""
    a = run.analysis(name)  # KeyError naming the stored analyses if absent
    kind = next((k for k in _KINDS if name == k or name.startswith(k + "-")), None)
    if kind is None:
        raise ValueError(f"no figure for analysis {name!r}; known kinds: {', '.join(_KINDS)}")
    plt = _plt()
    fig = _KINDS[kind](plt, a)
    r = run.recipe
    fig.suptitle(f"{name}: run {run.id}, {r.describe()}, {r.optim.name}, P={run.P}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _movement(plt, a):
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 1]})
    c = a["coefficient"]
    idx = np.arange(len(c))
    reg = a.arrays.get("region")
    if reg is None:
        ax.semilogy(idx, c + 1e-300, ".", ms=3)
    else:
        for i, n in enumerate(REGIONS):
            m = reg == i
            if m.any():
                ax.semilogy(idx[m], c[m] + 1e-300, ".", ms=3, c=REGION_COLORS[n], label=n)
        ax.legend()
    ax.set(xlabel="singular direction i (as stored: top then bottom, or all)",
           ylabel=r"$|v_i \cdot (\theta_T - \theta_0)|$", title="movement along singular directions")
    names = [n for n in REGIONS if f"share_{n}" in a.attrs] + ["outside"]
    vals = [a.attrs.get(f"share_{n}", 0.0) or 0.0 for n in names]
    bx.bar(names, vals, color=[REGION_COLORS.get(n, "0.6") for n in names])
    bx.set(ylabel=r"share of $\|\theta_T - \theta_0\|^2$", ylim=(0, 1))
    return fig


def _overlap(plt, a):
    fig, ax = plt.subplots(figsize=(6, 4))
    c = a["cosine"]
    ax.plot(np.arange(1, len(c) + 1), c, "o-", ms=3, label=f"{a.attrs.get('which', '')} "
            f"(geodesic {a.attrs['geodesic']:.2f})")
    rc = a["random_cosine"]
    if np.isfinite(rc).any():
        ax.plot(np.arange(1, len(rc) + 1), rc, "--", c="0.5",
                label=f"random subspaces (geodesic {a.attrs['random_geodesic']:.2f})")
    ax.set(xlabel="principal angle j", ylabel=r"$\cos\theta_j$", ylim=(-0.02, 1.02),
           title=f"{a.attrs.get('run', '')} vs {a.attrs.get('other', '')}")
    ax.legend()
    return fig


def _perturbation(plt, a):
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    e = a["eps"]
    ax.loglog(e, np.abs(a["along"]), "o-", label=r"$|u \cdot \Delta\theta_T|$")
    ax.loglog(e, a["complement"], "s-", label=r"$\|\Delta\theta_T - (u\cdot\Delta\theta_T) u\|$")
    ax.loglog(e, a["linear"], "k--", label=r"linear: $\epsilon\sigma$")
    ax.set(xlabel=r"$\epsilon$", ylabel="change of $\\theta_T$",
           title=f"retrain from $\\theta_0 + \\epsilon v$ (sigma = {a.attrs['sigma']:.4g})")
    ax.legend()
    bx.semilogx(e, a["test_loss"], "o-")
    bx.axhline(a.attrs["base_test_loss"], ls="--", c="0.5", label="unperturbed")
    bx.set(xlabel=r"$\epsilon$", ylabel="test loss")
    bx.legend()
    return fig


def _restricted(plt, a):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    k = a["k"]
    acc = a["test_acc"] if np.isfinite(a["test_acc"]).any() else -a["test_loss"]
    what = "test accuracy" if np.isfinite(a["test_acc"]).any() else "- test loss"
    for i, n in enumerate(a.attrs["subspaces"]):
        ax.semilogx(k, acc[i], "o-", ms=4, label=n)
    for j, (n, v) in enumerate(a.attrs.get("fixed", {}).items()):
        y = v.get("test_acc") if what == "test accuracy" else -v.get("test_loss")
        if y is not None:
            ax.axhline(y, ls=":", c=f"C{j + 5}", label=f"{n} (k={v['k']})")
    full = a.attrs.get("full", {})
    y = full.get("test_acc") if what == "test accuracy" else -(full.get("test_loss") or 0)
    if y is not None:
        ax.axhline(y, ls="--", c="k", label="unrestricted")
    ax.set(xlabel="subspace dimension k", ylabel=what, title="training restricted to a subspace")
    ax.legend(fontsize=8)
    return fig


def _ood(plt, a):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    sets = a.attrs["input_sets"]
    reg = a.attrs.get("region_kl_max") or {"all": a.attrs["kl_max_overall"]}
    w = 0.8 / max(len(reg), 1)
    for i, (n, d) in enumerate(reg.items()):
        ax.bar(np.arange(len(sets)) + i * w, [max(d[s], 1e-18) for s in sets], w, label=n,
               color=REGION_COLORS.get(n))
    ax.set_yscale("log")
    ax.set_xticks(np.arange(len(sets)) + w * (len(reg) - 1) / 2, sets)
    ax.set(ylabel=r"mean over directions of max$_x$ KL", title=(
        f"KL(p || p perturbed by {a.attrs['scale']:g} v) on and off the data"))
    ax.legend()
    return fig


def _jacobian_null(plt, a):
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    k = a["k"]
    ax.semilogx(k, a["mean_cos2"], "o-", label="bulk vs output-Jacobian near-null space")
    ax.semilogx(k, a["noise_mean_cos2"], "s--", label="bulk vs white-noise inputs' near-null space")
    ax.semilogx(k, a["random_mean_cos2"], "k:", label="random k-plane")
    ax.set(xlabel="k", ylabel=r"mean $\cos^2$ of principal angles", ylim=(-0.02, 1.02))
    ax.legend(fontsize=8)
    return fig


def _bulk(plt, a):
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    lam = a["second_moment"]
    ax.semilogy(np.arange(len(lam)), lam + 1e-300, ".")
    ax.axhline(max(a.attrs["threshold"], 1e-300), ls="--", c="C3", label="threshold")
    t = a.attrs
    ax.set(xlabel="input direction (ascending)", ylabel=r"second moment $E[(x\cdot e)^2]$",
           title=f"predicted bulk {t['predicted']} vs measured {t.get('measured', 'n/a')}")
    ax.legend()
    return fig


def _variants(plt, a):
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.2))
    for i, lab in enumerate(a.attrs["labels"]):
        s = a["sigma"][i]
        m = np.isfinite(s)
        ax.semilogy(np.flatnonzero(m), s[m], ".", ms=2, label=lab)
        bx.semilogy(np.flatnonzero(m), np.abs(s[m] - 1) + 1e-17, ".", ms=2, label=lab)
    ax.axhline(1, ls="--", c="k", lw=0.8)
    ax.set(xlabel="index i", ylabel=r"$\sigma_i$")
    bx.set(xlabel="index i", ylabel=r"$|\sigma_i - 1|$")
    ax.legend()
    return fig


_KINDS = {"movement": _movement, "overlap": _overlap, "perturbation": _perturbation,
          "restricted": _restricted, "ood": _ood, "jacobian-null": _jacobian_null,
          "bulk": _bulk, "variants": _variants}


def bulk_prediction_figure(rows, path: str) -> str:
    """rows: dicts with ``label``, ``predicted``, ``measured`` (None: unknown). Predicted vs measured."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    rows = [r for r in rows if r.get("measured") is not None]
    x = np.array([r["measured"] for r in rows], float)
    y = np.array([r["predicted"] for r in rows], float)
    ax.plot(x, y, "o")
    for r, xi, yi in zip(rows, x, y):
        ax.annotate(r["label"], (xi, yi), fontsize=7)
    hi = max([1.0, *x, *y]) * 1.1
    ax.plot([0, hi], [0, hi], "k--", lw=0.8)
    ax.set(xlabel="measured bulk size", ylabel="predicted bulk size", xlim=(0, hi), ylim=(0, hi),
           title="where the bulk comes from")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
