"""What an executor is: how the tasks of a meta-batch run. Values and gradients never depend
on it; speed and memory do.

An executor takes a per-task function (from an algorithm, :mod:`fewshot.algorithms`), the
module it calls, the differentiable inputs (network parameters, the algorithm's own
parameters) and a meta-batch, and returns the per-task results stacked over the tasks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fewshot.algorithms.base import Params, TaskFunction
from fewshot.core.episode import Episodes
from fewshot.core.inner_loop import TaskResult
from fewshot.core.settings import Settings

Differentiable = tuple[Params, Params]


class Executor(Settings):
    """Runs a per-task function over a meta-batch (subclass and override :meth:`run`)."""

    #: Whether the tasks it runs should recompute their inner steps in the backward pass.
    checkpoint_inner_steps: bool = False

    def run(self, task: TaskFunction, model: nn.Module, differentiable: Differentiable,
            episodes: Episodes, recomputing: bool = False) -> TaskResult:
        """``task(model, differentiable, one task)`` for every task, stacked: ``[T, ...]``.

        ``recomputing``: the call is itself recomputed in a backward pass (memory budgets,
        recomputed inner steps), where per-thread state must stay in this thread.
        """
        raise NotImplementedError

    def describe(self, device: torch.device, images_per_task: int) -> str:
        """The strategy this executor runs for such tasks on ``device``, in one word."""
        return type(self).__name__.lower()


def _join(parts: Sequence[TaskResult], combine) -> TaskResult:
    """Every tensor of ``parts`` combined field by field with ``combine`` (stack or cat)."""
    def field(get) -> Tensor:
        return combine([get(part) for part in parts])

    first = parts[0]
    return TaskResult(
        field(lambda r: r.objective), field(lambda r: r.losses), field(lambda r: r.accuracies),
        {k: field(lambda r, k=k: r.diagnostics[k]) for k in first.diagnostics},
        {k: field(lambda r, k=k: r.batch_norm_statistics[k]) for k in first.batch_norm_statistics})


def stack_results(results: Sequence[TaskResult]) -> TaskResult:
    """Per-task results stacked over a new leading task dimension."""
    return _join(results, torch.stack)


def concatenate_results(parts: Sequence[TaskResult]) -> TaskResult:
    """Stacked results of consecutive chunks of tasks, joined."""
    return _join(parts, torch.cat)


def task_tensors(episodes: Episodes, start: int, stop: int) -> Episodes:
    return Episodes(*(t[start:stop] for t in episodes))


def inputs_need_gradients(model: nn.Module, differentiable: Differentiable,
                          episodes: Episodes) -> bool:
    """Whether gradients must reach something besides ``differentiable``: the images, or
    module parameters left out of the parameter dict (worker threads pass neither)."""
    params = differentiable[0]
    return (any(t.requires_grad for t in episodes)
            or any(p.requires_grad and name not in params for name, p in model.named_parameters()))
