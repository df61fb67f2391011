"""tjac: the spectrum of the training Jacobian J = d theta_T / d theta_0, without forming J."""

import os as _os

_os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before cuBLAS initialises

from .operator import CheckReport, TrainingJacobian
from .linalg import ConvergenceError, SVDResult, svd
from .recipe import DataSpec, ModelSpec, OptimSpec, Recipe
from . import query
from .query import open
from .problem import Problem
from .trajectory import NondeterminismError, TrainingDivergedError, TrainResult, train

__version__ = "0.1.0"

__all__ = [
    "CheckReport", "ConvergenceError", "DataSpec", "ModelSpec", "NondeterminismError", "OptimSpec", "Problem", "Recipe", "SVDResult",
    "TrainResult", "TrainingDivergedError", "TrainingJacobian", "open", "query", "svd", "train", "__version__",
]
