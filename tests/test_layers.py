"""Imports point down the pipeline only (README, Layout): linalg never sees torch.nn, data or zarr."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1] / "tjac"
SAME: dict = {}
ORDER = ["_checks", "_prefer", "_imports", "recipe", "data", "models", "optim", "problem", "trajectory", "replay", "linop", "distributed", "operator", "linalg",
         "analysis", "bench", "store", "checkpoint", "rebuild", "_env", "query", "analyze_store", "plotting", "runner", "scale", "cli", "__main__"]


def _imports(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level and node.module:
                yield node.module.split(".")[0], node.level
            elif node.level:
                for a in node.names:
                    yield a.name, node.level
            elif node.module:
                yield node.module, 0
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, 0


def _layer(path):
    rel = path.relative_to(ROOT).parts
    name = rel[0].removesuffix(".py")
    return SAME.get(name, name)


def test_import_direction():
    bad = []
    for path in ROOT.rglob("*.py"):
        me = _layer(path)
        if me not in ORDER:
            continue
        for mod, level in _imports(path):
            if level == 0:
                if mod.split(".")[0] == "zarr" and me != "store":
                    bad.append(f"{path.name} imports zarr (only store.py may)")
                if me == "linalg" and (mod.startswith("torch.nn") or mod.startswith("sklearn")):
                    bad.append(f"{path.name} imports {mod}")
                continue
            package = path.parent != ROOT  # tjac/<package>/<module>.py
            if level == 1 and package:
                continue  # inside the same package
            target = mod if (level == 1 and not package) or (level == 2 and package) else None
            target = SAME.get(target, target)
            if target in ORDER and ORDER.index(target) > ORDER.index(me):
                bad.append(f"{path.relative_to(ROOT)} imports {target} (a higher layer)")
            if me == "linalg" and target in ("data", "models", "problem", "trajectory", "store"):
                bad.append(f"{path.relative_to(ROOT)} imports {target}")
    assert not bad, "\n".join(bad)
