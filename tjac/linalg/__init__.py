"""Matrix-free singular value algorithms over the operator protocol (shape, dtype, matmat, rmatmat).

Never imports torch.nn, the data, the models or zarr.
"""

from ._base import (BOUND_ONLY, BudgetError, ConvergenceError, bound_only, DenseOperator, DiagonalOperator, SVDResult, fresh_residuals, orthonormalize,
                    small_svd)
from .decomp import ToleranceError, choose_method, default_tol, roundoff_floor, svd
from .dense import dense_svd, materialize
from .plan import SolvePlan, plan_solve
from .progress import Progress

__all__ = ["Progress", "SolvePlan", "plan_solve", "ToleranceError", "default_tol", "roundoff_floor", "BOUND_ONLY", "BudgetError", "ConvergenceError", "bound_only", "DenseOperator", "DiagonalOperator", "SVDResult", "choose_method",
           "dense_svd", "fresh_residuals", "materialize", "orthonormalize", "svd", "small_svd"]
