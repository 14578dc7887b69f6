"""Prototypical Networks (Snell, Swersky & Zemel, "Prototypical Networks for Few-shot
Learning", NeurIPS 2017), the baseline every few-shot paper reports.

No inner loop: a task's classes are the means (prototypes) of their support embeddings, and a
query's logits are the negative squared Euclidean distances of its embedding to them. The
network's feature extractor is meta-learned; its linear head is unused (and frozen).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from fewshot.algorithms.base import Adapted, Algorithm, Params, TaskFunction
from fewshot.core.inner_loop import TaskResult, accuracy
from fewshot.core.inner_optimizers import InnerOptimizer


def prototypes(embeddings: Tensor, labels: Tensor, ways: int) -> Tensor:
    """``[ways, D]`` class means of ``embeddings [B, D]`` labelled ``labels [B]`` in ``0..ways-1``."""
    one_hot = F.one_hot(labels, ways).to(embeddings.dtype)  # [B, ways]
    return (one_hot.T @ embeddings) / one_hot.sum(dim=0).clamp_min(1.0)[:, None]


def negative_squared_distances(queries: Tensor, centres: Tensor) -> Tensor:
    """Logits ``[Q, N]``: ``-||query - centre||^2`` for ``queries [Q, D]``, ``centres [N, D]``."""
    return -(queries[:, None, :] - centres[None, :, :]).square().sum(dim=-1)


def _embed(network: nn.Module, params: Params, x: Tensor) -> Tensor:
    features = {n[len("features."):]: p for n, p in params.items() if n.startswith("features.")}
    return functional_call(network.features, features, (x,))


class ProtoNet(Algorithm):
    """Prototypical Networks: classify by distance to class means of support embeddings.

    Takes no arguments: the embedding is the backbone (``network.features``), the metric the
    squared Euclidean distance (the paper's choice).
    """

    uses_head = False

    def __init__(self) -> None:
        super().__init__()

    def build(self, network: nn.Module, inner_optimizer: InnerOptimizer | None = None) -> None:
        super().build(network, inner_optimizer)
        if not hasattr(network, "features"):
            raise ValueError("ProtoNet embeds with network.features: use a FewShotClassifier")
        network.head.requires_grad_(False)  # unused: no gradient, and DDP must not wait for one

    def training_tasks(self, epoch: int, checkpoint_inner_steps: bool = False) -> TaskFunction:
        return self._task

    def evaluation_tasks(self) -> TaskFunction:
        return self._task

    def _task(self, model: nn.Module, differentiable: tuple[Params, Params], task) -> TaskResult:
        params, _ = differentiable
        support_x, support_y, query_x, query_y = task
        ways = model.head.out_features
        logits = negative_squared_distances(
            _embed(model, params, query_x), prototypes(_embed(model, params, support_x), support_y, ways))
        # Classes without support images (a task of fewer ways than the head) are not classes.
        logits = logits.masked_fill(F.one_hot(support_y, ways).sum(dim=0) == 0, float("-inf"))
        loss = F.cross_entropy(logits, query_y)
        return TaskResult(loss.reshape(1), loss.detach().reshape(1),
                          accuracy(logits.detach(), query_y).reshape(1), {}, {})

    def adapt(self, network: nn.Module, params: Params, support_x: Tensor, support_y: Tensor,
              steps: int | None = None, lr: float | None = None) -> Adapted:
        ways = int(support_y.max()) + 1
        with torch.no_grad():
            centres = prototypes(_embed(network, params, support_x), support_y, ways)
        return Adapted({n: p.detach() for n, p in params.items()}, 0, {"prototypes": centres})

    def predict(self, network: nn.Module, adapted: Adapted, x: Tensor) -> Tensor:
        with torch.no_grad():
            return negative_squared_distances(_embed(network, adapted.params, x),
                                              adapted.extras["prototypes"])
