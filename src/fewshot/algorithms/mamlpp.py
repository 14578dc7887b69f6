"""MAML++ (Antoniou, Edwards & Storkey, "How to train your MAML", ICLR 2019): MAML with five
switchable fixes, each a field of :class:`MAMLPlusPlus` so that ablations are one flag each.

- MSL, multi-step loss: :func:`multi_step_loss_weights`.
- DA, derivative-order annealing: :func:`use_first_order`.
- LSLR, learned per-layer per-step inner rates: ``learned_rates="per_tensor"`` of
  :class:`~fewshot.algorithms.maml.MAML`.
- BNWB / BNRS, per-step batch norm: :func:`use_per_step_batch_norm` (model surgery at build).
- CA, cosine annealing of the meta learning rate, is the meta-optimizer's schedule, not the
  algorithm's: ``fewshot.training.schedules.CosineAnnealing`` (the MAML++ configs set it).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fewshot.algorithms.maml import MAML, LearnedRates
from fewshot.core.inner_optimizers import InnerOptimizer
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


class MAMLPlusPlus(MAML):
    """MAML++: MAML with MSL, DA, LSLR and per-step batch norm (all on by default; each off
    gives the ablation). Evaluation adapts with ``eval_inner_steps`` and the learned rates.

    Args:
        inner_steps, inner_lr, eval_inner_steps, first_order, inner_max_grad_norm: as MAML.
        eval_inner_lr: as MAML; only without learned rates.
        learned_rates: LSLR is ``per_tensor`` (the default); ``none`` switches it off.
        multi_step_loss: MSL, the weighted query loss after every inner step.
        multi_step_loss_epochs: epochs over which MSL anneals to the final step alone.
        derivative_order_annealing: DA, first order for the first ``first_order_epochs``.
        first_order_epochs: epochs of first-order training under DA.
        per_step_bn_weights: BNWB, batch-norm weights and biases per inner step.
        batch_norm: ``transductive`` (batch statistics, as MAML) or ``per_step_running``
            (BNRS: per-step running statistics, used in eval mode; predictions are per image).
    """

    def __init__(
        self,
        inner_steps: int = 5,
        inner_lr: float = 0.1,
        eval_inner_steps: int | None = None,
        eval_inner_lr: float | None = None,
        first_order: bool = False,
        learned_rates: LearnedRates = "per_tensor",
        inner_max_grad_norm: float | None = None,
        multi_step_loss: bool = True,
        multi_step_loss_epochs: int = 10,
        derivative_order_annealing: bool = True,
        first_order_epochs: int = 50,
        per_step_bn_weights: bool = True,
        batch_norm: BatchNormMode = "per_step_running",
    ) -> None:
        super().__init__(inner_steps, inner_lr, eval_inner_steps, eval_inner_lr, first_order,
                         learned_rates, inner_max_grad_norm)
        if multi_step_loss and inner_steps < 1:
            raise ValueError("multi_step_loss needs inner_steps >= 1")
        if batch_norm not in ("transductive", "per_step_running"):
            raise ValueError(f"batch_norm must be 'transductive' or 'per_step_running', got {batch_norm!r}")
        for name, value in (("multi_step_loss_epochs", multi_step_loss_epochs),
                            ("first_order_epochs", first_order_epochs)):
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        self.multi_step_loss, self.multi_step_loss_epochs = bool(multi_step_loss), multi_step_loss_epochs
        self.derivative_order_annealing = bool(derivative_order_annealing)
        self.first_order_epochs = first_order_epochs
        self.per_step_bn_weights, self.batch_norm = bool(per_step_bn_weights), batch_norm

    def build(self, network: nn.Module, inner_optimizer: InnerOptimizer | None = None) -> None:
        if self.per_step_bn_weights or self.batch_norm != "transductive":
            # Slots 0..inner_steps are the ones training fills; evaluating with more steps
            # reuses the last (PerStepBatchNorm2d.slot clamps), never an untrained slot.
            use_per_step_batch_norm(network, self.inner_steps + 1, self.per_step_bn_weights,
                                    self.batch_norm)
        super().build(network, inner_optimizer)

    def first_order_at(self, epoch: int) -> bool:
        return use_first_order(epoch, self.first_order, self.derivative_order_annealing,
                               self.first_order_epochs)

    def every_step_at(self, epoch: int) -> bool:
        return self.multi_step_loss and epoch < self.multi_step_loss_epochs

    def meta_loss(self, results, epoch: int) -> Tensor:
        if not self.every_step_at(epoch):
            return results.objective[:, -1].mean()
        # Losses after steps 1..K, weighted.
        weights = multi_step_loss_weights(self.inner_steps, epoch, self.multi_step_loss_epochs)
        return (results.objective[:, 1:] * weights.to(results.objective)).sum(dim=1).mean()
