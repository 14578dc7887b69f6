"""A meta-batch's tasks on worker threads, one CPU core each, each task's backward pass at once.

On a CPU, PyTorch splits every operation across its intra-op threads, and the operations of
one few-shot task are too small to split well: conv4 on Omniglot (5 images a layer) runs its
second-order meta-step only about 1.5x faster on two cores than on one. The tasks of a
meta-batch are independent, so the cores can take whole tasks instead: each worker thread runs
its share of the tasks with one intra-op thread (:mod:`fewshot.execution.worker_pool`).
PyTorch's kernels release the GIL, so the workers compute in parallel.

Memory like a per-task loop: a worker differentiates each task's objective as soon as the task
has run, adds the gradient to its share's sum and drops the task's graph, so one task's graph
per worker is alive at a time, not the meta-batch's. That backward pass needs the gradient of
the meta-loss with respect to the task's objective before the meta-loss exists, so it uses a
prediction: the direction seen in the previous backward pass of the same algorithm and
objective shape (at first: the last entry alone, plain MAML's). When the meta-loss is
differentiated, each worker's sum is scaled by the one factor that makes its prediction equal
the true gradient (the mean over tasks, a DDP share or a loss scale are such factors); where
no factor does (tasks weighted unequally, a new multi-step weighting), that worker's tasks run
again and are differentiated with the true gradient. Either way the meta-gradient is exact for
any meta-loss; a wrong prediction costs one more forward pass of the tasks concerned. Like the
recomputing executors (:mod:`fewshot.execution.memory_budget`), that rerun assumes a task
computes the same values twice (no random draws inside a task).

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
import threading
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from fewshot.algorithms.base import TaskFunction
from fewshot.core.episode import Episodes
from fewshot.core.inner_loop import TaskResult
from fewshot.core.transforms import inside_functorch_transform
from fewshot.execution.base import Differentiable, Executor, inputs_need_gradients
from fewshot.execution.loop import Loop
from fewshot.execution.worker_pool import (
    default_workers,
    shallow_module_copy,
    split,
    worker_pool,
    workers_are_single_threaded,
)

__all__ = ["Threads", "default_workers", "run_tasks_on_threads", "shallow_module_copy",
           "tasks_on_threads_supported", "worker_pool"]

# ``(model, differentiable, task) -> result``: a pytree of tensors whose first leaf (the
# losses) is the only one differentiated.
TaskRunner = Callable[[nn.Module, Any, Sequence[Tensor]], Any]
# ``(task index, its objective) -> the gradient to differentiate it with``.
TaskWeights = Callable[[int, Tensor], Tensor]

# The gradient of the meta-loss with respect to one task's objective, as last seen, by
# (algorithm, objective shape): the prediction each task's immediate backward pass uses.
_last_seen: dict[tuple[int, tuple[int, ...]], Tensor] = {}
_last_seen_lock = threading.Lock()


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
            and workers_are_single_threaded() and not _thread_local_state_in_use())


def _owner(run_task: TaskRunner) -> int:
    """Which algorithm a task function belongs to (the object behind a bound method or a
    ``functools.partial`` of one), for the predictions."""
    function = getattr(run_task, "func", run_task)
    return id(getattr(function, "__self__", function))


def predicted_weights(owner: int, objective: Tensor) -> Tensor:
    """The gradient a task's ``objective`` is differentiated with before the meta-loss
    exists: the last one seen for this algorithm and shape, else the last entry alone."""
    with _last_seen_lock:
        seen = _last_seen.get((owner, tuple(objective.shape)))
    if seen is not None:
        return seen.to(objective)
    weights = torch.zeros_like(objective)
    weights.view(-1)[-1] = 1
    return weights


def scale_between(grads: Tensor, weights: Tensor) -> Tensor | None:
    """``c`` with ``grads[t] == c * weights`` for every task ``t`` (to a few units in the last
    place), or None if there is no such number."""
    grads, weights = grads.detach(), weights.to(grads).expand_as(grads)
    norm = (weights * weights).sum()
    if norm == 0:
        return None
    c = (grads * weights).sum() / norm
    tolerance = 8 * torch.finfo(grads.dtype).eps * grads.abs().max()
    return c if (grads - c * weights).abs().max() <= tolerance else None


class _Share(NamedTuple):
    """What one worker keeps of its tasks after their backward passes."""

    rows: range
    sums: list[Tensor | None]  # per input: its gradient summed over the share's tasks
    weights: Tensor | None  # the predicted gradient of every task's objective


class _TasksOnThreads(torch.autograd.Function):
    """Outputs of the workers' tasks, already differentiated with predicted weights; the
    backward pass scales the workers' sums, or reruns the tasks whose prediction was off."""

    @staticmethod
    def forward(ctx: Any, run: Callable, *inputs: Tensor) -> tuple[Tensor, ...]:
        outputs, ctx.shares, ctx.rerun = run(inputs)
        ctx.n_inputs = len(inputs)
        ctx.mark_non_differentiable(*outputs[1:])
        return outputs

    @staticmethod
    def backward(ctx: Any, grad_losses: Tensor, *_: Tensor | None) -> tuple[Tensor | None, ...]:
        if torch.is_grad_enabled():
            raise RuntimeError(
                "the meta-gradient of tasks run on worker threads cannot be differentiated again "
                "(create_graph=True): use the Loop executor (fewshot.execution.Loop)")
        if ctx.shares is None:
            raise RuntimeError("trying to backward through the tasks run on worker threads a second "
                               "time: their graphs are freed after the first backward")
        shares, ctx.shares = ctx.shares, None
        totals: list[Tensor | None] = [None] * ctx.n_inputs

        def add(sums: Sequence[Tensor | None], scale: Tensor | float = 1.0) -> None:
            for i, g in enumerate(sums):
                if g is not None:
                    totals[i] = g * scale if totals[i] is None else totals[i] + g * scale

        wrong = []
        for share in shares:
            if share.weights is None:  # none of its tasks' objectives needed a gradient
                continue
            scale = scale_between(grad_losses[share.rows.start:share.rows.stop], share.weights)
            if scale is None:
                wrong.append(share.rows)
            else:
                add(share.sums, scale)
        for sums in ctx.rerun(wrong, grad_losses):
            add(sums)
        ctx.rerun = None
        return (None, *totals)


def _channels_last(t: Tensor) -> Tensor:
    """``t`` in oneDNN's preferred layout if it is a 4-d floating-point tensor (a convolution's
    weight, a batch of images): the same values, other strides."""
    if t.dim() == 4 and t.is_floating_point():
        return t.contiguous(memory_format=torch.channels_last)
    return t


def run_tasks_on_threads(run_task: TaskRunner, model: nn.Module, differentiable: Any,
                         tasks: Sequence[Tensor], workers: int | None = None,
                         channels_last: bool = False) -> Any:
    """``run_task(model, differentiable, task)`` for every task, on worker threads, stacked
    over the tasks; each task differentiated as soon as it has run (see the module docstring).

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
        channels_last: hand the tasks their 4-d tensors (convolution weights, images) in
            channels-last layout (same values; see :class:`Threads`).

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
    owner = _owner(run_task)

    def work(rows: range, values: Sequence[Tensor], weights_of: TaskWeights | None):
        """The share's tasks; with ``weights_of``, each differentiated at once with them."""
        with torch.set_grad_enabled(build_graph):
            # The worker's own leaves, so that its backward pass stays within its own graph.
            own = [v.detach().requires_grad_(v.requires_grad) for v in values] if build_graph \
                else list(values)
            wanted = [i for i, o in enumerate(own) if build_graph and o.requires_grad]
            layout = _channels_last if channels_last else (lambda t: t)
            filled = list(leaves)
            for slot, value in zip(slots, own, strict=True):
                filled[slot] = layout(value)  # differentiable: gradients reach ``own``
            mine = pytree.tree_unflatten(filled, spec)
            own_model = shallow_module_copy(model)
            sums: list[Tensor | None] = [None] * len(own)
            used, columns = None, []
            for r in rows:
                task = [layout(t[r]) for t in tasks]
                flat, structure = pytree.tree_flatten(run_task(own_model, mine, task))
                if output_spec and output_spec[0] != structure:
                    raise ValueError("every task must return results of the same structure")
                output_spec[:] = [structure]
                if weights_of is not None and wanted and flat[0].requires_grad:
                    used = weights_of(r, flat[0])
                    grads = torch.autograd.grad(flat[0], [own[i] for i in wanted], used,
                                                allow_unused=True)
                    for i, g in zip(wanted, grads, strict=True):
                        if g is not None:
                            sums[i] = g if sums[i] is None else sums[i] + g
                columns.append([leaf.detach() for leaf in flat])  # the task's graph goes here
        stacked = [torch.stack(column) for column in zip(*columns, strict=True)]
        return stacked, _Share(rows, sums, used)

    def predicted(_: int, objective: Tensor) -> Tensor:
        return predicted_weights(owner, objective)

    def run(values: Sequence[Tensor]):
        context = contextvars.copy_context()
        pieces = [pool.submit(context.copy().run, work, rows, values,
                              predicted if build_graph else None)
                  for rows in split(count, workers)]
        parts = [piece.result() for piece in pieces]
        outputs = tuple(torch.cat([p[0][i] for p in parts]) for i in range(len(parts[0][0])))

        def rerun(shares: list[range], grad_losses: Tensor) -> list[list[Tensor | None]]:
            """Gradients of the tasks in ``shares`` for the true ``grad_losses``; then the
            prediction becomes what was seen."""
            if grad_losses[0].any():
                with _last_seen_lock:
                    _last_seen[(owner, tuple(grad_losses.shape[1:]))] = grad_losses[0].detach().clone()
            again = [pool.submit(context.copy().run, work, rows, values,
                                 lambda r, _: grad_losses[r]) for rows in shares]
            return [piece.result()[1].sums for piece in again]

        return outputs, [p[1] for p in parts], rerun

    if build_graph:
        outputs = _TasksOnThreads.apply(run, *inputs)
    else:
        outputs, _, _ = run(inputs)
    return pytree.tree_unflatten(list(outputs), output_spec[0])


class Threads(Executor):
    """Spread the tasks over CPU worker threads, one intra-op thread each (see the module
    docstring). Gives way to the loop where it cannot run or would leave cores idle: off the
    CPU, fewer tasks than threads, per-thread state around the call (``torch.func``
    transforms, autocast, dispatch modes, saved-tensor hooks), inside a recomputation, or
    where gradients must reach images or parameters outside the parameter dict.

    Args:
        workers: threads to use (default: one per intra-op thread, ``torch.get_num_threads()``).
        channels_last: run every task with its convolution weights and images in channels-last
            layout, the one oneDNN's CPU kernels work in: the same values and gradients (float64
            tests). Off by default: measured on 2 cores (benchmarks/meta_step.py, one run each)
            it was 9% faster on Omniglot 5w1s with 1 query per class, no faster with 15, and
            15% slower on mini-ImageNet 5w5s.
    """

    def __init__(self, workers: int | None = None, channels_last: bool = False) -> None:
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int)
                                    or workers < 1):
            raise ValueError(f"workers must be a positive integer or None, got {workers!r}")
        if not isinstance(channels_last, bool):
            raise ValueError(f"channels_last must be true or false, got {channels_last!r}")
        self.workers, self.channels_last = workers, channels_last

    def can_run(self, model: nn.Module, differentiable: Differentiable, episodes: Episodes,
                recomputing: bool = False) -> bool:
        return (not recomputing and not inputs_need_gradients(model, differentiable, episodes)
                and tasks_on_threads_supported(episodes.support_x.device, episodes.num_tasks))

    def run(self, task: TaskFunction, model: nn.Module, differentiable: Differentiable,
            episodes: Episodes, recomputing: bool = False) -> TaskResult:
        if not self.can_run(model, differentiable, episodes, recomputing):
            return Loop().run(task, model, differentiable, episodes, recomputing)
        return run_tasks_on_threads(task, model, differentiable, episodes, self.workers,
                                    self.channels_last)

    def describe(self, device: torch.device, images_per_task: int) -> str:
        return "threads" if device.type == "cpu" and default_workers() > 1 else "loop"
