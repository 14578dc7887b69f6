"""Peak memory of a piece of work, on CUDA (the caching allocator's own count) or on the CPU.

CPU: the process's peak resident set (``VmHWM``) is reset through ``/proc/self/clear_refs``
after ``malloc_trim`` has returned freed heap pages to the system, so the figure is the growth
of the resident set during the work, in MiB. Linux only; elsewhere the figure is ``None``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
from collections.abc import Callable
from typing import Any

import torch

MiB = 2**20


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _trim_heap() -> None:
    name = ctypes.util.find_library("c")
    if name:
        with contextlib.suppress(OSError, AttributeError):  # not glibc
            ctypes.CDLL(name).malloc_trim(0)


def peak_memory_mib(work: Callable[[], Any], device: torch.device) -> tuple[Any, float | None]:
    """Run ``work()``; return its result and the peak memory it needed in MiB.

    CUDA: ``torch.cuda.max_memory_allocated`` during the call (everything allocated, inputs
    and weights included). CPU: the growth of the resident set (``None`` where unmeasurable).
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = work()
        torch.cuda.synchronize(device)
        return result, torch.cuda.max_memory_allocated(device) / MiB
    try:
        _trim_heap()
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # resets VmHWM to the current resident set
        before = _status_kib("VmRSS")
    except OSError:
        return work(), None
    result = work()
    return result, (_status_kib("VmHWM") - before) / 1024
