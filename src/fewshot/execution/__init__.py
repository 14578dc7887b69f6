"""How the tasks of a meta-batch run: executors, one file each, one registration line each."""

import torch
from torch import Tensor, nn

from fewshot.algorithms.base import Algorithm
from fewshot.core.episode import Episodes
from fewshot.core.inner_loop import TaskResult
from fewshot.core.settings import build_from_settings
from fewshot.execution.auto import Auto
from fewshot.execution.base import Executor
from fewshot.execution.loop import Loop
from fewshot.execution.memory_budget import MemoryBudget, RecomputeInnerSteps
from fewshot.execution.threads import Threads
from fewshot.execution.vmap import Vmap

# The executors a file may name (by import path); looked up, never imported.
EXECUTORS: dict[str, type[Executor]] = {
    f"{cls.__module__}.{cls.__qualname__}": cls
    for cls in (Auto, Loop, Vmap, Threads, MemoryBudget, RecomputeInnerSteps)
}



def run_meta_batch(algorithm: Algorithm, network: nn.Module, episodes: Episodes,
                   executor: Executor | None = None, *, training: bool = True, epoch: int = 0,
                   params: dict[str, Tensor] | None = None) -> TaskResult:
    """The per-task results of ``algorithm`` on a meta-batch, stacked ``[T, ...]``: what the
    training shell runs every step, for use without Lightning.

    ``training``: the algorithm's meta-training task at ``epoch`` (differentiable: call
    ``algorithm.meta_loss(results, epoch).backward()``), else its evaluation task (scores
    after every inner step). ``params``: the network's parameters to start from (default: its
    own, ``network.named_parameters()``). The algorithm must have been built on the network.

    Example:
        >>> import torch
        >>> from fewshot.algorithms import MAML
        >>> from fewshot.core import Episodes
        >>> from fewshot.models import Conv4, FewShotClassifier
        >>> network = FewShotClassifier(Conv4(1, 8, 28), ways=5)
        >>> maml = MAML(inner_steps=1, inner_lr=0.4)
        >>> maml.build(network)
        >>> episodes = Episodes(torch.rand(2, 5, 1, 28, 28), torch.arange(5).repeat(2, 1),
        ...                     torch.rand(2, 10, 1, 28, 28), torch.arange(5).repeat(2, 2))
        >>> results = run_meta_batch(maml, network, episodes)
        >>> maml.meta_loss(results, epoch=0).backward()  # second-order meta-gradient in .grad
        >>> tuple(results.losses.shape)
        (2, 1)
    """
    executor = Auto() if executor is None else executor
    params = dict(network.named_parameters()) if params is None else params
    if training:
        task = algorithm.training_tasks(epoch, executor.checkpoint_inner_steps)
        return executor.run(task, network, (params, algorithm.meta_parameters()), episodes)
    task = algorithm.evaluation_tasks()
    with torch.enable_grad():
        return executor.run(task, network, ({n: p.detach() for n, p in params.items()},
                                            algorithm.meta_parameters(detach=True)), episodes)


def build_executor(spec: dict | str) -> Executor:
    """The executor recorded as ``{"class_path", "init_args"}`` (nested ones too)."""
    return build_from_settings(spec, EXECUTORS, "executor")


__all__ = ["build_executor", "run_meta_batch", "EXECUTORS", "Auto", "Executor", "Loop", "MemoryBudget", "RecomputeInnerSteps",
           "Threads", "Vmap"]
