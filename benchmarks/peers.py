"""The same MAML meta-step written with learn2learn and with higher, for benchmarks/meta_step.py.

Both run on a stock ``nn.Module``: fewshot's Conv4 with ``torch.nn.BatchNorm2d`` (training mode,
no running statistics, so every forward pass normalises with its own batch as fewshot does).
Each follows its library's own MAML example: a per-task loop that adapts a clone, then calls
``backward`` on the task's query loss, the meta-gradient accumulating in ``.grad``; the sum is
divided by the number of tasks, giving the gradient of the mean query loss.
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewshot.core.episode import Episodes
from fewshot.models import Conv4, FewShotClassifier


def stock_batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, track_running_stats=False)


def peer_model(model: FewShotClassifier, in_channels: int, hidden: int, size: int) -> FewShotClassifier:
    """A copy of fewshot's ``model`` whose batch norms are ``torch.nn.BatchNorm2d``, same weights."""
    peer = FewShotClassifier(Conv4(in_channels, hidden, size, norm_layer=stock_batch_norm),
                             model.head.out_features)
    peer.load_state_dict(model.state_dict())
    return peer.to(next(model.parameters()))


def _mean_of_accumulated(model: nn.Module, tasks: int) -> list[Tensor]:
    grads = [p.grad / tasks for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return grads


def learn2learn_step(maml_module: ModuleType, model: nn.Module, episodes: Episodes, steps: int,
                     lr: float, first_order: bool) -> list[Tensor]:
    """learn2learn 0.2.0: ``MAML(model).clone()``, ``adapt(loss)`` per inner step."""
    maml = maml_module.MAML(model, lr=lr, first_order=first_order)
    model.zero_grad(set_to_none=True)
    for sx, sy, qx, qy in zip(*episodes, strict=True):
        learner = maml.clone()
        for _ in range(steps):
            learner.adapt(F.cross_entropy(learner(sx), sy))
        F.cross_entropy(learner(qx), qy).backward()
    return _mean_of_accumulated(model, episodes.num_tasks)


def higher_step(higher: ModuleType, model: nn.Module, episodes: Episodes, steps: int,
                lr: float, first_order: bool) -> list[Tensor]:
    """higher 0.2.1: ``innerloop_ctx`` with a differentiable SGD, ``copy_initial_weights=False``
    so the meta-gradient reaches ``model`` (higher's MAML example). Second order only: higher's
    ``track_higher_grads=False`` cuts the graph to the initial weights instead of giving FOMAML."""
    if first_order:
        raise ValueError("higher has no first-order MAML mode")
    inner_optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    model.zero_grad(set_to_none=True)
    for sx, sy, qx, qy in zip(*episodes, strict=True):
        with higher.innerloop_ctx(model, inner_optimizer, copy_initial_weights=False) as (fmodel, diffopt):
            for _ in range(steps):
                diffopt.step(F.cross_entropy(fmodel(sx), sy))
            F.cross_entropy(fmodel(qx), qy).backward()
    return _mean_of_accumulated(model, episodes.num_tasks)
