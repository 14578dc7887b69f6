"""The training schedules and model surgery of MAML++ (Antoniou, Edwards & Storkey, "How to
train your MAML", ICLR 2019), as pure functions the LightningModule calls.

- MSL, multi-step loss: :func:`multi_step_loss_weights`.
- DA, derivative-order annealing: :func:`use_first_order`.
- BNWB / BNRS, per-step batch norm: :func:`use_per_step_batch_norm`.
- LSLR (learned per-layer per-step inner rates) lives in the module as parameters, and CA
  (cosine annealing of the meta learning rate) is ``torch.optim.lr_scheduler.CosineAnnealingLR``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fewshot.models.batch_norm import TransductiveBatchNorm2d
from fewshot.models.per_step_batch_norm import BatchNormMode, PerStepBatchNorm2d


def multi_step_loss_weights(steps: int, epoch: int, anneal_epochs: int) -> Tensor:
    """Importance of the query loss after each inner step ``1..steps``, at ``epoch``.

    Uniform ``1/steps`` at epoch 0; every non-final weight then falls linearly by
    ``1 / (steps * anneal_epochs)`` per epoch, not below the floor ``0.03 / steps`` the
    reference code keeps, and the final weight takes up the rest, so the weights always sum to
    1. From ``anneal_epochs`` on only the final step counts (weights ``[0, ..., 0, 1]``).
    """
    if steps < 1:
        raise ValueError(f"the multi-step loss needs inner_steps >= 1, got {steps}")
    if epoch >= anneal_epochs:
        weights = torch.zeros(steps)
        weights[-1] = 1.0
        return weights
    decay = epoch / (steps * anneal_epochs)
    floor = 0.03 / steps
    weights = torch.full((steps,), max(1.0 / steps - decay, floor))
    weights[-1] = min(1.0 / steps + (steps - 1) * decay, 1.0 - (steps - 1) * floor)
    return weights


def use_first_order(epoch: int, first_order: bool, annealing: bool, first_order_epochs: int) -> bool:
    """Derivative-order annealing: first order for the first ``first_order_epochs`` epochs."""
    return first_order or (annealing and epoch < first_order_epochs)


def use_per_step_batch_norm(
    network: nn.Module, slots: int, per_step_affine: bool, mode: BatchNormMode
) -> list[PerStepBatchNorm2d]:
    """Replace every :class:`TransductiveBatchNorm2d` in ``network`` by a per-step one.

    Each new layer starts from the old one's affine values in every slot, so the network
    computes exactly what it did before until training moves the slots apart.
    """
    replaced = []
    for name, module in list(network.named_modules()):
        if not isinstance(module, TransductiveBatchNorm2d):
            continue
        layer = PerStepBatchNorm2d(module.num_features, slots, per_step_affine, mode,
                                   eps=module.eps, key=name)
        with torch.no_grad():
            layer.weight.copy_(module.weight.expand_as(layer.weight))
            layer.bias.copy_(module.bias.expand_as(layer.bias))
        parent_name, _, child = name.rpartition(".")
        setattr(network.get_submodule(parent_name) if parent_name else network, child, layer)
        replaced.append(layer)
    if not replaced:
        raise ValueError(
            "per-step batch norm was requested, but the backbone has no TransductiveBatchNorm2d "
            "layer to replace"
        )
    return replaced
