"""Query a results store written by `tjac run` (a tiny run is made first if none is given).

    python examples/query_store.py [STORE]
"""
import subprocess
import sys
import tempfile

import tjac.query

path = sys.argv[1] if len(sys.argv) > 1 else None
if path is None:
    path = tempfile.mkdtemp() + "/results.zarr"
    subprocess.run([sys.executable, "-m", "tjac", "run", "--width", "8", "--epochs", "2",
                    "--k-top", "4", "--k-bottom", "4", "--store", path, "--png", "none", "-q"],
                   check=True)

res = tjac.query.open(path)
for run_id in res.runs():
    run = res.run(run_id)
    print(run_id, run.status, "P =", run.P, "| recipe hidden:", run.recipe.model.hidden)
    print("  top sigma     ", run.top(4).sigma)
    print("  bottom sigma  ", run.bottom(4).sigma)
    print("  regions 1e-3  ", run.regions(1e-3))
    u, v = run.vectors("top", 0)                        # reads one (1, P) chunk each
    print("  |u_0 . v_0|   ", abs(float(u @ v)))
