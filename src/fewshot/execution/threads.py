"""A meta-batch's tasks on worker threads, one CPU core each.

On a CPU, PyTorch splits every operation across its intra-op threads, and the operations of
one few-shot task are too small to split well: conv4 on Omniglot (5 images a layer) runs its
second-order meta-step only about 1.5x faster on two cores than on one. The tasks of a
meta-batch are independent, so the cores can take whole tasks instead: each worker thread runs
its share of the tasks with one intra-op thread, their forward passes and inner loops when the
meta-batch runs, and the backward pass of its own tasks' graphs when the meta-loss is
differentiated (a ``torch.autograd.Function`` hands each worker its slice of the incoming
gradient). PyTorch's kernels release the GIL, so the workers compute in parallel.

Values and gradients are those of the per-task loop: every task runs the same operations on
the same values; only the sum over tasks is added in another order.

``torch.func.functional_call`` writes the parameters it is given into the module while it runs,
so two threads must not share one module: every worker calls a copy of the model's module tree
of its own that shares the parameter and buffer tensors (:func:`shallow_module_copy`).

Thread-local settings do not follow a computation into a worker, so the caller must not need
them there: :func:`tasks_on_threads_supported` is false under ``torch.func`` transforms,
autocast, function and dispatch modes and saved-tensor hooks, which then use the loop. Context
variables (the inner-step context of :mod:`fewshot.core.step_context`) are copied into the
workers. The meta-gradient is computed once: differentiating it again (``create_graph=True``)
or a second backward pass through the same meta-batch is refused by name (the loop does both).
"""

from __future__ import annotations

import contextvars
import copy
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from fewshot.algorithms.base import TaskFunction
from fewshot.core.episode import Episodes
from fewshot.core.inner_loop import TaskResult
from fewshot.core.transforms import inside_functorch_transform
from fewshot.execution.base import Differentiable, Executor, inputs_need_gradients
from fewshot.execution.loop import Loop

# ``(model, differentiable, task) -> result``: a pytree of tensors whose first leaf (the
# losses) is the only one differentiated.
TaskRunner = Callable[[nn.Module, Any, Sequence[Tensor]], Any]

# One pool per size, never shut down: a graph waiting for its backward pass keeps using the
# pool that built it, whatever ran in between.
_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()
_single_threaded_workers = True  # False where set_num_threads is process-wide (no OpenMP)


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
    global _single_threaded_workers
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
            # threaded, and tasks stay in the caller's thread (tasks_on_threads_supported).
            torch.set_num_threads(intra_op)
            _single_threaded_workers = _single_threaded_workers and own_threads == [1] * workers \
                and torch.get_num_threads() == intra_op
            _pools[workers] = pool
        return _pools[workers]


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


def default_workers() -> int:
    """One worker per intra-op thread the caller has (``torch.get_num_threads()``)."""
    return torch.get_num_threads()


def _thread_local_state_in_use() -> bool:
    """Per-thread settings the workers would not see: torch.func transforms, autocast,
    function or dispatch modes (``with torch.device(...)``, FLOP counters, ...), saved-tensor
    hooks."""
    return (inside_functorch_transform() or torch.is_autocast_enabled("cpu")
            or torch._C._len_torch_function_stack() > 0
            or torch._C._len_torch_dispatch_stack() > 0
            or torch._C._autograd._top_saved_tensors_default_hooks(False) is not None)


def tasks_on_threads_supported(device: torch.device, tasks: int | None = None) -> bool:
    """Whether tasks should move to worker threads here: a CPU with more than one intra-op
    thread, at least as many ``tasks`` as threads (else cores would idle), and no per-thread
    state around the call that the workers would miss (:func:`_thread_local_state_in_use`)."""
    workers = default_workers()
    return (device.type == "cpu" and workers > 1 and (tasks is None or tasks >= workers)
            and _single_threaded_workers and not _thread_local_state_in_use())


def _split(tasks: int, parts: int) -> list[range]:
    """``range(tasks)`` in ``parts`` contiguous, nearly equal pieces."""
    bounds = [tasks * i // parts for i in range(parts + 1)]
    return [range(bounds[i], bounds[i + 1]) for i in range(parts)]


class _TasksOnThreads(torch.autograd.Function):
    """Outputs of the workers' tasks; the backward pass runs in the workers too."""

    @staticmethod
    def forward(ctx: Any, run: Callable, pool: ThreadPoolExecutor, *inputs: Tensor) -> tuple[Tensor, ...]:
        outputs, ctx.graphs = run(inputs)
        ctx.pool, ctx.n_inputs = pool, len(inputs)
        ctx.mark_non_differentiable(*outputs[1:])
        return outputs

    @staticmethod
    def backward(ctx: Any, grad_losses: Tensor, *_: Tensor | None) -> tuple[Tensor | None, ...]:
        if torch.is_grad_enabled():
            raise RuntimeError(
                "the meta-gradient of tasks run on worker threads cannot be differentiated again "
                "(create_graph=True): use the Loop executor (fewshot.execution.Loop)")
        if ctx.graphs is None:
            raise RuntimeError("trying to backward through the tasks run on worker threads a second "
                               "time: their graphs are freed after the first backward")
        graphs, ctx.graphs = ctx.graphs, None

        def backward_of(graph: tuple[Tensor, list[Tensor | None], range]) -> list[Tensor | None]:
            losses, leaves, rows = graph
            wanted = [leaf for leaf in leaves if leaf is not None]
            grads = iter(torch.autograd.grad(losses, wanted, grad_losses[rows.start:rows.stop],
                                             allow_unused=True) if wanted else ())
            return [None if leaf is None else next(grads) for leaf in leaves]

        totals: list[Tensor | None] = [None] * ctx.n_inputs
        for grads in ctx.pool.map(backward_of, graphs):
            for i, g in enumerate(grads):
                if g is not None:
                    totals[i] = g if totals[i] is None else totals[i] + g
        return (None, None, *totals)


def run_tasks_on_threads(run_task: TaskRunner, model: nn.Module, differentiable: Any,
                         tasks: Sequence[Tensor], workers: int | None = None) -> Any:
    """``run_task(model, differentiable, task)`` for every task, on worker threads, stacked
    over the tasks.

    Args:
        run_task: ``(model, differentiable, task) -> result``; ``model`` is the worker's own
            :func:`shallow_module_copy` of ``model``, ``task`` one slice of each tensor in
            ``tasks``; the result a pytree of tensors whose first leaf (the losses) is the only
            one differentiated.
        model: the module the tasks call (through ``torch.func.functional_call``).
        differentiable: a pytree (parameters, learning rates); gradients of the losses reach
            its floating-point tensors that require them, as if the tasks had run here.
        tasks: tensors with the task dimension first (an :class:`~fewshot.episode.Episodes`).
        workers: threads to use (default: :func:`default_workers`), at most one per task.

    Returns:
        The pytree of ``run_task`` with every leaf stacked over the tasks (dimension 0).
    """
    count = tasks[0].shape[0]
    if count == 0:
        raise ValueError("run_tasks_on_threads needs at least one task")
    pool = worker_pool(workers or default_workers())
    workers = min(workers or default_workers(), count)
    leaves, spec = pytree.tree_flatten(differentiable)
    slots = [i for i, leaf in enumerate(leaves)
             if isinstance(leaf, Tensor) and leaf.is_floating_point()]
    inputs = [leaves[i] for i in slots]
    build_graph = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
    output_spec: list[pytree.TreeSpec] = []

    def work(rows: range, values: Sequence[Tensor]):
        with torch.set_grad_enabled(build_graph):
            # The worker's own leaves, so that its backward pass stays within its own graph.
            own = [v.detach().requires_grad_(v.requires_grad) for v in values] if build_graph \
                else list(values)
            filled = list(leaves)
            for slot, value in zip(slots, own, strict=True):
                filled[slot] = value
            mine = pytree.tree_unflatten(filled, spec)
            own_model = shallow_module_copy(model)
            results = [run_task(own_model, mine, [t[r] for t in tasks]) for r in rows]
        flat = [pytree.tree_flatten(result) for result in results]
        if any(f[1] != flat[0][1] for f in flat) or output_spec and output_spec[0] != flat[0][1]:
            raise ValueError("every task must return results of the same structure")
        output_spec[:] = [flat[0][1]]
        stacked = [torch.stack(column) for column in zip(*(f[0] for f in flat), strict=True)]
        return stacked, (stacked[0], [o if o.requires_grad else None for o in own], rows)

    def run(values: Sequence[Tensor]):
        pieces = [pool.submit(contextvars.copy_context().run, work, rows, values)
                  for rows in _split(count, workers)]
        parts = [piece.result() for piece in pieces]
        outputs = tuple(torch.cat([p[0][i].detach() for p in parts])
                        for i in range(len(parts[0][0])))
        return outputs, [p[1] for p in parts]

    if build_graph:
        outputs = _TasksOnThreads.apply(run, pool, *inputs)
    else:
        outputs, _ = run(inputs)
    return pytree.tree_unflatten(list(outputs), output_spec[0])


class Threads(Executor):
    """Spread the tasks over CPU worker threads, one intra-op thread each (see the module
    docstring). Gives way to the loop where it cannot run or would leave cores idle: off the
    CPU, fewer tasks than threads, per-thread state around the call (``torch.func``
    transforms, autocast, dispatch modes, saved-tensor hooks), inside a recomputation, or
    where gradients must reach images or parameters outside the parameter dict.

    Args:
        workers: threads to use (default: one per intra-op thread, ``torch.get_num_threads()``).
    """

    def __init__(self, workers: int | None = None) -> None:
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int)
                                    or workers < 1):
            raise ValueError(f"workers must be a positive integer or None, got {workers!r}")
        self.workers = workers

    def can_run(self, model: nn.Module, differentiable: Differentiable, episodes: Episodes,
                recomputing: bool = False) -> bool:
        return (not recomputing and not inputs_need_gradients(model, differentiable, episodes)
                and tasks_on_threads_supported(episodes.support_x.device, episodes.num_tasks))

    def run(self, task: TaskFunction, model: nn.Module, differentiable: Differentiable,
            episodes: Episodes, recomputing: bool = False) -> TaskResult:
        if not self.can_run(model, differentiable, episodes, recomputing):
            return Loop().run(task, model, differentiable, episodes, recomputing)
        return run_tasks_on_threads(task, model, differentiable, episodes, self.workers)

    def describe(self, device: torch.device, images_per_task: int) -> str:
        return "threads" if device.type == "cpu" and default_workers() > 1 else "loop"
