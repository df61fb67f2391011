"""The operator contract: what every operator behind tjac's protocol must satisfy.

An operator has ``shape`` (m, n), ``dtype``, ``device``, ``matmat(X[n, k])`` and
``rmatmat(Y[m, k])`` returning torch tensors (:mod:`tjac.linalg._base`). The solvers, the
certificates and the store assume more than the signatures say; this module states it as checks,
in the manner of lineax's and linear_operator's shared test mixins. Every check runs on every
operator of ``tests/test_contract.py`` as its own test, ``test_contract[<case>-<check>]``:

``shape_dtype_device``
    ``shape`` is two ints, ``dtype`` a real floating dtype; products are tensors of shape (m, k) /
    (n, k) in that dtype on that device, finite, and an empty block (k = 0) gives an empty result.
``aliasing``
    Products leave their inputs unchanged (a single column too), do not return the input's
    memory, and a later product does not overwrite an earlier result (reused workspaces).
``requires_grad``
    A block that requires grad (a parameter, the output of a differentiable computation) is
    accepted and gives the same product (whether the result is differentiable is up to the operator).
``wrong_height``
    A block with the wrong number of rows is refused (raises), not broadcast or truncated.
``columns``
    Column j of ``matmat(X)`` equals ``matmat(X[:, j:j+1])`` (the first column) and, where offered,
    ``matvec(X[:, j])`` (the last; a 1-D result); the same for ``rmatmat``/``rmatvec``. Blocks
    share work, never results.
``linearity``
    J (X a) = (J X) a for a random mixing a (k x k) whose last column is zero, and that column
    of J (X a) is exactly zero (J 0 = 0: nothing affine leaks in); both directions.
``adjoint``
    <J v_j, w_i> = <v_j, J^T w_i> for all k^2 pairs, relative to
    ||J v_j|| ||w_i|| + ||v_j|| ||J^T w_i||.
``determinism``
    A fresh operator from the factory gives bit-identical products twice (cold, then warm caches),
    and bit-identical to another operator from the same factory.
``scipy``
    Where ``to_scipy()`` is offered: a ``scipy.sparse.linalg.LinearOperator`` built without a
    probing product (counters unchanged: the dtype is passed), of the same shape and dtype, whose
    ``A @ x`` (matvec), ``A.H @ w`` (rmatvec), ``matmat`` and ``rmatmat`` return numpy arrays of
    that shape and dtype, agree with the torch products and are counted like them.
``counters``
    Where ``num_matvecs``/``num_rmatvecs`` are offered they count columns (a block of k adds k, an
    empty block 0, ``matvec`` 1, the other direction nothing); ``num_replays`` with ``block_size``
    counts ceil(k / block_size) per product; ``counters()`` agrees with the attributes.

A feature the operator does not offer (``matvec``, ``to_scipy``, counters) makes its check or part
report "not offered" (a skip), never a pass by accident. The whole contract costs about 30
products of k = 3 columns and one more operator from the factory: use a tiny instance.

**Tolerances** come from the dtype and the problem size, not from measured results:
``rtol = 8 eps sqrt(n) max(1, steps)`` (:func:`default_rtol`), with eps the dtype's machine epsilon,
n the operator's larger dimension (the random-rounding growth of an inner product) and ``steps``
the operator's ``num_steps`` where it has one (a product through T composed maps accumulates
rounding linearly in T). Comparisons are column-normwise relative to the block's largest column.
A case may pass ``rtol=`` when its operator has a documented reason to need more.

**Opting in** -- how a new operator is admitted: one line in ``CASES`` of tests/test_contract.py,
a factory, not an instance::

    "my-op": Case(lambda: MyOperator(...)),

The factory must build the same operator every call (seed whatever is random: the determinism
check compares two of them bit for bit). Anything slow gets ``marks=(pytest.mark.slow,)``.
Outside that file: ``contract.verify(factory)`` raises :class:`ContractViolation` listing every
failed check, and ``contract.run(factory)`` returns ``{check: Outcome}``.

The suite is itself tested: ``test_contract.py::test_contract_catches_broken_operator`` runs it on
deliberately broken operators (a perturbed adjoint, a nondeterministic product, a call-counting
counter, a probing ``to_scipy``, ...) and requires the check made for each to fail, and
``test_every_check_can_fail`` requires every check here to be caught failing by at least one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

SAFETY = 8.0  # the constant in default_rtol


class ContractViolation(AssertionError):
    """An operator broke the contract (the message names the check and what failed)."""


class NotOffered(Exception):
    """The operator does not offer the feature a check tests (reported as a skip)."""


@dataclass(frozen=True)
class Case:
    """An operator factory for the contract, with an optional tolerance override and pytest marks."""

    factory: Callable
    rtol: float | None = None
    marks: tuple = ()
    k: int = 3


@dataclass(frozen=True)
class Outcome:
    status: str  # "pass", "fail" or "not offered"
    detail: str = ""


def default_rtol(dtype: torch.dtype, n: int, steps: int = 1) -> float:
    """8 eps sqrt(n) max(1, steps): see the module docstring."""
    return SAFETY * torch.finfo(dtype).eps * math.sqrt(max(int(n), 1)) * max(int(steps), 1)


def operator_rtol(op) -> float:
    steps = getattr(op, "num_steps", 1)
    return default_rtol(op.dtype, max(op.shape), steps if isinstance(steps, int) else 1)


class Probe:
    """One operator under test: the operator, its factory, seeded random blocks X (n, k) and
    W (m, k) in the operator's dtype and device, the reference products JX and J^T W (computed once,
    so the shared operator's caches are warm for every check), and the tolerance."""

    def __init__(self, case: Case | Callable, *, seed: int = 0):
        case = case if isinstance(case, Case) else Case(case)
        self.case = case
        self.factory = case.factory
        self.op = op = case.factory()
        self.m, self.n = _shape(op)
        self.k = case.k
        gen = torch.Generator().manual_seed(seed)

        def block(rows, cols):
            return torch.randn(rows, cols, generator=gen, dtype=torch.float64).to(op.device, op.dtype)

        self.X, self.W = block(self.n, self.k), block(self.m, self.k)
        self.X2, self.W2 = block(self.n, self.k), block(self.m, self.k)  # "a later product"
        self.mix = block(self.k, self.k)
        self.rtol = case.rtol if case.rtol is not None else operator_rtol(op)
        self.JX = op.matmat(self.X.clone()).clone()
        self.JtW = op.rmatmat(self.W.clone()).clone()

    def fresh(self):
        """A new operator from the factory (cold caches)."""
        return self.factory()

    def close(self, actual, expected, what):
        """Column-normwise relative error against the block's largest column, at most rtol."""
        if tuple(actual.reshape(expected.shape[0], -1).shape) != tuple(expected.shape):
            raise ContractViolation(f"{what}: shape {tuple(actual.shape)}, expected "
                                    f"{tuple(expected.shape)}")
        err = rel_error(actual, expected)
        if not err <= self.rtol:
            raise ContractViolation(f"{what}: relative error {err:.3e} > rtol {self.rtol:.1e}")


CHECKS: dict[str, Callable[[Probe], None]] = {}


def check(name):
    """Register a check: a function of a :class:`Probe` that raises ContractViolation (or
    NotOffered) and returns nothing."""
    def register(fn):
        CHECKS[name] = fn
        return fn
    return register


# -- helpers -----------------------------------------------------------------------------------
def _shape(op):
    shape = tuple(op.shape)
    if len(shape) != 2 or not all(isinstance(s, (int, np.integer)) and s >= 0 for s in shape):
        raise ContractViolation(f"shape must be two non-negative ints, got {op.shape!r}")
    return int(shape[0]), int(shape[1])


def rel_error(actual, expected) -> float:
    rows = expected.shape[0]
    a, b = actual.double().reshape(rows, -1), expected.double().reshape(rows, -1)
    if b.numel() == 0:
        return 0.0
    scale = float(b.norm(dim=0).max())
    num = float((a - b).norm(dim=0).max())
    if not math.isfinite(num):
        return math.inf
    return num / scale if scale > 0 else (0.0 if num == 0 else math.inf)


def _same_device(a, b) -> bool:
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    return a.index is None or b.index is None or a.index == b.index or a.type == "cpu"


def _fail(msg):
    raise ContractViolation(msg)


def _directions(p: Probe, op=None):
    """(name, product, input block, second input block, rows of the result, reference result)."""
    op = op or p.op  # inputs are copies: an operator that modifies its input spoils no other check
    return (("matmat", op.matmat, p.X.clone(), p.X2.clone(), p.m, p.JX),
            ("rmatmat", op.rmatmat, p.W.clone(), p.W2.clone(), p.n, p.JtW))


def _max_diff(a, b) -> float:
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


# -- the checks --------------------------------------------------------------------------------
@check("shape_dtype_device")
def check_shape_dtype_device(p: Probe):
    op = p.op
    if not isinstance(op.dtype, torch.dtype) or not op.dtype.is_floating_point or op.dtype.is_complex:
        _fail(f"dtype must be a real floating torch.dtype, got {op.dtype!r}")
    try:
        torch.device(op.device)
    except (TypeError, RuntimeError) as e:
        _fail(f"device must name a torch device, got {op.device!r} ({e})")
    for name, fn, inp, _, rows, ref in _directions(p):
        for block in (inp, inp[:, :0]):
            Y = ref if block.shape[1] else fn(block)  # the probe's product of inp, uncloned dtype etc.
            what = f"{name} of a ({block.shape[0]}, {block.shape[1]}) block"
            if not isinstance(Y, torch.Tensor):
                _fail(f"{what} returned {type(Y).__name__}, not a torch.Tensor")
            if tuple(Y.shape) != (rows, block.shape[1]):
                _fail(f"{what} has shape {tuple(Y.shape)}, expected {(rows, block.shape[1])}")
            if Y.dtype != op.dtype:
                _fail(f"{what} has dtype {Y.dtype}, the operator's is {op.dtype}")
            if not _same_device(Y.device, op.device):
                _fail(f"{what} is on {Y.device}, the operator's device is {op.device}")
            if not bool(torch.isfinite(Y).all()):
                _fail(f"{what} is not finite")


@check("aliasing")
def check_aliasing(p: Probe):
    for name, fn, inp, other, _, _ in _directions(p):
        # a contiguous single column: its (1, n) view is contiguous too, so a backend may keep it
        results = []
        for block in (inp, other, inp[:, :1].clone()):
            before = block.clone()
            Y = fn(block)
            if not torch.equal(block, before):
                _fail(f"{name} modified its input ({block.shape[1]} columns; max change "
                      f"{_max_diff(block, before):.3e})")
            if Y.numel() and Y.untyped_storage().data_ptr() == block.untyped_storage().data_ptr():
                _fail(f"{name} returned a tensor sharing memory with its input")
            results.append((Y, Y.clone()))
        Y, kept = results[0]
        if not torch.equal(Y, kept):  # a product of the same width came after it
            _fail(f"a later {name} overwrote the result of an earlier one (max change "
                  f"{_max_diff(Y, kept):.3e}): results must not live in reused workspaces")


@check("requires_grad")
def check_requires_grad(p: Probe):
    for name, fn, inp, _, _, ref in _directions(p):
        Y = fn(inp.requires_grad_())
        p.close(Y.detach(), ref, f"{name} of a block that requires grad vs the same block without")


@check("wrong_height")
def check_wrong_height(p: Probe):
    op = p.op
    for name, fn, inp, _, _, _ in _directions(p):
        rows = inp.shape[0]
        for bad in (rows + 1, max(rows - 1, 0)):
            if bad == rows:
                continue
            Z = torch.zeros(bad, 1, dtype=op.dtype, device=op.device)
            try:
                out = fn(Z)
            except Exception:  # noqa: BLE001 - any refusal will do
                continue
            _fail(f"{name} accepted a block of {bad} rows (expects {rows}) and returned "
                  f"{tuple(getattr(out, 'shape', ()))}")


@check("columns")
def check_columns(p: Probe):
    op = p.op
    for (name, fn, inp, _, rows, ref), vec in zip(_directions(p), ("matvec", "rmatvec")):
        k = inp.shape[1]
        f = getattr(op, vec, None)  # the first column alone by the block product, the last by
        for j in sorted({0, k - 1}):  # matvec where offered (else by the block product too)
            if f is None or j == 0:
                p.close(fn(inp[:, j:j + 1]), ref[:, j:j + 1],
                        f"{name} of column {j} alone vs column {j} of the block")
                continue
            y = f(inp[:, j])
            if not isinstance(y, torch.Tensor) or tuple(y.shape) != (rows,):
                _fail(f"{vec} of a 1-D vector must return a 1-D tensor of shape ({rows},), got "
                      f"{tuple(getattr(y, 'shape', ())) or type(y).__name__}")
            if y.dtype != op.dtype:
                _fail(f"{vec} returned dtype {y.dtype}, the operator's is {op.dtype}")
            p.close(y[:, None], ref[:, j:j + 1], f"{vec} of column {j} vs {name}")


@check("linearity")
def check_linearity(p: Probe):
    a = p.mix.clone()
    a[:, -1] = 0  # the last column of X a is zero
    for name, fn, inp, _, rows, ref in _directions(p):
        Y = fn(inp @ a)
        p.close(Y, ref @ a, f"{name}(X a) vs {name}(X) a")
        if bool((Y[:, -1] != 0).any()):
            _fail(f"{name} of a zero column is not exactly zero (max |.| "
                  f"{float(Y[:, -1].abs().max()):.3e})")


@check("adjoint")
def check_adjoint(p: Probe):
    V, W, JV, JtW = p.X.double(), p.W.double(), p.JX.double(), p.JtW.double()
    lhs = W.T @ JV    # <w_i, J v_j>
    rhs = JtW.T @ V   # <J^T w_i, v_j>
    scale = (W.norm(dim=0)[:, None] * JV.norm(dim=0)[None]
             + JtW.norm(dim=0)[:, None] * V.norm(dim=0)[None])
    rel = ((lhs - rhs).abs() / scale.clamp_min(torch.finfo(torch.float64).tiny))
    worst = float(rel.max()) if rel.numel() else 0.0
    if not worst <= p.rtol:
        i, j = divmod(int(rel.argmax()), rel.shape[1])
        _fail(f"<J v, w> = <v, J^T w> fails: relative error {worst:.3e} > rtol {p.rtol:.1e} "
              f"(pair w_{i}, v_{j}: {float(lhs[i, j]):.12e} vs {float(rhs[i, j]):.12e})")


@check("determinism")
def check_determinism(p: Probe):
    op = p.fresh()
    if _shape(op) != (p.m, p.n):
        _fail(f"the factory built operators of different shapes: {_shape(op)} and {(p.m, p.n)}")
    first = [fn(inp).clone() for _, fn, inp, _, _, _ in _directions(p, op)]  # cold
    for (name, fn, inp, _, _, ref), y1 in zip(_directions(p, op), first):
        y2 = fn(inp)
        if not torch.equal(y1, y2):
            _fail(f"two {name} products of the same block differ (max diff {_max_diff(y1, y2):.3e}; "
                  f"the first on a fresh operator): the product must be deterministic")
        if not torch.equal(y1, ref):
            _fail(f"two operators from the same factory give different {name} products (max diff "
                  f"{_max_diff(y1, ref):.3e}): the factory or the operator is not reproducible")


@check("scipy")
def check_scipy(p: Probe):
    op = p.op
    to_scipy = getattr(op, "to_scipy", None)
    if to_scipy is None:
        raise NotOffered(f"{type(op).__name__} offers no to_scipy()")
    counted = hasattr(op, "num_matvecs") and hasattr(op, "num_rmatvecs")
    before = (op.num_matvecs, op.num_rmatvecs) if counted else None
    A = to_scipy()
    if counted and (op.num_matvecs, op.num_rmatvecs) != before:
        _fail("to_scipy() ran a product (scipy probes an operator built without dtype=): pass the dtype")
    np_dtype = torch.empty((), dtype=op.dtype).numpy().dtype
    if tuple(A.shape) != (p.m, p.n):
        _fail(f"to_scipy() has shape {A.shape}, the operator {(p.m, p.n)}")
    if A.dtype != np_dtype:
        _fail(f"to_scipy() has dtype {A.dtype}, the operator's is {np_dtype}")

    def np_(t):
        return t.detach().cpu().numpy()

    def back(y, shape, what):
        y = np.asarray(y)
        if y.shape != shape:
            _fail(f"scipy {what} returned shape {y.shape}, expected {shape}")
        if y.dtype != np_dtype:
            _fail(f"scipy {what} returned dtype {y.dtype}, expected {np_dtype}")
        return torch.from_numpy(np.ascontiguousarray(y)).reshape(shape[0], -1)

    X, W, JX, JtW, k = np_(p.X.clone()), np_(p.W.clone()), p.JX.cpu(), p.JtW.cpu(), p.k
    before = (op.num_matvecs, op.num_rmatvecs) if counted else None
    # A @ x goes through matvec, A.H @ w through rmatvec (scipy's adjoint operator)
    p.close(back(A @ X[:, -1], (p.m,), "A @ x"), JX[:, -1:], "scipy A @ x vs matmat")
    p.close(back(A.H @ W[:, -1], (p.n,), "A.H @ w"), JtW[:, -1:], "scipy A.H @ w vs rmatmat")
    p.close(back(A.matmat(X), (p.m, k), "matmat"), JX, "scipy matmat vs matmat")
    p.close(back(A.rmatmat(W), (p.n, k), "rmatmat"), JtW, "scipy rmatmat vs rmatmat")
    if counted:
        got = (op.num_matvecs - before[0], op.num_rmatvecs - before[1])
        if got != (k + 1, k + 1):
            _fail(f"scipy A @ x, A.H @ w and a matmat and rmatmat of {k} columns counted "
                  f"(num_matvecs, num_rmatvecs) += {got}, expected {(k + 1, k + 1)}")


@check("counters")
def check_counters(p: Probe):
    op = p.op
    if not (hasattr(op, "num_matvecs") and hasattr(op, "num_rmatvecs")):
        raise NotOffered(f"{type(op).__name__} has no num_matvecs/num_rmatvecs")
    replays = hasattr(op, "num_replays") and isinstance(getattr(op, "block_size", None), int)

    def state():
        return (op.num_matvecs, op.num_rmatvecs, op.num_replays if replays else 0)

    k, X, W = p.k, p.X.clone(), p.W.clone()
    bs = op.block_size if replays else 1
    cases = [("matmat", lambda: op.matmat(X), (k, 0, -(-k // bs))),
             ("rmatmat", lambda: op.rmatmat(W), (0, k, -(-k // bs))),
             ("matmat of an empty block", lambda: op.matmat(X[:, :0]), (0, 0, 0)),
             ("rmatmat of an empty block", lambda: op.rmatmat(W[:, :0]), (0, 0, 0))]
    if hasattr(op, "matvec"):
        cases.append(("matvec", lambda: op.matvec(X[:, 0]), (1, 0, 1)))
    else:
        cases.append(("matmat of one column", lambda: op.matmat(X[:, :1]), (1, 0, 1)))
    if hasattr(op, "rmatvec"):
        cases.append(("rmatvec", lambda: op.rmatvec(W[:, 0]), (0, 1, 1)))
    else:
        cases.append(("rmatmat of one column", lambda: op.rmatmat(W[:, :1]), (0, 1, 1)))
    names = "(num_matvecs, num_rmatvecs" + (", num_replays)" if replays else ")")
    for what, call, expect in cases:
        before = state()
        call()
        got = tuple(a - b for a, b in zip(state(), before))
        if not replays:
            got, expect = got[:2], expect[:2]
        if got != expect:
            _fail(f"{what} ({k} columns where a block; block_size {bs}) changed {names} by {got}, "
                  f"expected {expect}")
    if hasattr(op, "counters"):
        c = op.counters()
        for name in ("num_matvecs", "num_rmatvecs") + (("num_replays",) if replays else ()):
            if name in c and c[name] != getattr(op, name):
                _fail(f"counters()[{name!r}] = {c[name]} but op.{name} = {getattr(op, name)}")


# -- running the contract --------------------------------------------------------------------------
def run_check(p: Probe, name: str) -> Outcome:
    try:
        CHECKS[name](p)
    except NotOffered as e:
        return Outcome("not offered", str(e))
    except ContractViolation as e:
        return Outcome("fail", str(e))
    except Exception as e:  # noqa: BLE001 - an operator that crashes fails the check
        return Outcome("fail", f"raised {type(e).__name__}: {e}")
    return Outcome("pass")


def run(case, *, checks=None, seed: int = 0) -> dict[str, Outcome]:
    """Every check (or those named) on the operator ``case`` builds: ``{check: Outcome}``."""
    try:
        p = Probe(case, seed=seed)
    except Exception as e:  # noqa: BLE001 - no operator, or no reference products: nothing passes
        why = Outcome("fail", f"building the operator and its reference products raised "
                              f"{type(e).__name__}: {e}")
        return {name: why for name in (checks or CHECKS)}
    return {name: run_check(p, name) for name in (checks or CHECKS)}


def failures(outcomes: dict[str, Outcome]) -> dict[str, str]:
    return {name: o.detail for name, o in outcomes.items() if o.status == "fail"}


def verify(case, **kw) -> dict[str, Outcome]:
    """Run the contract; raise :class:`ContractViolation` naming every failed check."""
    outcomes = run(case, **kw)
    bad = failures(outcomes)
    if bad:
        raise ContractViolation("operator contract violated:\n" +
                                "\n".join(f"  {n}: {d}" for n, d in bad.items()))
    return outcomes


def params(cases: dict[str, Case]):
    """``pytest.param`` per case (its id and marks), for a parametrized fixture."""
    import pytest

    return [pytest.param(c, id=name, marks=c.marks) for name, c in cases.items()]
