"""tjac: the spectrum of the training Jacobian J = d theta_T / d theta_0, without forming J."""

from .operator import CheckReport, TrainingJacobian
from .recipe import DataSpec, ModelSpec, OptimSpec, Recipe
from .trajectory import NondeterminismError, Problem, TrainingDivergedError, TrainResult, train

__version__ = "0.1.0"

__all__ = [
    "CheckReport", "DataSpec", "ModelSpec", "NondeterminismError", "OptimSpec", "Problem", "Recipe",
    "TrainResult", "TrainingDivergedError", "TrainingJacobian", "train", "__version__",
]
