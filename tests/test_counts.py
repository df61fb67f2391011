"""Counts that respect the certificates: a sigma certified to +-r near a region boundary is
ambiguous; a partial spectrum gives bounds, never a count of values it has not seen; a triplet whose
certificate is >= 0.1 sigma is an upper bound, not a certified value (store, queries, CLI, summary)."""
import json

import numpy as np
import pytest
import torch

import tjac
from tjac.analysis import spectrum_summary
from tjac.cli import main
from tjac.analysis import region_counts
from tjac.query import open as open_store

EPS = 1e-3


def test_region_counts_with_certificates_report_ambiguous_values():
    S = torch.tensor([2.0, 1 + EPS + 5e-10, 1.0, 1 - EPS - 2e-10, 0.5], dtype=torch.float64)
    r = torch.tensor([1e-12, 1e-9, 1e-14, 1e-9, 1e-12], dtype=torch.float64)
    reg = region_counts(S, EPS, P=5, certificate=r)
    assert (reg.chaotic, reg.bulk, reg.stable) == (2, 1, 2)  # sigma taken at face value
    assert (reg.chaotic_min, reg.chaotic_max) == (1, 2)
    assert (reg.bulk_min, reg.bulk_max) == (1, 3)
    assert (reg.stable_min, reg.stable_max) == (1, 2)
    assert reg.ambiguous == 2 and reg.unknown == 0 and reg.complete and not reg.exact
    d = reg.as_dict()
    assert json.loads(json.dumps(d)) == d and d["ambiguous"] == 2 and d["bulk_max"] == 3
    # certificates that do not reach a boundary change nothing
    reg = region_counts(S, EPS, P=5, certificate=torch.full((5,), 1e-13, dtype=torch.float64))
    assert reg.exact and (reg.chaotic, reg.bulk, reg.stable) == (2, 1, 2) == (
        reg.chaotic_min, reg.bulk_min, reg.stable_min)
    # a value whose interval spans the whole bulk may be in any region
    reg = region_counts(torch.tensor([1.0], dtype=torch.float64), EPS, P=1,
                        certificate=torch.tensor([0.1], dtype=torch.float64))
    assert (reg.chaotic_max, reg.bulk_max, reg.stable_max, reg.ambiguous) == (1, 1, 1, 1)
    assert (reg.chaotic_min, reg.bulk_min, reg.stable_min) == (0, 0, 0)
    with pytest.raises(ValueError, match="certificate"):
        region_counts(S, EPS, P=5, certificate=r[:3])


def test_a_partial_spectrum_gives_bounds_not_counts():
    """P = 9,610 with only the top-32 and bottom-32 known: the bulk is unknown, not 0."""
    S = torch.cat([torch.linspace(40, 1.5, 32), torch.linspace(0.3, 1e-9, 32)]).double()
    for eps in (1e-2, 1e-3, 1e-4):
        reg = region_counts(S, eps, P=9610, certificate=torch.full((64,), 1e-12).double())
        assert reg.chaotic is None and reg.bulk is None and reg.stable is None
        assert (reg.chaotic_min, reg.bulk_min, reg.stable_min) == (32, 0, 32)
        assert (reg.chaotic_max, reg.bulk_max, reg.stable_max) == (32 + 9546, 9546, 32 + 9546)
        assert reg.unknown == 9546 and not reg.complete
        text = reg.describe()
        assert "chaotic >= 32" in text and "bulk unknown" in text and "stable >= 32" in text
        assert "bulk 0" not in text
    summ = spectrum_summary(S, P=9610, certificate=torch.full((64,), 1e-12).double())
    assert all(r["bulk"] is None and r["bulk_max"] == 9546 for r in summ["regions"])
    assert summ["numerically_one"] is None and summ["numerically_one_max"] == 9546


def test_numerically_one_counts_respect_the_certificates():
    S = torch.tensor([1.0, 1 + 5e-13, 1 + 3e-12, 0.5], dtype=torch.float64)
    r = torch.tensor([1e-15, 1e-12, 1e-15, 1e-15], dtype=torch.float64)
    s = spectrum_summary(S, P=4, certificate=r)
    assert s["numerically_one"] == 2 and s["numerically_one_min"] == 1
    assert s["numerically_one_max"] == 2 and s["numerically_one_ambiguous"] == 1
    assert s["regions"][0]["complete"] and s["n_bound_only"] == 0


TINY = ["--width", "4", "--epochs", "1", "--n-train", "64", "--batch-size", "32", "--png", "none",
        "--backend", "eager"]


def test_partial_store_reports_what_it_knows(tmp_path, capsys):
    store = str(tmp_path / "p.zarr")
    assert main(["run", *TINY, "--k-top", "3", "--k-bottom", "0", "--method", "randomized",
                 "--store", store]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith("1e-0")]
    assert len(rows) == 3, out
    for row in rows:  # eps, chaotic, bulk, stable: nothing claimed about the 307 unseen values
        assert row[1] in (">=3", ">=2", ">=1", "unknown") and row[2] == "unknown", out
        assert row[3] == "unknown", out
    ones = next(line for line in out.splitlines() if "sigma = 1 to 1e-12" in line)
    assert "unknown" in ones and "0 found" not in ones, out
    run = open_store(store).run(open_store(store).runs()[0])
    reg = run.regions(EPS)
    assert reg["bulk"] is None and reg["stable"] is None and reg["unknown"] == 310 - 3
    assert reg["chaotic_min"] + reg["bulk_min"] + reg["stable_min"] + reg["ambiguous"] == 3
    assert main(["query", store, "--regions", "1e-3"]) == 0
    line = capsys.readouterr().out
    assert "bulk unknown" in line and "bulk 0" not in line and "of 310" in line
    assert main(["query", store, "--regions", "1e-3", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["bulk"] is None and got["bulk_max"] == 307 + got["bulk_min"] + got["ambiguous"]
    assert run.summary["spectrum"]["numerically_one"] is None


def test_dense_store_certifies_every_value(tmp_path, capsys):
    """The dense path stores a residual pair for every sigma of the full spectrum; an older store
    without them falls back on the stated round-off bound P * eps * sigma_max."""
    import zarr

    store = str(tmp_path / "d.zarr")
    assert main(["run", *TINY, "--k-top", "2", "--k-bottom", "2", "--method", "dense", "-q",
                 "--store", store]) == 0
    run = open_store(store).run(open_store(store).runs()[0])
    sp = run.spectrum()
    assert sp.complete and sp.sigma.shape == (310,) and sp.source == "residuals"
    assert (sp.certificate < 1e-12 * sp.sigma[0]).all() and (sp.certificate > 0).any()
    np.testing.assert_array_equal(sp.certificate[:2], run.top().certificate)
    np.testing.assert_array_equal(sp.certificate[::-1][:2], run.bottom().certificate)
    reg = run.regions(EPS)
    assert reg["complete"] and reg["exact"] and reg["chaotic"] + reg["bulk"] + reg["stable"] == 310
    summ = run.summary["spectrum"]
    # every sigma = 1 (to 1e-12) is certified as such; two steps of training leave more of them
    # than the structural ones
    assert summ["numerically_one"] == summ["numerically_one_min"] == summ["numerically_one_max"]
    assert summ["numerically_one"] >= summ["structural"]["n_exact_singular"] > 0
    # a store written before the residuals of the full spectrum were kept
    g = zarr.open_group(store, mode="r+")
    del g[f"runs/{run.id}/spectrum/residual"]
    old = open_store(store).run(run.id).spectrum()
    bound = 310 * np.finfo(np.float64).eps * old.sigma[0]
    assert old.source.startswith("round-off bound")
    np.testing.assert_array_equal(old.certificate[2:-2], bound)
    np.testing.assert_array_equal(old.certificate[:2], run.top().certificate)
    assert open_store(store).run(run.id).regions(EPS)["n"] == 310


def test_bound_only_triplets_are_flagged_not_certified(tmp_path, capsys):
    """Weight decay 10 at learning rate 0.1 zeroes the zero-input weights after the first step: J
    has ~1e-17 singular values that its residuals (~1e-17, relative to ||J||) bound but do not
    measure."""
    store = str(tmp_path / "b.zarr")
    assert main(["run", *TINY, "--k-top", "2", "--k-bottom", "4", "--method", "dense",
                 "--store", store, "--config", _write(tmp_path, "momentum = 0.0\nweight_decay = 10.0\n")]) == 0
    out = capsys.readouterr().out
    bottom = next(line for line in out.splitlines() if line.strip().startswith("bottom"))
    assert "certified 0/4" in bottom and "4 upper bounds only" in bottom, out
    top = next(line for line in out.splitlines() if line.strip().startswith("top"))
    assert "certified 2/2" in top and "upper bound" not in top
    run = open_store(store).run(open_store(store).runs()[0])
    b = run.bottom()
    assert b.bound_only.all() and b.converged.all() and not b.certified.any()
    np.testing.assert_array_equal(b.bound_only, tjac.linalg.bound_only(
        torch.from_numpy(b.sigma), torch.from_numpy(b.certificate)).numpy())
    assert not run.top().bound_only.any() and run.top().certified.all()
    s = run.summary
    assert s["bottom"]["n_certified"] == 0 and s["bottom"]["n_bound_only"] == 4
    assert s["top"]["n_certified"] == 2 and s["top"]["n_bound_only"] == 0
    assert s["spectrum"]["sigma_min_bound_only"] and s["spectrum"]["n_bound_only"] >= 4
    assert main(["query", store, "--bottom", "4"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows, note = out[1:5], out[5:]
    assert all(r.split()[-1] == "bound" for r in rows) and "upper bound" in note[0], out
    assert main(["query", store, "--bottom", "4", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["bound_only"] == [True] * 4 and got["certified"] == [False] * 4
    assert main(["info", store]) == 0
    out = capsys.readouterr().out
    assert "bottom 0/4 certified, 4 upper bounds only" in out and "top 2/2 certified" in out
    assert main(["info", store, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["runs"][run.id]["solves"]["bottom"] == {"k": 4, "certified": 0, "bound_only": 4,
                                                        "unconverged": 0}


def _write(tmp_path, text):
    p = tmp_path / "c.toml"
    p.write_text(text)
    return str(p)
