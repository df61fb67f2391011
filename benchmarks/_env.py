"""Environment record written beside every benchmark's JSON."""
import json
import os
import platform
import sys


def environment() -> dict:
    import numpy
    import scipy
    import torch

    import tjac

    env = {"python": sys.version.split()[0], "platform": platform.platform(),
           "machine": platform.machine(), "cpu_count": os.cpu_count(),
           "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
           "numpy": numpy.__version__, "scipy": scipy.__version__, "tjac": tjac.__version__,
           "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        import zarr
        env["zarr"] = zarr.__version__
    except ImportError:  # pragma: no cover
        pass
    return env


def write(path, payload):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
    with open(os.path.join(os.path.dirname(path), "environment.json"), "w") as f:
        json.dump(environment(), f, indent=2, sort_keys=True)
