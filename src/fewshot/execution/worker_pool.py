"""Worker threads of one intra-op thread each, and module copies they can call safely.

Used by :mod:`fewshot.execution.threads`. A pool is kept per size for the life of the process
(a forked child starts its own); every worker lowers its own OpenMP thread count to one.
"""

from __future__ import annotations

import copy
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

# One pool per size, never shut down: a graph waiting for its backward pass keeps using the
# pool that built it, whatever ran in between.
_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()
_single_threaded = True  # False where set_num_threads is process-wide (no OpenMP)


def _forget_pools_in_child() -> None:
    # A forked child (a DataLoader worker, say) has none of the parent's threads: it must start
    # its own pools rather than wait on workers that do not exist there.
    global _pools, _pools_lock
    _pools, _pools_lock = {}, threading.Lock()


os.register_at_fork(after_in_child=_forget_pools_in_child)


def _become_single_threaded(started: threading.Barrier) -> int:
    torch.get_num_threads()  # a thread's first call copies the process-wide setting; then:
    torch.set_num_threads(1)  # this thread's own (OpenMP's is per thread)
    started.wait(timeout=60)
    return torch.get_num_threads()


def worker_pool(workers: int) -> ThreadPoolExecutor:
    """A pool of ``workers`` threads, each running with one intra-op thread (one pool per size,
    kept for the life of the process)."""
    global _single_threaded
    with _pools_lock:
        if workers not in _pools:
            intra_op = torch.get_num_threads()
            pool = ThreadPoolExecutor(workers, thread_name_prefix=f"fewshot-tasks-{workers}")
            started = threading.Barrier(workers + 1)
            # Every worker blocks on the barrier, so the pool starts all of them now.
            futures = [pool.submit(_become_single_threaded, started) for _ in range(workers)]
            started.wait(timeout=60)
            own_threads = [future.result() for future in futures]
            # set_num_threads(1) also lowered the process-wide value new threads start from;
            # and without OpenMP it is process-wide only: then workers would not be single-
            # threaded, and tasks stay in the caller's thread (workers_are_single_threaded).
            torch.set_num_threads(intra_op)
            _single_threaded = _single_threaded and own_threads == [1] * workers \
                and torch.get_num_threads() == intra_op
            _pools[workers] = pool
        return _pools[workers]


def workers_are_single_threaded() -> bool:
    """False once a pool found that one thread's setting changes every thread's (no OpenMP)."""
    return _single_threaded


def default_workers() -> int:
    """One worker per intra-op thread the caller has (``torch.get_num_threads()``)."""
    return torch.get_num_threads()


def shallow_module_copy(module: nn.Module) -> nn.Module:
    """``module``'s tree with new module objects and attribute dicts but the same parameter and
    buffer tensors: swapping an attribute of the copy leaves the original alone, while in-place
    updates of the tensors (running statistics, optimizer steps) are seen by both."""
    clone = copy.copy(module)
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    clone._modules = {name: None if child is None else shallow_module_copy(child)
                      for name, child in module._modules.items()}
    return clone


def split(tasks: int, parts: int) -> list[range]:
    """``range(tasks)`` in ``parts`` contiguous, nearly equal pieces."""
    bounds = [tasks * i // parts for i in range(parts + 1)]
    return [range(bounds[i], bounds[i + 1]) for i in range(parts)]
