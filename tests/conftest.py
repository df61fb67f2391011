import pytest
import torch

import tjac


def tiny(**kw):
    """A recipe small enough for dense oracles: width 4, 128 training examples, 2 steps/epoch."""
    base = dict(width=4, epochs=2, n_train=128, batch_size=32)
    base.update(kw)
    return tjac.Recipe.paper(**base)


# tolerances scaled by the dtype's eps (relative, for quantities of order one)
RTOL = {torch.float64: 1e4 * torch.finfo(torch.float64).eps, torch.float32: 3e3 * torch.finfo(torch.float32).eps}


def assert_close(actual, expected, rtol, what=""):
    """Relative error in the max norm; prints the worst entries when it fails."""
    actual, expected = actual.double(), expected.double()
    err = (actual - expected).abs()
    scale = expected.abs().max().clamp_min(1e-300)
    rel = float(err.max() / scale)
    if not rel <= rtol:
        idx = torch.topk(err.reshape(-1), min(5, err.numel())).indices
        rows = ", ".join(f"[{int(i)}] {float(actual.reshape(-1)[i]):.6e} vs {float(expected.reshape(-1)[i]):.6e}"
                         for i in idx)
        pytest.fail(f"{what}: relative error {rel:.3e} > {rtol:.1e}; worst: {rows}")
