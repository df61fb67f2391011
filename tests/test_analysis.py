import pytest
import torch

import tjac
from tjac.analysis import spectrum_summary, structural_ones, verify_structural
from tjac.analysis import region_counts
from tjac.linalg import materialize


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_structural_ones_match_the_dense_spectrum(opt):
    op = tjac.TrainingJacobian(tjac.Recipe.paper(width=6, epochs=1, n_train=512, optimizer=opt))
    s = structural_ones(op.problem)
    # the pixels that are 0 in all 512 training images (the full 1600 have only 0, 32 and 39)
    assert s.zero_features == (0, 32, 39, 48, 56)
    assert s.zero_features == tuple(int(i) for i in
                                    torch.nonzero((op.problem.data.x_train == 0).all(0)).flatten())
    assert s.n_zero_input == 6 * len(s.zero_features) and s.n_softmax_shift == 6 + 1
    ver = verify_structural(op, s)
    assert ver["zero_input"] == (0.0, 0.0)
    assert ver["softmax_shift"][0] < 1e-13  # J d = d for every optimizer
    S = torch.linalg.svdvals(materialize(op))
    n_one = int(((S - 1).abs() <= 1e-12).sum())
    if opt == "sgd":
        assert ver["softmax_shift"][1] < 1e-13 and n_one == s.n_exact_singular == s.n_zero_input + 7
    else:  # Adam: d is an eigenvector, not a singular vector
        assert ver["softmax_shift"][1] > 1e-6 and n_one == s.n_exact_singular == s.n_zero_input


def test_the_paper_recipe_has_257_structural_ones():
    """README: 3 zero pixels x 64 + 65 softmax-shift directions (no training needed)."""
    s = structural_ones(tjac.Problem(tjac.Recipe.paper()))
    assert s.zero_features == (0, 32, 39) and s.n_zero_input == 3 * 64
    assert s.n_softmax_shift == 65 and s.shift_is_singular and s.n_exact_singular == 257


def test_white_noise_has_no_zero_inputs_and_weight_decay_none():
    s = structural_ones(tjac.Problem(tjac.Recipe.paper(width=4, epochs=1, data="white_noise")))
    assert s.n_zero_input == 0 and s.n_softmax_shift == 5
    s = structural_ones(tjac.Problem(tjac.Recipe.paper(width=4, epochs=1, weight_decay=1e-3)))
    assert s.n_exact_singular == 0


def test_region_counts_and_summary():
    S = torch.tensor([5.0, 1.0 + 2e-3, 1.0 + 5e-4, 1.0, 1.0, 1 - 5e-5, 0.5, 1e-9], dtype=torch.float64)
    r = region_counts(S, 1e-3, P=8)
    assert (r.chaotic, r.bulk, r.stable, r.complete) == (2, 4, 2, True)
    assert r.exact and (r.chaotic_min, r.bulk_max, r.ambiguous, r.unknown) == (2, 4, 0, 0)
    r = region_counts(S, 1e-4, P=100)  # 92 values unknown: bounds, no counts
    assert (r.chaotic, r.bulk, r.stable, r.complete) == (None, None, None, False)
    assert (r.chaotic_min, r.bulk_min, r.stable_min) == (3, 3, 2)
    assert (r.chaotic_max, r.bulk_max, r.stable_max) == (95, 95, 94) and r.unknown == 92
    summ = spectrum_summary(S, P=8)
    assert summ["numerically_one"] == 2 and summ["complete"]
    assert summ["sigma_min_bound_only"] is False  # no certificate given: the values are exact
    with pytest.raises(ValueError, match="`eps` must be a positive number"):
        region_counts(S, 0.0)
