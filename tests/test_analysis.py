import pytest
import torch

import tjac
from tjac.analysis import spectrum_summary, structural_ones, verify_structural
from tjac.linalg import materialize, region_counts


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_structural_ones_match_the_dense_spectrum(opt):
    op = tjac.TrainingJacobian(tjac.Recipe.paper(width=6, epochs=1, n_train=512, optimizer=opt))
    s = structural_ones(op.problem)
    assert s.zero_features == (0, 32, 39) or len(s.zero_features) >= 1
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


def test_white_noise_has_no_zero_inputs_and_weight_decay_none():
    s = structural_ones(tjac.Problem(tjac.Recipe.paper(width=4, epochs=1, data="white_noise")))
    assert s.n_zero_input == 0 and s.n_softmax_shift == 5
    s = structural_ones(tjac.Problem(tjac.Recipe.paper(width=4, epochs=1, weight_decay=1e-3)))
    assert s.n_exact_singular == 0


def test_region_counts_and_summary():
    S = torch.tensor([5.0, 1.0 + 2e-3, 1.0 + 5e-4, 1.0, 1.0, 1 - 5e-5, 0.5, 1e-9], dtype=torch.float64)
    r = region_counts(S, 1e-3, P=8)
    assert (r.chaotic, r.bulk, r.stable, r.complete) == (2, 4, 2, True)
    r = region_counts(S, 1e-4, P=100)
    assert (r.chaotic, r.bulk, r.stable, r.complete) == (3, 3, 2, False)
    summ = spectrum_summary(S, P=8)
    assert summ["numerically_one"] == 2 and summ["complete"]
    with pytest.raises(ValueError, match="`eps` must be a positive number"):
        region_counts(S, 0.0)
