"""Every operator runs the one contract of tests/contract.py (see its docstring for the checks and
for how a new operator opts in: one line in CASES).

Covered: DenseOperator (square float64/float32, rectangular, and one offering matvec/to_scipy),
the solvers' Counted wrapper, and TrainingJacobian for every built-in family (mlp, cnn, transformer)
x every replay backend that supports it x every checkpoint policy ("all", "sqrt", an int), plus Adam
and float32 variants, a block split (block_size < k), a user module with BatchNorm, dropout and a
user optimizer, and a param_filter operator. ``compiled`` cases compile for 20-70 s: marked slow.

The suite is tested too: broken operators, one per way of breaking the contract, must each be caught
by the check written for it, and every check must catch at least one.
"""
import math

import numpy as np
import pytest
import torch

import tjac
from tjac import replay
from tjac.linalg import DenseOperator
from tjac.linalg._base import Counted
from tjac.replay import EagerReplay

import contract
from contract import Case

needs_compiler = pytest.mark.skipif(not replay.compiler_available(),
                                    reason="torch.compile (inductor) needs a C++ compiler")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
SLOW_COMPILED = (pytest.mark.slow, needs_compiler)

# -- tiny recipes: 4 steps each (n_train 64, batches of 16, one epoch) -----------------------------
SMALL = dict(n_train=64, batch_size=16, epochs=1)
RECIPES = {
    "mlp": lambda: tjac.Recipe.paper(width=4, **SMALL),
    "mlp-adam": lambda: tjac.Recipe.paper(width=4, optimizer="adam", lr=0.01, **SMALL),
    "mlp-float32": lambda: tjac.Recipe.paper(width=4, dtype="float32", **SMALL),
    "cnn": lambda: tjac.Recipe.paper(family="cnn", width=2, **SMALL),
    "transformer": lambda: tjac.Recipe.paper(family="transformer", width=4, **SMALL),
    # BatchNorm (batch statistics) + seeded dropout + a torch.func-derived user optimizer
    "user": lambda: tjac.Recipe.paper(model="usermodels:bn_cnn", model_kwargs={"channels": 2, "p": 0.25},
                                      optimizer="custom", optimizer_factory="usermodels:momentum_sign",
                                      optimizer_kwargs={"lr": 0.02}, **SMALL),
    "param_filter": lambda: tjac.Recipe.paper(width=4, param_filter=("layers.1.*",), **SMALL),
    "mlp-cuda": lambda: tjac.Recipe.paper(width=4, device="cuda", **SMALL),
}
_PROBLEMS: dict = {}


def problem(name):
    """One Problem per recipe, shared by its operators (a `compiled` replay compiles once per
    Problem, so the determinism check's second operator reuses the first one's graphs)."""
    if name not in _PROBLEMS:
        _PROBLEMS[name] = tjac.Problem(RECIPES[name]())
    return _PROBLEMS[name]


def jac(recipe, **kw):
    return lambda: tjac.TrainingJacobian(problem(recipe), **kw)


def dense(m, n, dtype=torch.float64, cls=DenseOperator, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return cls(torch.randn(m, n, generator=gen, dtype=torch.float64).to(dtype) / math.sqrt(n))


class FullDense(DenseOperator):
    """DenseOperator plus the optional parts of the contract (matvec, rmatvec, to_scipy), written as
    TrainingJacobian offers them: the reference the broken operators below are broken from."""

    def matvec(self, x):
        return self.matmat(x.reshape(-1, 1)).reshape(-1)

    def rmatvec(self, y):
        return self.rmatmat(y.reshape(-1, 1)).reshape(-1)

    def _np(self, fn, rows):
        def f(X):
            X = torch.from_numpy(np.ascontiguousarray(np.asarray(X).reshape(rows, -1)))
            return fn(X.to(self.dtype)).numpy()
        return f

    def to_scipy(self, **extra):
        from scipy.sparse.linalg import LinearOperator

        m, n = self.shape
        mm, rmm = self._np(self.matmat, n), self._np(self.rmatmat, m)
        kw = dict(matvec=lambda x: mm(x).reshape(-1), rmatvec=lambda y: rmm(y).reshape(-1),
                  matmat=mm, rmatmat=rmm, dtype=torch.empty((), dtype=self.dtype).numpy().dtype)
        kw.update(extra)
        return LinearOperator(self.shape, **{k: v for k, v in kw.items() if v is not None})


# -- the operators under contract: family x backend x checkpoint policy ----------------------------
# The backends each built-in family supports (test_matrix_is_every_supported_backend holds this to
# tjac.replay.supported, so a new backend cannot be left out).
FAMILY_BACKENDS = {"mlp": ("eager", "fused", "compiled", "double-backward"),
                   "cnn": ("eager", "compiled", "double-backward"),
                   "transformer": ("eager", "compiled", "double-backward")}
# every kind TrainingJacobian(checkpoint=...) accepts; the int 3 splits T = 4 steps unevenly
POLICIES = ("all", "sqrt", 3)

CASES = {
    "dense-f64": Case(lambda: dense(12, 12)),
    "dense-f32": Case(lambda: dense(12, 12, torch.float32)),
    "dense-rect": Case(lambda: dense(7, 5)),
    "dense-full": Case(lambda: dense(12, 12, cls=FullDense)),
    "counted-dense": Case(lambda: Counted(dense(12, 12))),
    **{f"{fam}-{backend}-{policy}": Case(jac(fam, backend=backend, checkpoint=policy),
                                          marks=SLOW_COMPILED if backend == "compiled" else ())
       for fam, backends in FAMILY_BACKENDS.items() for backend in backends for policy in POLICIES},
    "mlp-adam-eager": Case(jac("mlp-adam", backend="eager")),
    "mlp-adam-fused": Case(jac("mlp-adam", backend="fused")),
    "mlp-float32-eager": Case(jac("mlp-float32", backend="eager")),
    "mlp-float32-fused-sqrt": Case(jac("mlp-float32", backend="fused", checkpoint="sqrt")),
    "mlp-fused-block2": Case(jac("mlp", backend="fused", block_size=2)),  # k = 3: two replays
    "counted-mlp": Case(lambda: Counted(tjac.TrainingJacobian(problem("mlp")))),
    "user-bn_cnn-eager": Case(jac("user", block_size=2)),
    "param_filter": Case(jac("param_filter", block_size=2)),
    "mlp-fused-cuda": Case(jac("mlp-cuda", backend="fused"), marks=(needs_cuda,)),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Products of nets this small gain nothing from intra-op threads, and on a loaded 2-core
    machine (xdist workers, other jobs) OpenMP's spinning threads made replays 10-100x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


_PROBES: dict = {}


@pytest.fixture(params=contract.params(CASES))
def probe(request):
    """One Probe per case and process, however xdist interleaves the checks of different cases."""
    key = id(request.param)  # the Case objects of CASES live as long as the process
    if key not in _PROBES:
        _PROBES[key] = contract.Probe(request.param)
    return _PROBES[key]


@pytest.mark.parametrize("check", list(contract.CHECKS))
def test_contract(probe, check):
    outcome = contract.run_check(probe, check)
    if outcome.status == "not offered":
        pytest.skip(outcome.detail)
    assert outcome.status == "pass", f"{check}: {outcome.detail}"


def test_matrix_is_every_supported_backend():
    """FAMILY_BACKENDS lists exactly the backends tjac.replay says each family supports."""
    for fam, listed in FAMILY_BACKENDS.items():
        prob = problem(fam)
        ok = {b for b in replay.BACKENDS if replay.supported(prob, b) is None}
        if not replay.compiler_available():
            ok.add("compiled")  # refused only for want of a compiler here; still in the matrix
        assert ok == set(listed), fam


# -- the suite catches broken operators ------------------------------------------------------------
def _delta(n=12, dtype=torch.float64):
    """A perturbation 100x the contract's tolerance for a 12 x 12 dense operator: caught, though
    far below anything a loose test would notice."""
    return 100 * contract.default_rtol(dtype, n)


def _E(n=12):
    return torch.randn(n, n, generator=torch.Generator().manual_seed(99), dtype=torch.float64)


class PerturbedAdjoint(FullDense):
    """rmatmat uses A + delta E: J^T is not the adjoint of J."""

    def rmatmat(self, Y):
        self.num_rmatvecs += Y.shape[1]
        return (self.A + _delta() * _E()).T @ Y


class Nondeterministic(FullDense):
    """Each product carries noise of a few ulps (unseeded randomness, atomics)."""

    def matmat(self, X):
        Y = super().matmat(X)
        self._calls = getattr(self, "_calls", 0) + 1  # noise differing per call (global RNG untouched)
        gen = torch.Generator().manual_seed(self._calls)
        noise = torch.randn(Y.shape, generator=gen, dtype=Y.dtype)
        return Y * (1 + 4 * torch.finfo(Y.dtype).eps * noise)


class ColdCacheDiffers(FullDense):
    """The first product of an instance takes another summation order than the cached later ones."""

    def matmat(self, X):
        if getattr(self, "_warm", False):
            return super().matmat(X)
        self._warm = True
        self.num_matvecs += X.shape[1]
        return ((3 * self.A) @ X) / 3


class WrongDtype(FullDense):
    def matmat(self, X):
        return super().matmat(X).float()


class WrongDevice(FullDense):
    """Returns its products on another device than it declares (here the meta device, which every
    machine has; on a GPU the classic slip is a result left on the CPU)."""

    def matmat(self, X):
        return super().matmat(X).to("meta")


class EmptyBlockCrashes(FullDense):
    """Column by column and concatenated: an empty block has nothing to concatenate."""

    def matmat(self, X):
        self.num_matvecs += X.shape[1]
        return torch.cat([self.A @ X[:, j:j + 1] for j in range(X.shape[1])], 1)


class MutatesInput(FullDense):
    """Rescales the block in place (against under/overflow) and the result back: the result is
    exact, the caller's block is not left as it was."""

    def matmat(self, X):
        X *= 2
        return super().matmat(X) / 2


class ReusesOutput(FullDense):
    """Writes every product into one workspace and returns it."""

    def matmat(self, X):
        self.num_matvecs += X.shape[1]
        ws = getattr(self, "_ws", None)
        if ws is None or ws.shape != (self.shape[0], X.shape[1]):
            ws = self._ws = X.new_empty(self.shape[0], X.shape[1])
        return torch.matmul(self.A, X, out=ws)


class ThroughNumpy(FullDense):
    """Computes through numpy, which refuses a tensor that requires grad."""

    def matmat(self, X):
        self.num_matvecs += X.shape[1]
        return torch.from_numpy(self.A.numpy() @ X.numpy())


class AcceptsWrongHeight(FullDense):
    """Pads or truncates a block to the expected height instead of refusing it."""

    def _fit(self, X, rows):
        out = X.new_zeros(rows, X.shape[1])
        r = min(rows, X.shape[0])
        out[:r] = X[:r]
        return out

    def matmat(self, X):
        return super().matmat(self._fit(X, self.shape[1]))

    def rmatmat(self, Y):
        return super().rmatmat(self._fit(Y, self.shape[0]))


class WidthDependent(FullDense):
    """Blocks take another path than single columns, and the paths disagree (both directions, so
    the adjoint identity within a block still holds)."""

    def matmat(self, X):
        return super().matmat(X) * (1 + _delta() * (X.shape[1] > 1))

    def rmatmat(self, Y):
        return super().rmatmat(Y) * (1 + _delta() * (Y.shape[1] > 1))


class Affine(FullDense):
    """A constant leaks into the product (e.g. the primal added to the tangent): J 0 != 0."""

    def matmat(self, X):
        return super().matmat(X) + _delta()


class CountsCalls(FullDense):
    def matmat(self, X):
        self.num_matvecs += 1 - X.shape[1]  # net: one per call
        return super().matmat(X)


class ProbingScipy(FullDense):
    """to_scipy() without dtype=: scipy runs a product to find the dtype."""

    def to_scipy(self):
        return super().to_scipy(dtype=None)


class TransposedScipy(FullDense):
    """to_scipy() with matvec and rmatvec swapped."""

    def to_scipy(self):
        m, n = self.shape
        mm, rmm = self._np(self.matmat, n), self._np(self.rmatmat, m)
        return super().to_scipy(matvec=lambda y: rmm(y).reshape(-1), rmatvec=lambda x: mm(x).reshape(-1))


class ForgetsMomentum(EagerReplay):
    """A reverse sweep that drops the momentum cotangent between steps (a plausible slip when
    writing an adjoint by hand): J^T W is wrong, everything else about the operator is right."""

    def vjp(self, W):
        prob, opt = self.problem, self.problem.optimizer

        def zeros():
            return tuple(torch.zeros_like(W) for _ in opt.state_names[1:])

        bs = (W.contiguous(),) + zeros()
        with torch.no_grad():
            for t, state in self.trajectory.reversed_states():
                g = prob.grad(state[0], t) if opt.needs_grad_for_vjp else None
                bs, bg = opt.vjp(state, g, bs, t)
                _, hbg = prob.grad_hvp(state[0], bg, t)
                bs = (bs[0] + hbg,) + zeros()
        return bs[0]


class ScaledVJP(EagerReplay):
    """The exact reverse sweep, off by a relative 100x the contract's tolerance for this operator."""

    def vjp(self, W):
        P = self.problem.num_params
        return super().vjp(W) * (1 + 100 * contract.default_rtol(W.dtype, P, self.problem.num_steps))


def with_replay(cls):
    def factory():
        op = tjac.TrainingJacobian(problem("mlp"), backend="eager")
        op._replay = cls(op.problem, op.trajectory)
        return op
    return factory


def unseeded_forward():
    return tjac.TrainingJacobian(tjac.Recipe.paper(model="usermodels:noisy", **SMALL))


# name -> (factory, the checks that must fail, whether they are the only ones that fail)
BROKEN = {
    "perturbed-adjoint": (lambda: dense(12, 12, cls=PerturbedAdjoint), {"adjoint"}, True),
    "nondeterministic": (lambda: dense(12, 12, cls=Nondeterministic), {"determinism"}, True),
    "cold-cache-differs": (lambda: dense(12, 12, cls=ColdCacheDiffers), {"determinism"}, True),
    "wrong-dtype": (lambda: dense(12, 12, cls=WrongDtype), {"shape_dtype_device"}, False),
    "wrong-device": (lambda: dense(12, 12, cls=WrongDevice), {"shape_dtype_device"}, False),
    "empty-block-crashes": (lambda: dense(12, 12, cls=EmptyBlockCrashes),
                            {"shape_dtype_device", "counters"}, True),
    "mutates-input": (lambda: dense(12, 12, cls=MutatesInput), {"aliasing", "requires_grad"}, True),
    "reuses-output": (lambda: dense(12, 12, cls=ReusesOutput), {"aliasing", "requires_grad"}, True),
    "through-numpy": (lambda: dense(12, 12, cls=ThroughNumpy), {"requires_grad"}, True),
    "accepts-wrong-height": (lambda: dense(12, 12, cls=AcceptsWrongHeight), {"wrong_height"}, True),
    "width-dependent": (lambda: dense(12, 12, cls=WidthDependent), {"columns", "scipy"}, True),
    "affine": (lambda: dense(12, 12, cls=Affine), {"linearity", "adjoint"}, False),
    "counts-calls": (lambda: dense(12, 12, cls=CountsCalls), {"counters", "scipy"}, True),
    "probing-scipy": (lambda: dense(12, 12, cls=ProbingScipy), {"scipy"}, True),
    "transposed-scipy": (lambda: dense(12, 12, cls=TransposedScipy), {"scipy"}, True),
    "forgets-momentum": (with_replay(ForgetsMomentum), {"adjoint"}, True),
    "vjp-off-by-100-rtol": (with_replay(ScaledVJP), {"adjoint"}, True),
    "unseeded-forward": (unseeded_forward, {"determinism"}, False),
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_contract_catches_broken_operator(name):
    factory, caught_by, only = BROKEN[name]
    failed = contract.failures(contract.run(factory))
    assert caught_by <= set(failed), f"{name}: expected {sorted(caught_by)} to fail, failed: {failed}"
    if only:  # the checks are specific: nothing else about this operator is wrong
        assert set(failed) == caught_by, f"{name}: unexpected failures {failed}"
    with pytest.raises(contract.ContractViolation, match="|".join(sorted(caught_by))):
        contract.verify(factory)


def test_every_check_can_fail():
    caught = set().union(*(c for _, c, _ in BROKEN.values()))
    assert caught == set(contract.CHECKS), f"never shown to fail: {set(contract.CHECKS) - caught}"


def test_sound_reference_passes_everything():
    """The operator the broken ones are derived from passes every check, optional parts included
    (none 'not offered')."""
    outcomes = contract.run(lambda: dense(12, 12, cls=FullDense))
    assert {o.status for o in outcomes.values()} == {"pass"}, outcomes
