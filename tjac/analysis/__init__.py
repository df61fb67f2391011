"""The paper's analyses as functions of a recipe, an operator and solver results."""

from .structural import StructuralOnes, structural_ones, verify_structural
from .summary import spectrum_summary

__all__ = ["StructuralOnes", "spectrum_summary", "structural_ones", "verify_structural"]
