"""The tasks vectorised with ``torch.func.vmap``: one batched call fills a GPU."""

from __future__ import annotations

from functools import partial

from torch import nn
from torch.func import vmap

from fewshot.algorithms.base import TaskFunction
from fewshot.core.episode import Episodes
from fewshot.core.inner_loop import TaskResult
from fewshot.execution.base import Differentiable, Executor


def _one_task(task: TaskFunction, model: nn.Module, differentiable: Differentiable, *tensors):
    return task(model, differentiable, tensors)


class Vmap(Executor):
    """Vectorise the per-task function over the tasks.

    Args:
        chunk_size: vectorise this many tasks at a time (bounds the memory of the vectorised
            computation, not of the graph kept for the backward pass); ``None``: all at once.
    """

    def __init__(self, chunk_size: int | None = None) -> None:
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                       or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive number of tasks or None, got {chunk_size!r}")
        self.chunk_size = chunk_size

    def run(self, task: TaskFunction, model: nn.Module, differentiable: Differentiable,
            episodes: Episodes, recomputing: bool = False) -> TaskResult:
        per_task = partial(_one_task, task, model, differentiable)
        return TaskResult(*vmap(per_task, chunk_size=self.chunk_size)(*episodes))
