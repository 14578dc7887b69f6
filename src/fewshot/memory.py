"""Bounding a meta-step's memory: recompute instead of store, and chunk sizes from a budget.

Second-order MAML keeps the graph of every inner step of every task until the meta-backward:
memory grows with tasks x steps. Two ways to keep less, both exact (the recomputation repeats
the same operations on the same values):

- **Inner-step checkpointing** (``checkpoint_inner_steps``): each inner step keeps only its
  inputs (the parameters, learning rates and inner-optimizer state); the backward pass runs the
  step again to get its graph. Memory per step falls from a step's activations to one copy of
  the parameters, at the cost of running each inner step twice.
- **A memory budget** (``memory_budget``): the meta-batch runs in chunks of tasks, each chunk
  recomputed in the backward pass, so only one chunk's graph is alive at a time. The chunk is
  the largest the budget holds, from the peak memory of two tasks, measured once per
  configuration (:func:`measured_chunk_size`).

``torch.utils.checkpoint`` cannot do either: its non-reentrant form relies on saved-tensor
hooks, which ``torch.func.grad`` refuses ("don't yet support saved tensor hooks"), and its
reentrant form refuses ``torch.autograd.grad`` and, lacking ``setup_context``, ``vmap``.
:func:`recompute` is a ``torch.autograd.Function`` whose backward is ``torch.func.vjp`` of the
recomputed function, with a generated vmap rule: it works in the per-task loop and under vmap.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.func import vjp
from torch.utils import _pytree as pytree

# The share of the budget that chunks may fill: the two-task measurement is not the whole
# story. On CPUs the resident set also holds the heap's fragmentation (conv4 on Omniglot, 32
# tasks: 565 MiB resident at a 512 MiB budget filled to 90%), hence a wider margin there.
MARGIN = 0.9
CPU_MARGIN = 0.7


class _Recompute(torch.autograd.Function):
    """``fn(differentiable, constant) -> outputs`` without storing its graph."""

    generate_vmap_rule = True

    @staticmethod
    def forward(fn: Callable, n_differentiable: int, *tensors: Tensor) -> tuple[Tensor, ...]:
        return fn(tensors[:n_differentiable], tensors[n_differentiable:])

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        fn, n_differentiable, *tensors = inputs
        ctx.fn, ctx.n_differentiable = fn, n_differentiable
        ctx.save_for_backward(*tensors)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Tensor | None) -> tuple[Tensor | None, ...]:
        tensors = ctx.saved_tensors
        differentiable, constant = tensors[: ctx.n_differentiable], tensors[ctx.n_differentiable:]
        with torch.enable_grad():
            outputs, pullback = vjp(lambda *d: ctx.fn(d, constant), *differentiable)
        cotangents = tuple(torch.zeros_like(o) if g is None else g
                           for o, g in zip(outputs, grad_outputs, strict=True))
        return (None, None, *pullback(cotangents), *(None,) * len(constant))


def recompute(fn: Callable[[Any, Any], Any], differentiable: Any, constant: Any) -> Any:
    """``fn(differentiable, constant)``, keeping only its inputs for the backward pass.

    ``differentiable`` and ``constant`` are pytrees (dicts, tuples, ...) of tensors and plain
    values; gradients flow to the floating-point tensors of ``differentiable``, never to
    ``constant`` (data, labels). ``fn`` must return a pytree whose leaves are all tensors and be
    pure: the backward pass calls it again. Autocast settings are the same in both calls.
    """
    leaves, spec = pytree.tree_flatten((differentiable, constant))
    n_differentiable = len(pytree.tree_flatten(differentiable)[0])
    slots = [i for i, leaf in enumerate(leaves) if isinstance(leaf, Tensor)]
    # Gradients go to floating tensors of ``differentiable``; every other tensor rides along.
    moving = [i for i in slots if i < n_differentiable and leaves[i].is_floating_point()]
    riding = [i for i in slots if i not in moving]
    tensors = [leaves[i] for i in moving + riding]
    template = [None if i in slots else leaf for i, leaf in enumerate(leaves)]  # no tensors held
    device = tensors[0].device.type if tensors else "cpu"
    autocast_on, autocast_dtype = torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)
    output_spec: list[pytree.TreeSpec] = []

    def flat(moving_values: tuple[Tensor, ...], riding_values: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        filled = list(template)
        for i, value in zip(moving + riding, moving_values + riding_values, strict=True):
            filled[i] = value
        with torch.autocast(device, dtype=autocast_dtype, enabled=autocast_on):
            out = fn(*pytree.tree_unflatten(filled, spec))
        out_leaves, out_spec = pytree.tree_flatten(out)
        output_spec[:] = [out_spec]
        return tuple(out_leaves)

    outputs = _Recompute.apply(flat, len(moving), *tensors)
    return pytree.tree_unflatten(list(outputs), output_spec[0])


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
