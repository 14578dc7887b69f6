"""Reptile (Nichol, Achiam & Schulman, "On First-Order Meta-Learning Algorithms", 2018).

Each task adapts a copy of the meta-parameters with ``inner_steps`` plain (first-order)
updates on its support set; the meta-gradient is the mean over tasks of
``params - adapted params``, so the meta-optimizer moves the initialisation towards the
adapted weights (with SGD of learning rate epsilon this is the paper's update
``params += epsilon * mean(adapted - params)``). It is not the gradient of any loss: the
per-task function returns the surrogate ``sum(params * (params - adapted).detach())``, whose
gradient is exactly that difference, so every executor, DDP's all-reduce and Lightning's
automatic optimisation carry it unchanged. Evaluation adapts and scores like MAML.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from fewshot.algorithms.base import Params, TaskFunction
from fewshot.algorithms.maml import MAML
from fewshot.core.inner_loop import TaskResult, accuracy, adapt, predict


class Reptile(MAML):
    """Reptile: first-order meta-learning by moving towards each task's adapted weights.

    Args:
        inner_steps: updates on each task's support set during meta-training (the paper uses
            5 on Omniglot, with 50 at test).
        inner_lr: their learning rate.
        eval_inner_steps, eval_inner_lr: adaptation at validation, test and use (default: as
            in training).
    """

    def __init__(
        self,
        inner_steps: int = 5,
        inner_lr: float = 0.1,
        eval_inner_steps: int | None = None,
        eval_inner_lr: float | None = None,
    ) -> None:
        super().__init__(inner_steps, inner_lr, eval_inner_steps, eval_inner_lr, first_order=True)

    def training_tasks(self, epoch: int, checkpoint_inner_steps: bool = False) -> TaskFunction:
        return partial(self._reptile_task)

    def _reptile_task(self, model: nn.Module, differentiable: tuple[Params, Params], task) -> TaskResult:
        params, _ = differentiable
        support_x, support_y, query_x, query_y = task
        adapted = adapt(model, {n: p.detach() for n, p in params.items()}, support_x, support_y,
                        steps=self.inner_steps, lr=self.inner_lr, first_order=True,
                        inner=self.inner_loop())
        # d(surrogate)/d(params) = params - adapted: the Reptile meta-gradient of this task.
        surrogate = sum((p * (p.detach() - adapted[n].detach())).sum() for n, p in params.items())
        with torch.no_grad():
            outputs = predict(model, adapted, query_x, self.inner_steps)
            loss = self.inner_loop().loss(outputs, query_y)
        return TaskResult(surrogate.reshape(1), loss.reshape(1),
                          accuracy(outputs, query_y).reshape(1), {}, {})
