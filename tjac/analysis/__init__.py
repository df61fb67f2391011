"""The paper's analyses as functions of a recipe, an operator and solver results."""

from .regions import EPSILONS, REGIONS, Regions, alignment, region_counts
from .structural import StructuralOnes, structural_ones, verify_structural
from .summary import spectrum_summary

__all__ = ["EPSILONS", "REGIONS", "Regions", "alignment", "region_counts", "StructuralOnes", "spectrum_summary", "structural_ones", "verify_structural"]
from .experiments import AnalysisResult, movement, overlap_runs, subspace_overlap
from .response import ood_kl, perturbation_response
from .restricted import Complement, Whole, restricted_sweep, restricted_training
from .bulk import output_jacobian_null, predict_bulk

__all__ += ["AnalysisResult", "Complement", "Whole", "movement", "ood_kl",
            "output_jacobian_null", "overlap_runs", "perturbation_response", "predict_bulk",
            "restricted_sweep", "restricted_training", "subspace_overlap"]
from .density import (Density, IntervalCount, Quadrature, ResolutionError, bulk_size, count_regions,
                      count_in_interval, slq, spectral_density)

__all__ += ["Density", "IntervalCount", "Quadrature", "ResolutionError", "bulk_size",
            "count_in_interval", "count_regions", "slq", "spectral_density"]
