"""Bounding a meta-step's memory: recompute instead of store.

Second-order MAML keeps the graph of every inner step of every task until the meta-backward:
memory grows with tasks x steps. Two executors keep less, both exact (the recomputation
repeats the same operations on the same values, :func:`fewshot.core.recompute.recompute`):

- :class:`RecomputeInnerSteps`: each inner step keeps only its inputs (the parameters,
  learning rates and inner-optimizer state); the backward pass runs the step again to get its
  graph. Memory per step falls from a step's activations to one copy of the parameters, at
  the cost of running each inner step twice.
- :class:`MemoryBudget`: the meta-batch runs in chunks of tasks, each chunk recomputed in the
  backward pass, so only one chunk's graph is alive at a time. The chunk is the largest the
  budget holds, from the peak memory of two tasks, measured once per configuration
  (:func:`measured_chunk_size`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn

from fewshot.algorithms.base import TaskFunction
from fewshot.core.episode import Episodes
from fewshot.core.inner_loop import TaskResult
from fewshot.core.recompute import recompute
from fewshot.execution.auto import Auto
from fewshot.execution.base import Differentiable, Executor, concatenate_results, task_tensors

# The share of the budget that chunks may fill: the two-task measurement is not the whole
# story. On CPUs the resident set also holds the heap's fragmentation (conv4 on Omniglot, 32
# tasks: 565 MiB resident at a 512 MiB budget filled to 90%), hence a wider margin there.
MARGIN = 0.9
CPU_MARGIN = 0.7


# -- chunk size from a memory budget ---------------------------------------------------------

def chunk_size_for_budget(budget_bytes: float, per_task_bytes: float, tasks: int,
                          margin: float = MARGIN) -> int:
    """The most tasks one recomputed chunk may hold: ``margin * budget / per task``, at most
    ``tasks``. Raises if not even one task fits."""
    if per_task_bytes <= 0:
        return tasks
    chunk = math.floor(margin * budget_bytes / per_task_bytes)
    if chunk < 1:
        raise MemoryError(
            f"memory_budget of {budget_bytes / 2**30:.3g} GiB cannot hold one task, which needs "
            f"about {per_task_bytes / 2**30:.3g} GiB (with a {1 - margin:.0%} margin): raise "
            "the budget, or use checkpoint_inner_steps to make each task smaller")
    return min(chunk, tasks)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def peak_bytes(work: Callable[[], Any], device: torch.device) -> float | None:
    """Memory ``work()`` needs beyond what is allocated before it, or ``None`` if unknown.

    CUDA: the allocator's peak. CPU (Linux): the growth of the resident set, after returning
    freed heap pages to the system (``malloc_trim``) and resetting the peak (``clear_refs``).
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        work()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    if device.type != "cpu":
        return None
    try:
        libc = ctypes.util.find_library("c")
        if libc:
            ctypes.CDLL(libc).malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # the peak resident set restarts from the current one
        before = _status_kib("VmRSS")
    except (OSError, AttributeError, KeyError):
        return None
    work()
    return (_status_kib("VmHWM") - before) * 1024.0


_PER_TASK_BYTES: dict[tuple, float | None] = {}


def measured_chunk_size(key: tuple, run_tasks: Callable[[int], Any], device: torch.device,
                        budget_bytes: float, tasks: int) -> int:
    """The chunk size for ``budget_bytes`` from the measured peak of ``run_tasks(n)`` (forward
    and backward pass of the first ``n`` tasks), per task, measured on the first call for each
    ``key``, after a warm-up run (first calls allocate one-off caches: kernels, workspaces).

    ``n`` is 2 where possible: a vectorised pair of tasks needs more per task than a single
    task (batched layouts; 1.4x on a CPU for conv4), so one task alone would under-estimate the
    chunks. If two tasks do not fit on the GPU, one does. Where the peak cannot be measured
    (neither CUDA nor a Linux CPU), all tasks run in one chunk.
    """
    if key not in _PER_TASK_BYTES:
        n = min(2, tasks)
        try:
            run_tasks(n)
        except torch.cuda.OutOfMemoryError:
            n = 1
            torch.cuda.empty_cache()
            run_tasks(n)
        peak = peak_bytes(lambda: run_tasks(n), device)
        _PER_TASK_BYTES[key] = None if peak is None else peak / n
    per_task = _PER_TASK_BYTES[key]
    if per_task is None:
        return tasks
    margin = CPU_MARGIN if device.type == "cpu" else MARGIN
    return chunk_size_for_budget(budget_bytes, per_task, tasks, margin)


def _task_key(task: TaskFunction) -> tuple:
    """What identifies a per-task function's work, for the measured-chunk cache."""
    if isinstance(task, partial):
        owner = getattr(task.func, "__self__", None)
        settings = repr(owner.settings()) if hasattr(owner, "settings") else None
        return (task.func.__qualname__, settings, tuple(sorted(task.keywords.items())))
    owner = getattr(task, "__self__", None)
    return (getattr(task, "__qualname__", repr(task)),
            repr(owner.settings()) if hasattr(owner, "settings") else None)


class MemoryBudget(Executor):
    """Run the meta-batch in chunks recomputed in the backward pass, within a memory budget.

    Args:
        budget_gib: memory the meta-step may use beyond what is already allocated, in GiB.
        chunk_size: tasks per recomputed chunk; ``None``: derived from the budget, from the
            peak memory of two tasks measured once per configuration (CUDA; CPU on Linux;
            elsewhere one chunk).
        executor: how each chunk's tasks run (default :class:`~fewshot.execution.auto.Auto`).

    Same values and gradients, about one more forward pass (none when the budget holds all
    tasks at once).
    """

    def __init__(self, budget_gib: float, chunk_size: int | None = None,
                 executor: Executor | None = None) -> None:
        if not budget_gib > 0:
            raise ValueError(f"memory budget_gib must be positive, got {budget_gib}")
        if chunk_size is not None and not chunk_size >= 1:
            raise ValueError(f"chunk_size must be a positive number of tasks or None, got {chunk_size!r}")
        self.budget_gib, self.chunk_size = float(budget_gib), chunk_size
        self.executor = Auto() if executor is None else executor
        self.checkpoint_inner_steps = self.executor.checkpoint_inner_steps

    def run(self, task: TaskFunction, model: nn.Module, differentiable: Differentiable,
            episodes: Episodes, recomputing: bool = False) -> TaskResult:
        def chunk(values: Differentiable, tensors: tuple) -> TaskResult:
            return self.executor.run(task, model, values, Episodes(*tensors), recomputing=True)

        chunk_size = self.chunk_size
        if chunk_size is None:
            def first_tasks(n: int) -> None:  # the forward and backward pass of n tasks
                result = chunk(differentiable, tuple(task_tensors(episodes, 0, n)))
                wanted = [p for p in differentiable[0].values() if p.requires_grad]
                if wanted and result.objective.requires_grad:
                    torch.autograd.grad(result.objective.sum(), wanted, allow_unused=True)

            key = (_task_key(task), repr(self.executor), type(model).__name__,
                   tuple((n, p.shape, p.dtype) for n, p in differentiable[0].items()),
                   tuple(t.shape[1:] for t in episodes), episodes.support_x.device,
                   torch.is_grad_enabled())
            chunk_size = measured_chunk_size(key, first_tasks, episodes.support_x.device,
                                             self.budget_gib * 2**30, episodes.num_tasks)
        if chunk_size >= episodes.num_tasks:  # everything fits: recomputing would only cost time
            return self.executor.run(task, model, differentiable, episodes, recomputing)
        return concatenate_results([
            recompute(chunk, differentiable, tuple(task_tensors(episodes, start, start + chunk_size)))
            for start in range(0, episodes.num_tasks, chunk_size)])

    def describe(self, device: torch.device, images_per_task: int) -> str:
        return f"budget({self.executor.describe(device, images_per_task)})"


class RecomputeInnerSteps(Executor):
    """Run the tasks with ``executor``, each inner step recomputed in the backward pass:
    memory per inner step falls from its activations to one copy of the parameters (peak
    nearly flat in the number of steps), at about one more inner step's compute each.

    Args:
        executor: how the tasks run (default :class:`~fewshot.execution.auto.Auto`; worker
            threads give way to the loop, as recomputation's state is per thread).
    """

    checkpoint_inner_steps = True

    def __init__(self, executor: Executor | None = None) -> None:
        self.executor = Auto() if executor is None else executor

    def run(self, task: TaskFunction, model: nn.Module, differentiable: Differentiable,
            episodes: Episodes, recomputing: bool = False) -> TaskResult:
        return self.executor.run(task, model, differentiable, episodes, recomputing=True)

    def describe(self, device: torch.device, images_per_task: int) -> str:
        return f"recompute({self.executor.describe(device, images_per_task)})"
