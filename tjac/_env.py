"""Environment record written beside every benchmark's JSON (also used by ``tjac bench``)."""
import os
import platform
import sys


def environment() -> dict:
    import numpy
    import scipy
    import torch

    from . import __version__

    env = {"python": sys.version.split()[0], "platform": platform.platform(),
           "machine": platform.machine(), "cpu_count": os.cpu_count(),
           "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
           "numpy": numpy.__version__, "scipy": scipy.__version__, "tjac": __version__,
           "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    from .store import zarr_version

    env["zarr"] = zarr_version()
    return env
