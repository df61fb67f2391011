"""Objects named by import path (``"package.module:attribute"``) in recipes, never by pickling."""

from __future__ import annotations

import importlib
import os
import sys


class ImportPathError(ValueError):
    """An import path that does not resolve (the message names the module or attribute)."""


def resolve(path: str, *, what: str):
    """Import ``package.module`` and return its ``attribute`` (dots allowed: ``Class.method``).

    The working directory is importable, as with ``python -m``: ``--model mynets:small`` finds
    ``./mynets.py``."""
    mod_name, _, attr = path.partition(":")
    if not mod_name or not attr:
        raise ImportPathError(f"{what} {path!r} must be an import path 'package.module:attribute'")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)
    try:
        obj = importlib.import_module(mod_name)
    except ImportError as e:
        raise ImportPathError(f"{what} {path!r}: cannot import module {mod_name!r} "
                              f"({type(e).__name__}: {e})") from None
    except Exception as e:  # noqa: BLE001 - the user's module raised while importing
        raise ImportPathError(f"{what} {path!r}: importing {mod_name!r} raised "
                              f"{type(e).__name__}: {e}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ImportPathError(f"{what} {path!r}: module {mod_name!r} has no attribute "
                                  f"{attr!r}")
        obj = getattr(obj, part)
    return obj
