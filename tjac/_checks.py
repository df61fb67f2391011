"""Input validation shared by every entry point. Messages state the rule that was broken."""

from __future__ import annotations

import contextlib
import numbers


def one_of(what: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; expected one of {', '.join(map(repr, allowed))}")


def positive_int(what: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"`{what}` must be a positive integer, got {value!r}")


def positive_float(what: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise ValueError(f"`{what}` must be a positive number, got {value!r}")


def k_in_range(k, n: int) -> None:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 0 < k <= n:
        raise ValueError(f"`k` must be an integer satisfying 0 < k <= {n}, got {k!r}")


def resolve_dtype(name):
    import torch

    table = {"float64": torch.float64, "float32": torch.float32}
    if isinstance(name, torch.dtype):
        return name
    one_of("dtype", name, tuple(table))
    return table[name]


@contextlib.contextmanager
def seeded_construction(seed: int, dtype):
    """Build a module under ``torch.manual_seed(seed)`` in a forked RNG (the caller's RNG state is
    untouched) with ``dtype`` (a torch dtype or its name) as the default floating type."""
    import torch

    old = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        torch.set_default_dtype(resolve_dtype(dtype))
        try:
            yield
        finally:
            torch.set_default_dtype(old)


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available on this machine")
    return dev


def available_bytes(device) -> int | None:
    """Memory free for new allocations on ``device``: MemAvailable (Linux /proc/meminfo) for the
    CPU, ``torch.cuda.mem_get_info`` for CUDA; None when unknown (then nothing is refused)."""
    import os

    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None
