"""FLOPs of a piece of work and the machine's float32 matmul peak, for benchmarks/meta_step.py.

FLOPs are counted by :class:`torch.utils.flop_counter.FlopCounterMode`: matrix products and
convolutions (forward, backward and double backward), which is where a conv4 meta-step's
arithmetic is; element-wise work (batch norm, ReLU, pooling, the inner update) is not counted,
so achieved GFLOP/s is a lower bound on the arithmetic done. The mode is per thread: work that
moves to worker threads must be counted on its single-threaded equivalent.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode


def count_flops(work: Callable[[], Any]) -> int:
    """Floating-point operations of the matmuls and convolutions ``work()`` runs."""
    with FlopCounterMode(display=False) as counter:
        work()
    return counter.get_total_flops()


def matmul_peak_gflops(size: int = 2048, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """Best GFLOP/s of a ``size x size`` matmul on this thread's intra-op threads (the
    machine's practical float32 peak for the threads the benchmark uses)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9
