"""Measured memory of a replay: the peak extra bytes of one block step, as a function of its width.

:func:`tjac.problem.memory_estimate` counts the stored states and the block's tangents; the model's
own intermediates of a step (activations of each layer for the batch, the HVP's saved tensors, for
every vector of the block) depend on the architecture and the backend and are measured instead.
:func:`measure_activation` runs one JVP step of the training run at two block widths and records
the peak memory it took beyond what was live before it; :meth:`ActivationEstimate.at` extrapolates
linearly in the width (a step's intermediates are a fixed part plus one part per vector).

How the peak is read: on CUDA, the caching allocator's peak (``torch.cuda.max_memory_allocated``
after a reset). On the CPU torch keeps no allocator statistics and ``tracemalloc`` does not see its
allocations, so the process's own resident high-water mark is used: freed heap memory is returned
to the system first (glibc ``malloc_trim``), the high-water mark is reset (``/proc/self/clear_refs``)
and VmHWM - VmRSS is read after the step. That is what a run's RSS really grows by, the quantity
the plan has to hold. Where either is unavailable (not Linux/glibc), nothing is measured (None).
A side effect: the process's own high-water mark (VmHWM, ``getrusage``'s ``ru_maxrss``) restarts
from the measurement; read it before :meth:`~tjac.TrainingJacobian.check` if you need it.

The hook: :meth:`tjac.TrainingJacobian.measure_activation` (called by
:meth:`~tjac.TrainingJacobian.check`) stores the estimate on the problem, and from then on
:func:`tjac.problem.memory_estimate`/:func:`~tjac.problem.check_fits` (and the run's plans) count
it; an autotune may call :func:`measure_activation` with its trajectory the same way.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

WIDTHS = (2, 8)  # block widths measured (clipped to P)


@dataclass(frozen=True)
class ActivationEstimate:
    """Peak extra bytes of one replay step at the measured ``widths`` (``bytes``), and the line
    ``fixed + per_vector * width`` through them (``per_vector`` >= 0)."""

    widths: tuple
    bytes: tuple
    fixed: int
    per_vector: int
    method: str

    def at(self, width: int) -> int:
        """Bytes one step of ``width`` vectors is expected to take at its peak."""
        return max(0, int(self.fixed + self.per_vector * width))

    def as_dict(self) -> dict:
        return {"widths": list(self.widths), "bytes": list(self.bytes), "fixed": self.fixed,
                "per_vector": self.per_vector, "method": self.method}


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _libc():
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name)
        lib.malloc_trim  # noqa: B018 (glibc only)
        return lib
    except (OSError, AttributeError, TypeError):
        return None


def cpu_peak_bytes(fn) -> int | None:
    """Peak resident bytes ``fn()`` adds to this process (see the module doc); None where the
    high-water mark cannot be reset or read."""
    lib = _libc()
    if lib is None or _status_kib("VmHWM") is None:
        return None
    lib.malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        return None
    before = _status_kib("VmRSS")
    fn()
    return max(0, (_status_kib("VmHWM") - before) * 1024)


def peak_bytes(fn, device) -> int | None:
    """Peak extra bytes of ``fn()`` on ``device`` (CUDA: the allocator's; CPU: resident)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    if device.type == "cpu":
        return cpu_peak_bytes(fn)
    return None


def measure_activation(replay, P: int, *, dtype, device, widths=WIDTHS) -> ActivationEstimate | None:
    """Measure one JVP step of ``replay`` (a :mod:`tjac.replay` backend) at ``widths`` and fit the
    line (see the module doc). None when the peak cannot be read here."""
    widths = tuple(sorted({max(1, min(P, int(w))) for w in widths}))
    gen = torch.Generator().manual_seed(0)

    def step(k):
        V = torch.randn(k, P, generator=gen, dtype=torch.float64).to(device, dtype)
        return peak_bytes(lambda: replay.jvp(V, steps=1), device)

    step(widths[0])  # warm-up: one-off allocations (thread pools, caches) are not per step
    got = [step(k) for k in widths]
    if any(b is None for b in got):
        log.info("activation memory not measured: no peak memory reading on %s", device)
        return None
    if len(widths) == 1:
        per, fixed = got[0] // widths[0], 0
    else:
        per = max(0, (got[-1] - got[0]) // (widths[-1] - widths[0]))
        fixed = max(0, got[-1] - per * widths[-1])
    est = ActivationEstimate(widths, tuple(got), int(fixed), int(per),
                             "cuda allocator peak" if torch.device(device).type == "cuda"
                             else "resident high-water mark")
    log.info("activation memory of one step: %s bytes at widths %s (%d + %d per vector)",
             got, widths, fixed, per)
    return est
