"""The paper's recipe end to end (minutes: excluded by default; run with -m slow)."""
import pytest
import torch

import tjac
from tjac.analysis import structural_ones


@pytest.mark.slow
def test_paper_recipe_structural_ones_and_bulk():
    op = tjac.TrainingJacobian(tjac.Recipe.paper())
    s = structural_ones(op.problem)
    assert s.zero_features == (0, 32, 39) and s.n_exact_singular == 257
    J = tjac.linalg.materialize(op)
    S = torch.linalg.svdvals(J)
    assert int(((S - 1).abs() <= 1e-12).sum()) == 257
    top = tjac.svd(op, 16, which="top", method="lanczos")
    torch.testing.assert_close(top.S, S[:16], rtol=1e-8, atol=0)
    # chaotic, bulk and stable regions all present, as in the paper
    assert (S > 1 + 1e-3).sum() > 500 and ((S - 1).abs() <= 1e-3).sum() > 500 and (S < 1 - 1e-3).sum() > 500
