"""Progress of a long solve: a line every ``interval`` seconds, or a bar on a terminal.

:func:`tjac.linalg.svd` calls its ``callback`` after every solver step with the step's counts
(``basis``, ``n_converged``), the products so far and the plan's expected products; a
:class:`Progress` turns them into

    bottom-16 lanczos: basis 1,024, 3/16 certified, 2,048 of ~24,000 products, 0.41 s/product,
    ~2.5 h left  (one line)

(the time left is the plan's remaining products times the measured seconds per product; past the
plan's estimate, the method's bound where it has one: ``..., past the plan's ~600, at most 1,464:
<= 3 min left``), or updates a bar (``bar``: a tqdm-like factory, e.g. ``lambda **kw: tqdm(**kw)``), whose own rate gives
the ETA. The clock is injectable, so tests drive it without sleeping.
"""

from __future__ import annotations

import time

from .plan import _duration

INTERVAL = 30.0  # seconds between progress lines


class Progress:
    """Callback of one solve (``label`` e.g. ``"bottom-16 lanczos"``, ``k`` triplets wanted).

    ``emit(line)`` receives the lines (default: discarded); ``bar(total=, desc=, unit=)`` makes a
    bar instead (no lines then). ``expected_products`` and ``max_products`` (a bound on them,
    where the method has one) default to the callback's own (the plan's)."""

    def __init__(self, label: str, *, k: int | None = None, expected_products: int | None = None,
                 max_products: int | None = None, interval: float | None = None,
                 clock=time.monotonic, emit=None, bar=None):
        self.label, self.k, self.expected = label, k, expected_products
        self.most = max_products
        self.interval = INTERVAL if interval is None else interval
        self.clock, self.emit, self.bar_factory = clock, emit, bar
        self.t0 = clock()
        self.last = self.t0
        self.bar = None
        self.products = 0
        self.lines: list[str] = []

    def __call__(self, info: dict) -> None:
        """An ``svd`` callback dict (``products``, ``basis``, ``n_converged``, ...)."""
        if self.expected is None and info.get("expected_products") is not None:
            self.expected = int(info["expected_products"])
        if self.most is None and info.get("max_products") is not None:
            self.most = int(info["max_products"])
        self.update(int(info.get("products", self.products)), basis=info.get("basis"),
                    certified=info.get("n_converged"))

    def update(self, products: int, *, basis: int | None = None,
               certified: int | None = None) -> None:
        """``products`` done so far in this solve (absolute, not an increment)."""
        self.products = products
        if self.bar_factory is not None:
            self._bar(products, basis, certified)
            return
        now = self.clock()
        if now - self.last >= self.interval:
            self.last = now
            line = self.line(products, now - self.t0, basis=basis, certified=certified)
            self.lines.append(line)
            if self.emit is not None:
                self.emit(line)

    def line(self, products: int, elapsed: float, *, basis=None, certified=None) -> str:
        parts = []
        if basis is not None:
            parts.append(f"basis {int(basis):,}")
        if certified is not None:
            parts.append(f"{int(certified)}/{self.k} certified" if self.k else
                         f"{int(certified)} certified")
        of = f" of ~{self.expected:,}" if self.expected else ""
        parts.append(f"{products:,}{of} products")
        if products:
            rate = elapsed / products
            parts.append(f"{rate:.3g} s/product")
            if self.expected and self.expected > products:
                parts.append(f"~{_duration((self.expected - products) * rate)} left")
            elif self.expected and self.most and self.most > products:
                parts.append(f"past the plan's ~{self.expected:,}, at most {self.most:,}: "
                             f"<= {_duration((self.most - products) * rate)} left")
            elif self.expected:
                parts.append("past the plan's expected products")
        else:
            parts.append(f"{elapsed:.0f} s")
        return f"{self.label}: " + ", ".join(parts)

    def _bar(self, products, basis, certified):
        if self.bar is None:
            self.bar = self.bar_factory(total=self.expected, desc=self.label, unit="product")
        if self.expected and products > (self.bar.total or 0):
            # past the plan's estimate: the method's bound, else what is done (the bar stays honest)
            self.bar.total = self.most if self.most and self.most > products else products
        self.bar.update(products - self.bar.n)
        post = {}
        if basis is not None:
            post["basis"] = int(basis)
        if certified is not None:
            post["certified"] = f"{int(certified)}/{self.k}" if self.k else int(certified)
        if post and hasattr(self.bar, "set_postfix"):
            self.bar.set_postfix(post, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
