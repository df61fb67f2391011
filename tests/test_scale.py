"""``tjac scale`` sweeps the spectrum: certified top, region counts with brackets beside the exact
counts, structural ones, fitted exponents with their errors, one store, a figure."""

import math

import numpy as np

import tjac
from tjac import scale


def test_sweep_reports_counts_with_exact_values_and_fits(tmp_path):
    seeded = scale.sweep_recipes("mlp", [4, 6], [1], seeds=(0, 1), epochs=2, n_train=128)
    assert [r for r, _ in seeded] == ["mlp-w4-d1-s0", "mlp-w4-d1-s1", "mlp-w6-d1-s0",
                                      "mlp-w6-d1-s1"]
    assert seeded[1][1].seed == 1 and seeded[1][1].hash() != seeded[0][1].hash()
    recipes = [seeded[0], seeded[3]]
    path = str(tmp_path / "s.zarr")
    rows = scale.run_sweep(recipes, path, k_top=4, k_bottom=4, log=lambda s: None,
                           epsilons=(0.3, 0.05), probes=4)
    assert len(rows) == 2
    for r in rows:
        run = tjac.open(path).run(r["run"])
        sig = run.sigma("all")      # tiny nets: the dense path ran, the exact counts are known
        assert r["complete"] and len(r["sigma_top"]) == 4 and r["top_certified"] == 4
        assert np.allclose(r["sigma_top"], sig[:4], rtol=1e-8)
        for e in (0.3, 0.05):
            c = r["counts"][repr(e)]
            ex = int((np.abs(sig - 1) <= e).sum())
            assert c["bulk"]["exact"] == ex
            assert c["bulk"]["lower"] <= ex <= c["bulk"]["upper"]
        assert sorted(run.analyses()) == ["counts", "density"]
        assert "exact-1" in scale.format_row(r, 0.3)
    f = scale.fits(rows, 0.3)
    assert set(f) >= {"seconds", "sigma_max", "bulk_0.3", "bulk_fraction_0.3"}
    # the fit is the least-squares slope over every seed's point
    P = np.log([r["P"] for r in rows])
    y = np.log([r["counts"]["0.3"]["bulk"]["estimate"] for r in rows])
    assert math.isclose(f["bulk_0.3"]["exponent"], np.polyfit(P, y, 1)[0], rel_tol=1e-9)
    assert math.isnan(f["bulk_0.3"]["stderr"])  # two points: no error estimate (see below)
    png = str(tmp_path / "s.png")
    scale.plot_scaling(rows, png, eps=0.3)
    assert (tmp_path / "s.png").stat().st_size > 10_000


def test_fit_power_recovers_a_planted_exponent_and_its_error():
    P = np.array([1e3, 3e3, 1e4, 3e4, 1e5] * 3)
    rng = np.random.default_rng(0)
    y = 2.0 * P ** 0.75 * np.exp(rng.normal(0, 0.05, P.shape))
    a, se = scale.fit_power(P, y)
    assert abs(a - 0.75) < 3 * se and 0 < se < 0.05
    assert math.isnan(scale.fit_power([1e3], [1.0])[0])


def test_spread_is_the_seed_to_seed_mean_and_sd_at_each_p():
    def row(P, seed, bulk, smax):
        return {"run": f"r{P}-{seed}", "P": P, "seed": seed, "seconds": 1.0, "sigma_max": smax,
                "exact_one": 5, "counts": {"0.01": {n: {"estimate": bulk, "lower": bulk - 1,
                                                        "upper": bulk + 1, "exact": None}
                                                    for n in ("chaotic", "bulk", "stable")}}}
    rows = [row(100, 0, 30.0, 2.0), row(100, 1, 34.0, 3.0), row(100, 2, 35.0, 4.0),
            row(400, 0, 150.0, 1.5)]
    sp = scale.spread(rows, 0.01)
    b = sp["bulk_0.01"]
    assert [x["P"] for x in b] == [100, 400] and [x["n"] for x in b] == [3, 1]
    assert math.isclose(b[0]["mean"], 33.0) and math.isclose(b[0]["sd"], np.std([30, 34, 35],
                                                                                  ddof=1))
    assert b[1]["sd"] is None and b[1]["cv"] is None and math.isclose(b[1]["mean"], 150.0)
    assert math.isclose(sp["sigma_max"][0]["cv"], 1.0 / 3.0)
    assert math.isclose(sp["bulk_fraction_0.01"][0]["mean"], 0.33)
