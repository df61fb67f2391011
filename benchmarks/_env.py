"""Environment record written beside every benchmark's JSON."""
import json
import os

from tjac._env import environment  # noqa: F401


def write(path, payload):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
    with open(os.path.join(os.path.dirname(path), "environment.json"), "w") as f:
        json.dump(environment(), f, indent=2, sort_keys=True)
