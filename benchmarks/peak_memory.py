"""Peak memory of a piece of work in MiB, for the benchmark tables.

A thin shell over :func:`fewshot.execution.memory_budget.peak_bytes` (the measurement the memory budget uses):
on CUDA the table shows the allocator's absolute peak (weights and inputs included), on a Linux
CPU the growth of the resident set; elsewhere ``None``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from fewshot.execution.memory_budget import peak_bytes

MiB = 2**20


def peak_memory_mib(work: Callable[[], Any], device: torch.device) -> tuple[Any, float | None]:
    """Run ``work()``; return its result and the peak memory it needed in MiB."""
    allocated = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    results = []
    peak = peak_bytes(lambda: results.append(work()), device)
    if not results:  # unmeasurable here: peak_bytes did not run the work
        return work(), None
    return results[0], None if peak is None else (peak + allocated) / MiB
