"""What a meta-learning algorithm is to the rest of fewshot.

An algorithm is a small ``nn.Module``: its own meta-parameters (learned inner rates, say) are
its submodules, so their state-dict keys are its own (``algorithm.*``); the network's are the
network's (``network.*``). It decides

- which parameters the inner loop adapts and at which rates (:meth:`Algorithm.build` sees the
  network once, for model surgery such as per-step batch norm);
- what one task computes, in training and in evaluation: a per-task function that the
  executors of :mod:`fewshot.execution` run over a meta-batch (vmapped, looped, on threads);
- how the per-task results become the meta-loss, whose gradient is the meta-gradient; an
  algorithm whose meta-gradient is not the gradient of a query loss (Reptile) returns a
  surrogate whose gradient is the meta-gradient it computed itself;
- how a trained model adapts to a new task and predicts (used by :mod:`fewshot.inference`).

A new algorithm is one file with a subclass and one line in :data:`fewshot.algorithms.ALGORITHMS`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from fewshot.core.inner_loop import TaskResult
from fewshot.core.inner_optimizers import SGD, InnerOptimizer
from fewshot.core.settings import settings_of

Params = dict[str, Tensor]
# ``(model, (network parameters, algorithm parameters), task tensors) -> TaskResult``, where
# the task tensors are ``support_x, support_y, query_x, query_y`` of one task.
TaskFunction = Callable[[nn.Module, tuple[Params, Params], Sequence[Tensor]], TaskResult]


@dataclass(frozen=True)
class Adapted:
    """A model adapted to one task: what :meth:`Algorithm.predict` needs.

    Attributes:
        params: the network's parameters after adaptation (detached).
        steps_taken: inner updates applied (per-step layers predict with that step's slot).
        extras: anything else the algorithm keeps per task (class prototypes, say).
    """

    params: Params
    steps_taken: int = 0
    extras: dict[str, Tensor] = field(default_factory=dict)


class Algorithm(nn.Module):
    """Base class of meta-learning algorithms; see the module docstring.

    Subclasses keep every constructor argument as an attribute of the same name (so that
    :meth:`settings` can describe them for checkpoints and exports) and check their own
    arguments once, in the constructor.
    """

    #: Whether predictions go through the network's linear head (an N-way task whose N differs
    #: from training then needs a new head); prototype-based algorithms do without it.
    uses_head: bool = True

    def __init__(self) -> None:
        super().__init__()
        self.inner_optimizer: InnerOptimizer = SGD()

    def settings(self) -> dict[str, Any]:
        """``{"class_path", "init_args"}``: enough to build this algorithm again."""
        return settings_of(self)

    def build(self, network: nn.Module, inner_optimizer: InnerOptimizer | None = None) -> None:
        """Called once with the network, before any weights are loaded: create the
        algorithm's own meta-parameters, change the network where the algorithm needs to."""
        if inner_optimizer is not None:
            self.inner_optimizer = inner_optimizer

    def meta_parameters(self, detach: bool = False) -> Params:
        """The algorithm's own learned tensors that tasks use (handed to the executors)."""
        return {}

    @property
    def evaluation_steps(self) -> int:
        """Inner steps of evaluation and adaptation (0: no inner loop)."""
        return 0

    @property
    def evaluation_lr(self) -> float | None:
        """The fixed inner learning rate of evaluation and adaptation; None where there is none
        (no inner loop) or the rates are learned (they are :meth:`meta_parameters`)."""
        return None

    def first_order_at(self, epoch: int) -> bool:
        """Whether meta-training at ``epoch`` ignores second derivatives."""
        return True

    def training_tasks(self, epoch: int, checkpoint_inner_steps: bool = False) -> TaskFunction:
        """The per-task function of meta-training at ``epoch``."""
        raise NotImplementedError

    def evaluation_tasks(self) -> TaskFunction:
        """The per-task function of validation and testing: scores after every inner step."""
        raise NotImplementedError

    def meta_loss(self, results: TaskResult, epoch: int) -> Tensor:
        """The scalar whose gradient is the meta-gradient, from results stacked over tasks."""
        return results.objective[:, -1].mean()

    def adapt(self, network: nn.Module, params: Params, support_x: Tensor, support_y: Tensor,
              steps: int | None = None, lr: float | None = None) -> Adapted:
        """Adapt to one new task (``support_y`` in ``0..N-1``); gradients are not kept."""
        raise NotImplementedError

    def predict(self, network: nn.Module, adapted: Adapted, x: Tensor) -> Tensor:
        """Logits ``[B, N]`` of ``x`` for the task ``adapted`` was adapted to."""
        raise NotImplementedError

    def step_probabilities(self, network: nn.Module, params: Params, support_x: Tensor,
                           support_y: Tensor, query_x: Tensor) -> Tensor:
        """Class probabilities ``[steps + 1, Q, N]`` of ``query_x`` before adapting and after
        each of the :attr:`evaluation_steps` inner steps: what a checkpoint ensemble averages.

        This general version adapts afresh for every number of steps; algorithms with an inner
        loop override it to take each step once."""
        rows = []
        for steps in range(self.evaluation_steps + 1):
            adapted = self.adapt(network, params, support_x, support_y, steps=steps)
            with torch.no_grad():
                rows.append(self.predict(network, adapted, query_x).softmax(dim=-1))
        return torch.stack(rows)

    def describe(self) -> dict[str, Any]:
        """A short, human-readable summary for model cards and results files."""
        return {"algorithm": type(self).__name__, **self.settings()["init_args"]}
