"""The solve plan's product counts are the measurements committed in ``benchmarks/results/``:
each constant in :mod:`tjac.linalg.plan` is recomputed here from the raw JSON (products and P, not
a stored ratio), by the rule its comment states, and must agree."""
import json
import math
import statistics
from pathlib import Path

from tjac.linalg import plan

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def _load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def _up(x: float) -> float:
    """Rounded up to 2 decimals (a plan should not undercount what was measured)."""
    return math.ceil(round(x * 100, 9)) / 100


def test_lanczos_top_products_are_the_committed_shares():
    d = _load("top-products-paper.json")
    runs = d["runs"]
    assert all(r["all_converged"] for r in runs.values())
    ref = runs["randomized"]["products"]
    want = {int(name.removeprefix("lanczos_block")): _up(r["products"] / ref)
            for name, r in runs.items() if name.startswith("lanczos_block")}
    assert want and plan.LANCZOS_TOP_PRODUCTS == want


def test_lanczos_bottom_products_are_the_largest_certified_run():
    runs = []
    for f in sorted(RESULTS.glob("bottom-width*.json")):
        for r in _load(f.name)["results"].values():
            if (isinstance(r, dict) and str(r.get("method", "")).startswith("lanczos")
                    and r.get("all_converged") and "products" in r):
                runs.append(r)
    assert runs
    P = max(r["P"] for r in runs)
    want = _up(max(r["products"] for r in runs if r["P"] == P) / P)
    assert plan.LANCZOS_BOTTOM_PRODUCTS == want


def _randomized_passes():
    """(products / l - 1) / 2 of every committed randomized top solve, l = k + 8."""
    out = []
    for name in ("scale-top16.json", "scale-top16-mid.json"):
        d = _load(name)["results"]
        out += [(r["products"], d["k"] + 8) for r in d["rows"] if r["method"] == "randomized"]
    for case in _load("solvers-paper.json")["paper"]["cases"]:
        out += [(r["products"], case["k"] + 8) for r in case["rows"]
                if r["solver"] == "tjac randomized" and r["converged"]]
    d = _load("top-products-paper.json")
    out.append((d["runs"]["randomized"]["products"], d["k"] + 8))
    passes = []
    for products, l in out:
        assert products % l == 0 and (products // l) % 2 == 1, (products, l)
        passes.append((products // l - 1) // 2)
    return passes


def test_randomized_passes_are_the_committed_median():
    passes = _randomized_passes()
    assert len(passes) >= 8
    assert plan.RANDOMIZED_PASSES == math.ceil(statistics.median(passes))
