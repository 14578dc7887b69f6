"""The executor measured fastest on the device, chosen from the configuration alone."""

from __future__ import annotations

import torch
from torch import nn

from fewshot.algorithms.base import TaskFunction
from fewshot.core.episode import Episodes
from fewshot.core.inner_loop import TaskResult
from fewshot.execution.base import Differentiable, Executor
from fewshot.execution.loop import Loop
from fewshot.execution.threads import Threads, default_workers
from fewshot.execution.vmap import Vmap

# On one CPU thread, vmap wins while tasks are tiny (per-call overhead dominates) and the loop
# wins once each task has enough images to keep the core busy (benchmarks/meta_step.py: Omniglot
# 5-way 1-shot with 1 query per class, 10 images a task, vmap 1.4x faster; with 5 queries per
# class, 30 images a task, the loop 1.2x faster). With more threads, whole tasks per thread
# beat both (fewshot.execution.threads).
CPU_VMAP_MAX_IMAGES_PER_TASK = 16


def one_thread_choice(images_per_task: int) -> Executor:
    return Vmap() if images_per_task <= CPU_VMAP_MAX_IMAGES_PER_TASK else Loop()


class Auto(Executor):
    """Pick by device and task size. GPUs: vmap, which fills the device with all tasks at
    once. A CPU with more than one intra-op thread (``torch.get_num_threads()``): worker
    threads with one core each, where they can run (:class:`~fewshot.execution.threads.Threads`).
    Otherwise vmap for small tasks (at most ``CPU_VMAP_MAX_IMAGES_PER_TASK`` support + query
    images), the loop for larger ones. The choice never depends on a timing, so runs stay
    reproducible."""

    def choose(self, model: nn.Module, differentiable: Differentiable, episodes: Episodes,
               recomputing: bool = False) -> Executor:
        device = episodes.support_x.device
        if device.type == "cuda":
            return Vmap()
        threads = Threads()
        if device.type == "cpu" and threads.can_run(model, differentiable, episodes, recomputing):
            return threads
        return one_thread_choice(episodes.support_x.shape[1] + episodes.query_x.shape[1])

    def run(self, task: TaskFunction, model: nn.Module, differentiable: Differentiable,
            episodes: Episodes, recomputing: bool = False) -> TaskResult:
        chosen = self.choose(model, differentiable, episodes, recomputing)
        return chosen.run(task, model, differentiable, episodes, recomputing)

    def describe(self, device: torch.device, images_per_task: int) -> str:
        if device.type == "cuda":
            return "vmap"
        if device.type == "cpu" and default_workers() > 1:
            return "threads"
        return one_thread_choice(images_per_task).describe(device, images_per_task)
