r"""How many singular values of J lie in an interval, and their density, from products only
(any operator with ``shape``, ``dtype``, ``matmat`` and ``rmatmat``; the paper's regions on top of
it are :mod:`tjac.analysis.density`).

**Stochastic Lanczos quadrature (SLQ) on JᵀJ.** For a probe z (Rademacher), Lanczos on A = JᵀJ
started at z/‖z‖ with m steps gives a tridiagonal T_m; its eigenvalues θ_j and the squared first
components τ_j of its eigenvectors, scaled by ‖z‖², are the nodes and weights of the m-point Gauss
rule of the spectral measure μ_z = Σ_i (zᵀv_i)² δ(λ − σ_i²). Since E[(zᵀv_i)²] = 1, the number of
σ_i in [lo, hi] is E[μ_z([lo², hi²])]: one probe is one unbiased sample, and every probe's
products share one training replay (the probes are the columns of one block). By default
(``reorth='full'``) each probe is reorthogonalized in full (twice, classical Gram–Schmidt) in
float64 (a float32 operator's products are promoted; the breakdown test is at 1e3 eps of the
operator's dtype), so T_m is the exact Gauss rule to round-off: no ghost copies of the large
values. ``reorth='none'`` keeps no basis (below).

**A probe whose Krylov space closes** (β_m below 1e-8 λ_max, round-off amplified by the basis'
condition) stops there. Its rule is exact only up to that β: values of JᵀJ closer than about β to
one another or to 0 (σ below ~1e-4 σ_max) are not told apart. So the closing β is kept as the last
coefficient and the bracket below is taken with it: an interval end close to a node (within β times
the node's last eigenvector component, or within the 1e-9 λ_max a Radau end steps off a node by)
stays open, every other end is closed to round-off. A Radau end within 1e3 ε (of the rule's
scale) of a Gauss node steps off by that much, outward for both bounds: the computed T_m is
exact for a measure whose atoms moved by round-off, and a Radau rule through a point inside such a
cluster splits it across the end (an end exactly on a converged σ missed up to ~1e-5 of a probe's
count before). A β below
ε λ_max, the round-off of the coefficients themselves, counts as zero: the rule is exact, but for
nodes within round-off of an end (1e3 ε of the operator's dtype), which count on both sides of it.
Taking the rule as exact instead gave a planted near-null tail's count as 21.2 against a probe's
true 4.5 (``tests/test_density.py``).

**Without reorthogonalization** (``reorth='none'``: a few vectors per probe, memory O(P · probes)
instead of the basis' O(P · probes · steps), and steps not capped at P) the recurrence loses
orthogonality once a Ritz value converges and repeats it (ghost copies). By Paige's and Greenbaum's
analyses of the plain recurrence in finite precision, its T_m is the exact Lanczos matrix of a
measure whose atoms are spread over tiny intervals around the true ones, with the same total weight
near each, so the bracket below holds up to that spread (an end within about 1e-10 relative of a σ²
can miss by a small share of that σ's weight: a few 1e-4 of a probe's count in stress tests with
ends exactly on σ, a spread wider than the full recurrence's round-off step; every bracket of the
benchmark runs contained the exact count). But the ghosts take nodes that would otherwise resolve
the interval's ends: on the paper's recipe at P = 1,210 (σ_max = 32), bulk(1e-2) was still 22% wide
at 2,500 steps where the full recurrence reached 10% at 500 (BENCHMARKS.md, "Interval counts"):
about ten times the products. It is for memory, not speed; ``reorth='auto'`` takes the full
recurrence while its basis fits.

**Precision.** The recurrence, its basis and its reorthogonalization run in float64 whatever
the operator's dtype (a float32 operator's products are promoted: the basis takes 8 bytes a
value). The products keep their own round-off: a float32 product gives (JᵀJ + E) x with
‖E x‖ ≈ 0.7–1.3 ε σ_max² for a unit x (ε = 1.2e-7, measured at P = 120–500), so the rules are
those of a JᵀJ + H with ‖H‖ ≲ η = 2 ε σ_max² (``ROUNDOFF_SPREAD``, :meth:`Quadrature.roundoff`).
H moves each atom by at most η, and it turns the eigenvectors: mass crosses an end t even where
no σ² lies near it, to first order at most about √(F (M − F)) ‖H‖ / d (F the probe's mass below
t, M its total, d the distance from t to the nearest σ²). For products below float64 each
probe's bracket is therefore taken with its ends moved out (in) by η and widened at each end by
that term, with d the distance to the rule's nearest Gauss node. This is a round-off model, not
a theorem: on planted float32 spectra (P = 120–300, ends between the σ, both recurrences)
13–50% of the per-probe brackets missed the exact measure without it (by ~1e-4 of a probe's
count; 362 of the 504 converged ones in ``tests/test_density.py``, 358 with the float64
recurrence alone), none with it, and the largest miss it had to cover was under 1% of the
term. The price is width where float32 cannot tell: ends below ~5e-4 σ_max, within ~η of a σ²,
or near a Gauss node open the bracket instead of missing. In float64 the term is left out (η
would be ~4e-16 σ_max², far below any window counted here): float64 results are unchanged.

**A bracket you can defend.** The m Lanczos steps fix the first 2m + 1 moments of μ_z (the
coefficients α_1…α_m, β_1…β_m). Among all measures with those moments, the distribution function
at a point t is confined by the Markov–Krein theorem (the Chebyshev–Markov–Stieltjes inequalities
for the canonical representation through t): the Gauss–Radau rule with a node fixed at t (m + 1
nodes, exact to degree 2m) puts mass L_t below t and ρ_t at t, and

    L_t ≤ F(t − 0) ≤ F(t) ≤ L_t + ρ_t,

where ρ_t, the Christoffel function at t, is the narrowest bracket those moments allow. A count
over [a, b] is F(b) − F(a − 0), so each probe's count lies in a guaranteed
[L_b − L_a − ρ_a, L_b + ρ_b − L_a] (the quadrature's part of the error: it shrinks as nodes crowd
the interval's ends), widened by (m + 1) ε ‖z‖², the round-off of the rules' weights (an
interval holding none of a probe's mass otherwise got a lower bound a few ulps above 0, above
its estimate and the truth). This is about half as wide as the bracket the Gauss rule's own
partial sums give (Σ_{j<p} τ_j ≤ F(t) ≤ Σ_{j≤p+1} τ_j for θ_p ≤ t < θ_{p+1}: two nodes' weights
per end), which is used for a :class:`Quadrature` that carries no coefficients. The sampling part is the
spread across probes: the reported bracket is [mean(lower) − t·se(lower), mean(upper) + t·se(upper)]
with Student's t at ``confidence`` (default 95%). The point estimate is the plain Gauss-rule count
(nodes inside the interval), its ``stderr`` the probes' standard error.

**Cost: resolution.** The Gauss nodes near σ = 1 are spaced about π σ_max / m apart (the
spectrum of A spans [0, σ_max²]), so resolving a window 1 ± ε takes m ∝ σ_max / ε steps, 2 products
each per probe, times a factor set by how crowded the σ are at the window's ends (BENCHMARKS.md,
"Interval counts": 0.13–0.15 σ_max/ε at P = 610, ε = 0.1; for a 10% bracket at ε = 1e-2 on the
paper's recipe, both ends inside the continuum around the bulk, the steps grow with P instead:
about 20 √P with the Gauss bracket, 700 / 1,200 / 1,400 / 2,000 steps at P = 1,210 / 2,410 /
4,810 / 9,610, and 500 / 850 / 1,100 at P = 1,210 / 2,410 / 4,810 with the Gauss–Radau bracket).
Deflation helps when it lowers σ_max: ``deflate=(V, sigma)`` with certified right singular
vectors (a computed top, the structural σ = 1 directions) restricts the probes and every Lanczos
vector to the complement of V and adds V's values to the counts exactly. Steps stop when the
quadrature part of the bracket is below ``rtol`` of the count (checked every ``check_every``
steps, and at least 5% of the steps apart) or a probe's Krylov space closes (then its rule is
exact up to the β it closed at, below).

When the dense path is cheaper (the expected SLQ products exceed P, measured after the first
steps) and J fits in memory, ``method="auto"`` counts from the dense singular values instead; the
result says which path it took.

**gpytorch's Lanczos** (``linear_operator.utils.lanczos.lanczos_tridiag``, batched probes
through one closure) was checked for this and is not used: it runs a fixed number of steps into a
preallocated (steps, P, probes) basis (no stopping at a resolution, no resuming); it stops every
probe together on an *absolute* β ≤ 1e-6, so the same spectrum in smaller units (J scaled by
1e-4) ends after the first steps with a rule that lacks the moments asked for
(``tests/test_density.py``); it goes on dividing a probe whose Krylov space closed by its ~0 β;
and it reorthogonalizes a second time only while an overlap is *positive* (on the spectra tried
here its first pass already kept ‖QᵀQ − I‖ at 2e-15, so this did not bite). Its
``lanczos_tridiag_to_diag`` sets negative Ritz values to 1, which would move round-off nodes of
JᵀJ's null space into the bulk. The recurrence here stops per probe on a relative β, at a
resolution, and deflates. J is offered to gpytorch users as a ``linear_operator`` operator:
:meth:`tjac.TrainingJacobian.to_linear_operator`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

REORTH_PASSES = 2
# beta below BREAKDOWN * lambda_max: the probe's Krylov space closed (the computed beta of a space
# that closed in exact arithmetic is round-off amplified by the Krylov basis' condition: measured
# 2e-10 lambda_max with five distinct values spread over 3.7 decades). The probe stops; the beta
# it closed at is kept for its bracket (module doc), unless it is below eps * lambda_max, the
# round-off of the coefficients themselves (then the rule is exact)
BREAKDOWN = 1e-8            # float64; in a lower precision 1e3 eps of the operator's dtype
DENSE_MEMORY_SHARE = 0.5   # the dense fallback may use this share of the available memory
CHECK_SPACING = 0.05       # resolution checks at least this share of the steps apart (overshoot)
RADAU_STEP_OFF = 4         # times a Radau end may step off a Gauss node (1e-9 scale, then x10)
# products below float64 (float32): J^T J x comes back as (J^T J + E) x, ||E x|| measured at
# 0.7-1.3 eps sigma_max^2 per unit x (P = 120-500, float32); the rules are then those of a
# J^T J + H with ||H|| within about this many eps sigma_max^2 (module doc, "Precision")
ROUNDOFF_SPREAD = 2.0
RADAU_ROUNDOFF = 1e3       # a Radau end steps off by this many eps * scale (round-off of the rule)


@dataclass(frozen=True)
class IntervalCount:
    """How many singular values lie in [lo, hi]: a point ``estimate`` and a ``lower``/``upper``
    bracket (quadrature bounds widened by the probes' spread at ``confidence``)."""
    lo: float
    hi: float
    estimate: float
    lower: float
    upper: float
    stderr: float
    confidence: float
    method: str                 # "slq" or "dense"
    P: int
    probes: int
    steps: int                  # Lanczos steps of the longest probe
    products: int               # J and Jᵀ products spent (all probes)
    seconds: float
    sigma_max: float
    resolution: float           # mean width of one probe's quadrature bracket (count units)
    deflated: int = 0           # values counted exactly from ``deflate`` (included above)
    resolved: bool = True       # the quadrature part reached ``rtol`` (or the dense path)

    def as_dict(self) -> dict:
        return {n: getattr(self, n) for n in self.__dataclass_fields__}


@dataclass(frozen=True)
class Density:
    """Density of singular values over log10 σ (integrates to P over the grid's range and tails),
    smoothed by a Gaussian of ``bandwidth`` decades; ``stderr`` is the probes' standard error."""
    log10_sigma: np.ndarray
    density: np.ndarray
    stderr: np.ndarray
    bandwidth: float
    method: str
    P: int
    probes: int
    steps: int
    products: int


@dataclass
class Quadrature:
    """Gauss rules of the probes: ``nodes[i]`` (ascending σ² values) and ``weights[i]`` (sum ‖z_i‖²,
    about P − deflated), with the exactly known deflated values ``deflated_sigma``."""
    nodes: list
    weights: list
    P: int
    probes: int
    steps: int
    products: int
    seconds: float
    sigma_max: float
    exact: list                   # per probe: its Krylov space closed (see jacobi's last beta)
    deflated_sigma: np.ndarray = field(default_factory=lambda: np.zeros(0))
    method: str = "slq"
    history: list = field(default_factory=list)  # (steps, bracket width, count) per check
    # per probe: the Lanczos coefficients (alpha (m,), beta (m,), the last beta included) that
    # give the Gauss-Radau rules through the interval's ends (the tightest bracket); None: the
    # Gauss rule's looser bracket
    jacobi: list | None = None
    reorth: str | None = "full"   # the Lanczos vectors' reorthogonalization: 'full' or 'none'
                                  # (None: the dense path)
    eps: float = float(np.finfo(np.float64).eps)  # round-off of the operator's dtype

    # -- counts ------------------------------------------------------------------------------------
    def probe_counts(self, lo: float, hi: float):
        """(estimate, lower, upper) per probe for the σ interval [lo, hi] (deflated values
        excluded); a probe that closed on a zero beta has an exact rule (lower = upper, but for
        nodes within round-off of an end, which count on both sides). Products in a precision
        below float64 widen each bracket by their round-off (:meth:`roundoff`, module doc)."""
        a, b = lo * lo, hi * hi
        eta = self.roundoff()
        est, low, up = [], [], []
        jac = self.jacobi or [None] * len(self.nodes)
        for x, w, exact, ab in zip(self.nodes, self.weights, self.exact, jac):
            c = np.concatenate([[0.0], np.cumsum(w)])          # c[p] = sum of the first p weights
            est.append(_mass(x, c, a, b))   # the same partial sums as the brackets
            if eta == 0.0:
                lw, uw = _bracket(x, w, c, exact, ab, a, b, self.eps)
            else:
                # the rules are those of J^T J + H, ||H|| <= eta: each atom moved by at most
                # eta (the ends step out, or in, by it) and each end's count moved by the
                # first-order perturbation of the spectral projector (_roundoff_mass)
                a_in, a_out = (a, a) if a <= 0.0 else (a + eta, max(a - eta, 0.0))
                b_in, b_out = (b, b) if b == math.inf else (b - eta, b + eta)
                lw = _bracket(x, w, c, exact, ab, a_in, b_in, self.eps)[0] if b_in > a_in \
                    else 0.0
                uw = _bracket(x, w, c, exact, ab, a_out, b_out, self.eps)[1]
                r = _roundoff_mass(x, c, a, eta) + _roundoff_mass(x, c, b, eta)
                lw, uw = max(0.0, lw - r), min(float(c[-1]), uw + r)
            low.append(lw)
            up.append(uw)
        return np.array(est), np.array(low), np.array(up)

    def roundoff(self) -> float:
        """The spread, in σ², that the products' round-off gives the rules' measure: 0 for
        float64 products (the recurrence's own round-off, handled in place), else
        ``ROUNDOFF_SPREAD`` eps σ_max² of the operator's dtype (module doc)."""
        if self.method == "dense" or self.eps <= float(np.finfo(np.float64).eps):
            return 0.0
        return ROUNDOFF_SPREAD * self.eps * self.sigma_max ** 2

    def count(self, lo: float, hi: float, *, confidence: float = 0.95,
              resolved: bool = True) -> IntervalCount:
        _check_interval(lo, hi)
        dfl = int(((self.deflated_sigma >= lo) & (self.deflated_sigma <= hi)).sum())
        if self.method == "dense":
            n = float(self.probe_counts(lo, hi)[0][0])
            return IntervalCount(lo, hi, n + dfl, n + dfl, n + dfl, 0.0, confidence, "dense",
                                 self.P, 0, 0, self.products, self.seconds, self.sigma_max, 0.0,
                                 dfl, True)
        est, low, up = self.probe_counts(lo, hi)
        N = len(est)
        t = _t_quantile(confidence, N - 1)
        se = lambda x: float(np.std(x, ddof=1) / math.sqrt(N)) if N > 1 else math.inf  # noqa: E731
        # a count is at most P; the probes' masses (about P - deflated) carry round-off, so the
        # estimate is held to P as its bracket is (else it can end a few ulps above the bracket)
        P = float(self.P)
        lower = min(P, max(0.0, float(low.mean()) - t * se(low)) + dfl)
        upper = min(P, float(up.mean()) + t * se(up) + dfl)
        return IntervalCount(lo, hi, min(P, float(est.mean()) + dfl), lower, upper, se(est),
                             confidence, "slq", self.P, N, self.steps, self.products, self.seconds,
                             self.sigma_max, float((up - low).mean()), dfl, resolved)

    @property
    def closed(self) -> bool:
        """No further steps can narrow the rules: the dense path, every probe's Krylov space
        closed, or fully reorthogonalized steps spanning the (undeflated) space."""
        return self.method == "dense" or all(self.exact) or self._spans()

    def _spans(self) -> bool:
        return self.reorth == "full" and self.steps >= self.P - len(self.deflated_sigma)

    def resolved(self, c: IntervalCount, rtol: float) -> bool:
        """Whether count ``c`` of this quadrature is resolved: its quadrature bracket is below
        ``rtol`` of the count (deflated values excluded), or the rules are the measure itself
        (the dense path). A probe that closed (or spanned the space) is exact only up to the
        round-off beta it closed at, so its bracket decides."""
        return self.method == "dense" or c.resolution <= rtol * max(c.estimate - c.deflated, 1.0)

    # -- density -----------------------------------------------------------------------------------
    def density(self, log10_sigma=None, *, bandwidth: float = 0.05, floor: float = 1e-6) -> Density:
        """Gaussian-smoothed density over log10 σ. Values below ``floor`` σ_max are put at the
        floor: the near-null tail is one lump at the left edge. Lanczos on JᵀJ works with σ²
        (absolute round-off ~eps σ_max²), so it places σ below ~1e-5 σ_max only roughly (measured
        on a planted tail from 1e-14 to 1e-3: nodes off by up to a decade below 1e-5 σ_max, right
        above); counts across σ = 1 ± ε are unaffected. The dense path is shown on the same terms."""
        if not bandwidth > 0:
            raise ValueError(f"`bandwidth` must be > 0 decades, got {bandwidth!r}")
        smin = max(self.sigma_max, 1e-300) * floor
        if log10_sigma is None:
            log10_sigma = np.linspace(math.log10(smin), math.log10(max(self.sigma_max, 1.0)) + 0.1,
                                      400)
        g = np.asarray(log10_sigma, dtype=np.float64)
        per = []
        for x, w in zip(self.nodes, self.weights):
            s = np.log10(np.sqrt(np.maximum(x, smin * smin)))
            k = np.exp(-0.5 * ((g[:, None] - s[None, :]) / bandwidth) ** 2)
            per.append(k @ w / (bandwidth * math.sqrt(2 * math.pi)))
        per = np.array(per)
        if len(self.deflated_sigma):
            s = np.log10(np.maximum(self.deflated_sigma, smin))
            k = np.exp(-0.5 * ((g[:, None] - s[None, :]) / bandwidth) ** 2)
            per = per + k.sum(1) / (bandwidth * math.sqrt(2 * math.pi))
        N = per.shape[0]
        se = per.std(0, ddof=1) / math.sqrt(N) if N > 1 else np.zeros_like(g)
        return Density(g, per.mean(0), se, float(bandwidth), self.method, self.P, self.probes,
                       self.steps, self.products)


# -- public functions ------------------------------------------------------------------------------
def slq(op, *, probes: int = 16, steps: int = 200, seed: int = 0, deflate=None,
        target=None, rtol: float = 0.05, check_every: int = 25, min_steps: int = 20,
        method: str = "slq", reorth: str = "full", available_bytes: int | None = None,
        callback=None) -> Quadrature:
    """Gauss rules of ``probes`` Rademacher probes of JᵀJ (module doc), at most ``steps`` Lanczos
    steps each. With ``target=(lo, hi)`` it stops as soon as the quadrature part of that count's
    bracket is below ``rtol`` of it. ``method``: 'slq', 'dense' or 'auto' (dense when the
    expected SLQ products exceed P and J fits). ``reorth``: 'full' keeps every Lanczos vector and
    reorthogonalizes against all of them at every step; 'none' keeps a few per probe (memory O(P ·
    probes), module doc: sound but slow to narrow); 'auto' takes 'full' while its basis fits in
    memory, else 'none'."""
    _check_op(op)
    P = op.shape[0]
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 2:
        raise ValueError(f"`probes` must be an integer >= 2 (one probe has no error bar), got "
                         f"{probes!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"`steps` must be a positive integer, got {steps!r}")
    if target is not None and steps < min_steps:
        raise ValueError(f"a step budget of {steps} is below the minimum of {min_steps} Lanczos "
                         f"steps per probe that an interval count needs")
    if method not in ("slq", "dense", "auto"):
        raise ValueError(f"unknown method {method!r}; expected 'slq', 'dense' or 'auto'")
    if not (0 < rtol < 1):
        raise ValueError(f"`rtol` must be in (0, 1), got {rtol!r}")
    if reorth not in ("full", "none", "auto"):
        raise ValueError(f"unknown reorth {reorth!r}; expected 'full', 'none' or 'auto'")
    if target is not None:
        _check_interval(*target)
    V, dsig = _deflation(deflate, P)
    work = _work_dtype(op.dtype)
    if V is not None:
        V = V.to(op.device, work)
    if method == "dense":
        return _dense(op, V, dsig)
    t0 = time.perf_counter()
    budget = _available(available_bytes, op.device)
    per_step = P * probes * work.itemsize   # the basis is kept in the recurrence's dtype
    space = P - (0 if V is None else V.shape[1])
    need = (min(steps, space) + 2) * per_step  # the full basis
    if reorth == "auto":
        reorth = "full" if need <= DENSE_MEMORY_SHARE * budget else "none"
    if reorth != "none":  # a basis spanning the space ends the recurrence; the plain one goes on
        steps = min(steps, space)
    if reorth == "full" and need > DENSE_MEMORY_SHARE * budget:
        raise MemoryError(f"SLQ with {probes} probes x {steps} steps keeps a {need / 2**30:.1f} GiB "
                          f"basis; about {budget / 2**30:.1f} GiB is available: use fewer probes "
                          f"per call, fewer steps or reorth='none'")
    gen = torch.Generator().manual_seed(int(seed))
    Z = (torch.randint(0, 2, (P, probes), generator=gen, dtype=torch.float64) * 2 - 1)
    Z = Z.to(op.device, work)
    if V is not None:
        Z = Z - V @ (V.T @ Z)
    run = _ProbeLanczos(op, Z, V, reorth=reorth)
    history = []  # (steps, quadrature bracket width, count) at each check of ``target``
    next_check = max(min_steps, check_every)
    while run.m < steps:
        run.step()
        if callback is not None:
            callback({"step": run.m, "active": int(run.active.sum()), "products": run.products})
        if not bool(run.active.any()):
            break
        if run.m == min_steps and method == "auto" and _dense_is_cheaper(run, P, target, rtol,
                                                                          steps, budget):
            products0 = run.products
            q = _dense(op, V, dsig)
            q.products += products0
            q.seconds = time.perf_counter() - t0
            return q
        if target is not None and run.m >= next_check:
            # checks every ``check_every`` steps and at least CHECK_SPACING of the steps apart: a
            # check costs O(m^2) per probe (three tridiagonal eigenproblems), so late checks
            # would otherwise outweigh the products on cheap operators
            next_check = run.m + max(check_every, int(CHECK_SPACING * run.m))
            q = run.quadrature(P, dsig, t0)
            c = q.count(*target)
            history.append((run.m, c.resolution, c.estimate - c.deflated))
            if q.resolved(c, rtol):
                q.history = history
                return q
    q = run.quadrature(P, dsig, t0)
    q.history = history
    return q


def count_in_interval(op, lo: float, hi: float, *, probes: int = 16, rtol: float = 0.05,
                      max_steps: int = 2000, seed: int = 0, deflate=None,
                      confidence: float = 0.95, method: str = "auto", check_every: int = 25,
                      reorth: str = "full", available_bytes: int | None = None,
                      callback=None) -> IntervalCount:
    """The number of singular values of ``op`` in [lo, hi] with a bracket (module doc).

    Lanczos steps run until the quadrature part of the bracket is below ``rtol`` of the count
    (``max_steps`` at most); when the budget ends first, :class:`ResolutionError` says how many
    steps it would need (extrapolated from the bracket's decay) and carries the wider result.
    ``deflate=(V, sigma)``: known right singular vectors (P, k) and their values, counted exactly.
    """
    _check_interval(lo, hi)
    q = slq(op, probes=probes, steps=max_steps, seed=seed, deflate=deflate, target=(lo, hi),
            rtol=rtol, check_every=check_every, method=method, reorth=reorth,
            available_bytes=available_bytes, callback=callback)
    c = q.count(lo, hi, confidence=confidence)
    if not q.resolved(c, rtol):
        c = IntervalCount(**{**c.as_dict(), "resolved": False})
        if q.closed:
            raise ResolutionError(
                f"every probe's Krylov space closed after {q.steps} Lanczos steps and [{lo:g}, "
                f"{hi:g}] still has a quadrature bracket of {c.resolution:.3g} values: an end "
                f"lies on a singular value, to within the level at which the probes closed (at "
                f"most 1e-8 sigma_max^2 in sigma^2 in float64), and more steps will not narrow "
                f"it; move the ends off it, or method='dense'", c)
        short = (f"{max_steps} Lanczos steps per probe resolve [{lo:g}, {hi:g}] to a quadrature "
                 f"bracket of {c.resolution:.3g} values, above rtol={rtol:g} of the count ")
        need = _extrapolate(q.history, rtol, op.shape[0] if q.reorth != "none" else None)
        if need is None:
            raise ResolutionError(
                f"{short}{c.estimate:.4g}, and it narrows too slowly to say when it would reach "
                f"it (reorth='none'): reorth='full', or a larger rtol", c)
        raise ResolutionError(
            f"{short}{c.estimate:.4g}: it needs about {need} steps (max_steps), or a larger rtol", c)
    return c


def spectral_density(op, *, probes: int = 16, steps: int = 200, seed: int = 0, deflate=None,
                     bandwidth: float = 0.05, log10_sigma=None, method: str = "auto",
                     reorth: str = "full", available_bytes: int | None = None) -> Density:
    """Density of the singular values over log10 σ from ``steps`` Lanczos steps per probe
    (:func:`slq`), or from the dense spectrum when that is cheaper (``method='auto'``)."""
    q = slq(op, probes=probes, steps=steps, seed=seed, deflate=deflate, method=method,
            reorth=reorth, available_bytes=available_bytes)
    return q.density(log10_sigma, bandwidth=bandwidth)


def steps_needed(sigma_max: float, half_width: float, *, factor: float | None = None) -> int:
    """Cost model: Lanczos steps per probe to resolve a window of ``half_width`` around σ = 1
    when the spectrum is dense across its ends (m ≈ ``factor`` σ_max / half_width; ``factor``
    measured, BENCHMARKS.md). Used by ``method='auto'`` to compare with the dense path's P."""
    f = STEPS_FACTOR if factor is None else factor
    return int(math.ceil(f * sigma_max / half_width))


# steps * half-width / sigma_max: 0.13-0.15 measured at P = 610, eps = 0.1; 0.22-1.64 for a 10%
# bracket at eps = 1e-2 from P = 1,210 to 9,610 (BENCHMARKS.md): an optimistic lower figure
STEPS_FACTOR = 0.1


class ResolutionError(ValueError):
    """The step budget ended before the count was resolved to ``rtol``; ``result`` holds the
    (wider) bracket reached."""

    def __init__(self, message, result):
        super().__init__(message)
        self.result = result


def _extrapolate(history, rtol, P) -> int | None:
    """Steps at which the quadrature bracket would reach ``rtol`` of the count, from its decay
    over the last checks (width ~ m^-p); at most ``P`` (a basis spanning the space; None for
    the plain recurrence, which has no such cap: then None when the decay gives no estimate
    below 1e9)."""
    pts = [(m, w, c) for m, w, c in history if w > 0]
    if len(pts) < 2 or pts[-1][1] >= pts[-2][1]:
        return P
    (m1, w1, _), (m2, w2, c2) = pts[-2], pts[-1]
    target = rtol * max(c2, 1.0)
    p = math.log(w1 / w2) / math.log(m2 / m1)
    log_need = math.log(m2) + math.log(max(w2 / target, 1.0)) / p   # in logs: no overflow
    cap = P if P is not None else 1e9
    if log_need >= math.log(cap):
        return P
    return int(math.ceil(math.exp(log_need)))


# -- internals -------------------------------------------------------------------------------------
class _ProbeLanczos:
    """Lanczos on JᵀJ for all probes at once (columns of one block), reorthogonalized per probe
    in full or not at all (``reorth``), deflation against V."""

    def __init__(self, op, Z, V, *, reorth: str = "full"):
        self.op, self.V, self.reorth = op, V, reorth
        norms = Z.norm(dim=0)
        self.z2 = (norms ** 2).double().cpu().numpy()
        self.Q = [Z / norms]                  # the last two Lanczos vectors, each (P, N)
        self.basis = None                     # reorth 'none': no basis kept
        if reorth == "full":
            self.basis = _Basis(Z.shape[0], Z.shape[1], Z.dtype, Z.device)
            self.basis.append(self.Q[-1])
        self.alpha, self.beta = [], []        # lists of (N,) float64
        N = Z.shape[1]
        self.active = torch.ones(N, dtype=torch.bool)
        self.length = np.zeros(N, dtype=np.int64)   # steps taken by each probe
        self.exact = np.zeros(N, dtype=bool)
        self.beta_closed = np.zeros(N)        # the (round-off) beta at which a probe closed
        self.products = 0
        self.lam_max = 0.0
        # the products' round-off (the operator's dtype), whatever the recurrence runs in
        self.eps = float(torch.finfo(op.dtype).eps)

    @property
    def m(self):
        return len(self.alpha)

    def _apply(self, X):
        # in the operator's dtype; a lower precision's products come back promoted (the
        # recurrence, its basis and its reorthogonalization run in float64: _work_dtype)
        W = self.op.rmatmat(self.op.matmat(X.to(self.op.dtype))).to(X.dtype)
        self.products += 2 * X.shape[1]
        if self.V is not None:
            W = W - self.V @ (self.V.T @ W)
        return W

    def step(self):
        act = self.active.clone()
        idx = torch.nonzero(act).flatten()
        q = self.Q[-1]
        W = torch.zeros_like(q)
        W[:, idx] = self._apply(q[:, idx])
        prev = 0.0 if len(self.Q) == 1 else \
            self.Q[-2] * torch.as_tensor(self.beta[-1], dtype=W.dtype, device=W.device)
        if self.basis is None:
            # the plain recurrence in Paige's order (w = Aq - beta q_prev, alpha = q^T w,
            # w -= alpha q): the variant whose finite-precision rules Paige and Greenbaum bound
            W = W - prev
        a = (q * W).sum(0)
        W = W - q * a
        if self.basis is not None:
            W = W - prev
            for _ in range(REORTH_PASSES):
                W = self.basis.orthogonalize(W)
        if self.V is not None:
            W = W - self.V @ (self.V.T @ W)
        b = W.norm(dim=0)
        an = a.double().cpu().numpy()
        bn = b.double().cpu().numpy()
        an[~act.numpy()] = 0.0
        bn[~act.numpy()] = 0.0
        self.alpha.append(an)
        self.length[act.numpy()] += 1
        self.lam_max = max(self.lam_max, float(np.abs(an).max()) + 2 * float(bn.max()))
        eps, scale = self.eps, max(self.lam_max, 1e-300)
        closed = act.numpy() & (bn <= max(BREAKDOWN, 1e3 * eps) * scale)
        self.exact |= closed
        self.beta_closed[closed] = np.where(bn[closed] <= eps * scale, 0.0, bn[closed])
        newact = act.numpy() & ~closed
        self.active = torch.from_numpy(newact)
        bn[~newact] = 0.0
        self.beta.append(bn)
        safe = torch.where(self.active.to(W.device), b, torch.ones_like(b))
        self.Q = [self.Q[-1], torch.where(self.active.to(W.device)[None, :], W / safe,
                                          torch.zeros_like(W))]
        if self.basis is not None:
            self.basis.append(self.Q[-1])

    def ritz_max(self) -> float:
        """The largest Ritz value of JᵀJ over the probes (a lower bound on σ_max²)."""
        import scipy.linalg

        A, B = np.array(self.alpha), np.array(self.beta)
        best = 0.0
        for i in range(A.shape[1]):
            m = int(self.length[i])
            if m:
                th = scipy.linalg.eigvalsh_tridiagonal(A[:m, i], B[:m - 1, i]) if m > 1 \
                    else A[:1, i]
                best = max(best, float(th.max()))
        return best

    def quadrature(self, P, dsig, t0) -> Quadrature:
        import scipy.linalg

        A, B = np.array(self.alpha), np.array(self.beta)
        nodes, weights, jacobi = [], [], []
        for i in range(A.shape[1]):
            m = int(self.length[i])
            d, e = A[:m, i], B[:m - 1, i]
            b = B[:m, i].copy()
            if self.exact[i]:   # the beta dropped at the closing step bounds how exact the rule is
                b[-1] = self.beta_closed[i]
            jacobi.append((d.copy(), b))
            if m == 1:
                th, ev = d.copy(), np.ones((1, 1))
            else:
                th, ev = scipy.linalg.eigh_tridiagonal(d, e)
            nodes.append(np.maximum(th, 0.0))      # A is PSD: negative nodes are round-off
            weights.append(ev[0] ** 2 * self.z2[i])
        smax = math.sqrt(max(float(max(x.max() for x in nodes)), 0.0))
        if len(dsig):
            smax = max(smax, float(dsig.max()))
        return Quadrature(nodes, weights, P, len(nodes), int(self.length.max()), self.products,
                          time.perf_counter() - t0, smax, list(self.exact), dsig, jacobi=jacobi,
                          reorth=self.reorth, eps=self.eps)


class _Basis:
    """Every probe's Lanczos vectors, in chunks of ``CHUNK`` columns laid out (probe, P, column)
    so that each probe's projection is one batched GEMM (no preallocated full basis)."""

    CHUNK = 64

    def __init__(self, P, N, dtype, device):
        self.P, self.N, self.dtype, self.device = P, N, dtype, device
        self.chunks, self.fill = [], 0

    def append(self, q):                      # q: (P, N)
        if not self.chunks or self.fill == self.CHUNK:
            self.chunks.append(torch.zeros(self.N, self.P, self.CHUNK, dtype=self.dtype,
                                           device=self.device))
            self.fill = 0
        self.chunks[-1][:, :, self.fill] = q.T
        self.fill += 1

    def orthogonalize(self, W):               # W - Q_i Q_i^T W_i for every probe i
        w = W.T.unsqueeze(2)                  # (N, P, 1)
        coefs = [torch.bmm(c.transpose(1, 2), w) for c in self.chunks]
        for c, a in zip(self.chunks, coefs):
            w = w - torch.bmm(c, a)
        return w.squeeze(2).T


def _bracket(x, w, c, exact, ab, a, b, eps):
    """(lower, upper) on one probe's count over [a, b] (in σ²) from its rule: Gauss nodes ``x``,
    weights ``w`` (partial sums ``c``), ``exact`` (closed), Lanczos coefficients ``ab`` (or
    None); ``eps``: the operator dtype's round-off."""
    if ab is not None and ab[1][-1] > 0:
        # Markov-Krein: F(t - 0) in [L_t, L_t + rho_t] and F(t) in the same, from the
        # Gauss-Radau rule through t (L_t: its mass below t, rho_t: its mass at t). A
        # probe that closed keeps the (round-off) beta it closed at: its rule is exact
        # only up to that beta, so an end close to a node stays open (module doc;
        # values below the round-off of J^T J, sigma^2 < ~1e-8 sigma_max^2, included)
        Fa = (0.0, 0.0) if a <= 0.0 else _radau_bracket(*ab, c[-1], a, eps, x)
        Fb = (c[-1], c[-1]) if b == math.inf else _radau_bracket(*ab, c[-1], b, eps, x)
        # each end sums m + 1 squared eigenvector components of its own rule (F(inf): the
        # Gauss weights), which add up to the probe's mass only to ~(m + 1) eps: an interval
        # holding none of the mass got a lower bound of a few ulps of ||z||^2 (above its Gauss
        # count and the truth, 0), so the bracket is widened by that round-off
        d = (len(ab[0]) + 1) * float(np.finfo(np.float64).eps) * float(c[-1])
        return max(0.0, Fb[0] - Fa[1] - d), max(0.0, Fb[1] - Fa[0] + d)
    if exact and ab is not None:  # closed on a zero beta: the rule is the measure itself,
        # its nodes to the round-off of the operator's dtype: a node that close to an end
        # may lie on either side of it (nothing lies below 0: J^T J >= 0)
        tol = 1e3 * eps * max(float(x.max(initial=0.0)), a, b if b < math.inf else 0.0)
        a_lo, a_up = (-math.inf, -math.inf) if a <= 0.0 else (a + tol, a - tol)
        return _mass(x, c, a_lo, b - tol), _mass(x, c, a_up, b + tol)
    # no coefficients (a rule built elsewhere): the Gauss rule's own partial sums, for a
    # closed probe too (its rule is exact only up to the beta it closed at)
    pb = int(np.searchsorted(x, b, side="right"))      # nodes <= b: indices < pb
    pa = int(np.searchsorted(x, a, side="left"))       # nodes < a: indices < pa
    n = len(x)
    # F(b): node p = pb - 1 is the last <= b; lower sum_{j<p}, upper sum_{j<=p+1}
    Fb_lo, Fb_up = c[max(pb - 1, 0)], c[min(pb + 1, n)]
    if b == math.inf:   # the whole measure
        Fb_lo = Fb_up = c[n]
    # F(a - 0): the last node < a is pa - 1
    Fa_lo, Fa_up = c[max(pa - 1, 0)], c[min(pa + 1, n)]
    if a <= 0.0:        # J^T J >= 0: nothing lies below 0
        Fa_lo = Fa_up = 0.0
    return max(0.0, Fb_lo - Fa_up), max(0.0, Fb_up - Fa_lo)


def _mass(x, c, a, b) -> float:
    """A rule's mass on [a, b] as a difference of its partial sums ``c`` (nodes ``x``
    ascending): estimates and brackets taken from the same sums nest exactly (rounding is
    monotone), where separate sums of the same weights differ in the last bits."""
    return max(0.0, float(c[int(np.searchsorted(x, b, side="right"))]
                          - c[int(np.searchsorted(x, a, side="left"))]))


def _roundoff_mass(x, c, t, eta) -> float:
    """How much of one probe's mass the products' round-off (a symmetric H, ||H|| <= ``eta``)
    can move across the end t: the first-order change of the spectral projector below t,
    z^T (P_H - P) z, is at most about sqrt(F (M - F)) ||H|| / d for the mass F below t, the
    total M and d the distance from t to the nearest value (here: the nearest Gauss node ``x``;
    ``c``: the rule's partial sums). 0 at t = 0 and t = inf (F is exact there); M at a node."""
    if t <= 0.0 or t == math.inf or len(x) == 0:
        return 0.0
    M = float(c[-1])
    F = float(c[int(np.searchsorted(x, t, side="left"))])
    d = float(np.min(np.abs(x - t)))
    r = eta * math.sqrt(max(F * (M - F), 0.0))
    return M if r >= M * d else r / d


def _radau_bracket(alpha, beta, mass, t, eps=float(np.finfo(np.float64).eps), nodes=None):
    """Bounds on F(t - 0) and F(t) that hold for the computed rule: ``_radau_bounds`` at
    t - eta (lower) and t + eta (upper), eta = RADAU_ROUNDOFF eps scale, where a Gauss node
    (``nodes``; None: always) lies within eta of t; elsewhere at t itself. The computed T_m is the
    exact Lanczos matrix of a measure whose atoms moved by round-off (a cluster about 1e-14
    relative wide, in float64), so an atom at t is one on either side of t: the Radau rule through
    a point inside the cluster splits it into a node at t and one at distance var / d from the
    cluster's centre (d: t's distance to it), with weight ~ d / distance of the atom, beyond any
    node tolerance as d -> 0 (measured: 2.1e-6 of a probe's count missed at 4.2e-10 from
    t = 811). Stepping off by eta, far wider than the cluster, puts the whole cluster on one side.
    A true atom within eta of t then counts on both sides, as for an exact rule. With no Gauss
    node that close, no atom near t has converged (its Christoffel weight rho exceeds the atom's
    by far more than round-off) and one rule through t suffices (half the cost)."""
    scale = max(float(np.max(np.abs(alpha))) + 2 * float(np.max(np.abs(beta))), abs(t), 1e-300)
    eta = RADAU_ROUNDOFF * eps * scale
    if nodes is not None and not np.any(np.abs(np.asarray(nodes) - t) <= eta):
        return _radau_bounds(alpha, beta, mass, t)
    return (_radau_bounds(alpha, beta, mass, t - eta)[0],
            _radau_bounds(alpha, beta, mass, t + eta)[1])


def _radau_bounds(alpha, beta, mass, t, _depth=0):
    """(L, L + rho): bounds on F(t - 0) and F(t) for every measure of total ``mass`` whose
    Lanczos coefficients begin with ``alpha`` (m,) and ``beta`` (m,; beta[-1] > 0), i.e. that
    shares its first 2m + 1 moments. The Gauss-Radau rule with a node fixed at t (m + 1 nodes,
    exact to degree 2m) puts mass L below t and rho at t, and by the Markov-Krein theorem (the
    Chebyshev-Markov-Stieltjes inequalities for the canonical representation through t)
    L <= F(t - 0) <= F(t) <= L + rho; rho, the Christoffel function at t, is the narrowest such
    bracket the moments allow (about half of the Gauss rule's two-node gap).

    Round-off: when t sits on a converged Ritz value the rule has two nodes within round-off of
    t, and the mass at t is split between them, so every node within ``tol`` of t counts as at
    t; when t is (numerically) a Gauss node, the last diagonal entry blows up, so the bounds are
    taken at t -/+ eta instead (F is monotone: F(t - 0) >= F(t - eta), F(t) <= F(t + eta))."""
    import scipy.linalg

    m = len(alpha)
    scale = max(float(np.max(np.abs(alpha))) + 2 * float(np.max(np.abs(beta))), abs(t), 1e-300)
    # the last diagonal entry that makes t an eigenvalue: alpha' = t + delta_m with
    # (T_m - t I) delta = beta_m^2 e_m (Golub 1973)
    ab = np.zeros((3, m))
    ab[0, 1:] = beta[:m - 1]
    ab[1] = alpha - t
    ab[2, :m - 1] = beta[:m - 1]
    rhs = np.zeros(m)
    rhs[-1] = beta[-1] ** 2
    try:
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            delta = float(scipy.linalg.solve_banded((1, 1), ab, rhs, check_finite=False)[-1])
    except (np.linalg.LinAlgError, ValueError):
        delta = math.inf
    if _depth < RADAU_STEP_OFF and not abs(delta) <= 1e6 * scale:
        eta = 1e-9 * scale * 10 ** _depth
        return (_radau_bounds(alpha, beta, mass, t - eta, _depth + 1)[0],
                _radau_bounds(alpha, beta, mass, t + eta, _depth + 1)[1])
    if not math.isfinite(delta):   # no Radau rule at all: the trivial bounds
        return 0.0, float(mass)
    th, ev = scipy.linalg.eigh_tridiagonal(np.append(alpha, t + delta), beta)
    w = ev[0] ** 2 * mass
    tol = 1e3 * np.finfo(np.float64).eps * max(scale, abs(delta))
    return float(w[th < t - tol].sum()), float(w[th <= t + tol].sum())


def _dense(op, V, dsig) -> Quadrature:
    """The dense spectrum as a one-probe 'rule' with unit weights (exact counts)."""
    from .dense import materialize

    t0 = time.perf_counter()
    P = op.shape[0]
    budget = _available(None, op.device)
    if 3 * P * P * 8 > DENSE_MEMORY_SHARE * budget:
        raise MemoryError(f"the dense spectrum needs ~{3 * P * P * 8 / 2**30:.1f} GiB; about "
                          f"{budget / 2**30:.1f} GiB is available: use method='slq'")
    J = materialize(op)
    s = torch.linalg.svdvals(J).double().cpu().numpy()
    x = np.sort(s * s)
    return Quadrature([x], [np.ones_like(x)], P, 1, 0, P, time.perf_counter() - t0,
                      float(s.max()), [True], np.zeros(0), "dense", reorth=None)


def _dense_is_cheaper(run, P, target, rtol, steps, budget) -> bool:
    """After the first steps: would the rest of the SLQ cost more products than the dense path,
    and does J fit?"""
    if 3 * P * P * 8 > DENSE_MEMORY_SHARE * budget:
        return False
    smax = math.sqrt(run.ritz_max())
    if target is not None:
        lo, hi = target
        need = min(steps, steps_needed(smax, max((hi - lo) / 2, 1e-300)))
    else:
        need = steps
    return 2 * int(run.active.shape[0]) * need > P


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The Lanczos recurrence's dtype: float64 for an operator in a lower precision (its
    products are promoted; the basis and the reorthogonalization then add no round-off of their
    own to the products'), else the operator's."""
    if dtype.is_floating_point and torch.finfo(dtype).bits < 64:
        return torch.float64
    return dtype


def _check_interval(lo, hi):
    for n, x in (("lo", lo), ("hi", hi)):
        if isinstance(x, bool) or not isinstance(x, (int, float)) or math.isnan(x) or \
                (n == "lo" and not math.isfinite(x)):
            raise ValueError(f"`{n}` must be a number (hi may be inf), got {x!r}")
    if lo < 0 or not hi > lo:
        raise ValueError(f"the interval [{lo}, {hi}] is empty or negative: need 0 <= lo < hi")


def _check_op(op):
    if not (hasattr(op, "matmat") and hasattr(op, "rmatmat") and hasattr(op, "shape")):
        raise ValueError("the operator needs shape, matmat and rmatmat (Jᵀ products): "
                         f"{type(op).__name__} has "
                         f"{', '.join(n for n in ('shape', 'matmat', 'rmatmat') if hasattr(op, n))}")
    if op.shape[0] != op.shape[1]:
        raise ValueError(f"the operator must be square, got shape {tuple(op.shape)}")


def _deflation(deflate, P):
    if deflate is None:
        return None, np.zeros(0)
    V, sig = deflate
    V = torch.as_tensor(V)
    sig = np.asarray(torch.as_tensor(sig).double().cpu().numpy(), dtype=np.float64).reshape(-1)
    if V.ndim != 2 or V.shape[0] != P or V.shape[1] != len(sig):
        raise ValueError(f"`deflate` must be (V of shape (P={P}, k), k values), got V "
                         f"{tuple(V.shape)} and {len(sig)} values")
    if V.shape[1]:
        G = V.T.double() @ V.double()
        err = float((G - torch.eye(V.shape[1], dtype=torch.float64)).abs().max())
        if err > 1e-6:
            raise ValueError(f"`deflate`'s vectors are not orthonormal (max |VᵀV − I| = {err:.1e})")
    return V, sig


def _available(available_bytes, device="cpu"):
    if available_bytes is not None:
        return int(available_bytes)
    from .._checks import available_bytes

    have = available_bytes(device)
    return (1 << 62) if have is None else have  # unknown: nothing refused


def _t_quantile(confidence, df):
    if not (0 < confidence < 1):
        raise ValueError(f"`confidence` must be in (0, 1), got {confidence!r}")
    if df < 1:
        return math.inf
    import scipy.stats

    return float(scipy.stats.t.ppf(0.5 + confidence / 2, df))
