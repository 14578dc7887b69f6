"""The tasks one after another: the reference every other executor is tested against."""

from __future__ import annotations

from torch import nn

from fewshot.algorithms.base import TaskFunction
from fewshot.core.episode import Episodes
from fewshot.core.inner_loop import TaskResult
from fewshot.execution.base import Differentiable, Executor, stack_results


class Loop(Executor):
    """Run each task of the meta-batch in turn (PyTorch's intra-op threads split each op)."""

    def run(self, task: TaskFunction, model: nn.Module, differentiable: Differentiable,
            episodes: Episodes, recomputing: bool = False) -> TaskResult:
        return stack_results([task(model, differentiable, one) for one in zip(*episodes, strict=True)])
