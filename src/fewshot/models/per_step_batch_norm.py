"""Per-step batch normalisation of MAML++ (Antoniou, Edwards & Storkey, ICLR 2019).

One set of affine parameters (BNWB) and/or running statistics (BNRS) for every inner step:
the network after ``k`` inner updates normalises differently from the one after ``k + 1``.
Slot ``k`` serves forward passes with parameters after ``k`` updates (``k = 0..steps``), read
from :func:`~fewshot.core.step_context.current_inner_step`. Evaluating with more inner steps
than were trained reuses the last slot for the extra steps; with fewer, the later slots are
simply unused.

Two modes:

- ``transductive``: normalise with the batch's own statistics, always (as MAML). Running
  statistics are not kept.
- ``per_step_running``: in training mode, normalise with the batch statistics and record them
  (returned by value, see :mod:`fewshot.core.step_context`) so the LightningModule can update
  the per-step running averages; in eval mode, predictions normalise with the running
  statistics of their slot, so a query image's prediction depends on nothing but the image and
  the adapted weights (non-transductive). The inner loop's passes over the support set keep
  the support batch's statistics in eval mode too: the support set is the task's labelled
  training data, and adapting through fixed statistics would change the inner-loop gradients
  the initialisation was meta-learned for (we measured adaptation collapsing to chance).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from fewshot.core.step_context import adapting_on_support, current_inner_step, record_statistic
from fewshot.models.batch_norm import batch_norm_with_batch_statistics

BatchNormMode = Literal["transductive", "per_step_running"]


class PerStepBatchNorm2d(nn.Module):
    """Batch norm with per-inner-step affine parameters and/or running statistics.

    Args:
        num_features: channels.
        slots: number of per-step slots, ``inner_steps + 1``.
        per_step_affine: one weight and bias per slot (BNWB) instead of one shared pair.
        mode: ``transductive`` or ``per_step_running`` (see the module docstring).
        momentum: weight of a new batch in the running averages.
        eps: added to the variance.
        key: unique name of this layer in recorded statistics (set by the owner).
    """

    def __init__(
        self, num_features: int, slots: int, per_step_affine: bool = True,
        mode: BatchNormMode = "transductive", momentum: float = 0.1, eps: float = 1e-5,
        key: str = "bn",
    ) -> None:
        super().__init__()
        if mode not in ("transductive", "per_step_running"):
            raise ValueError(f"batch-norm mode must be 'transductive' or 'per_step_running', got {mode!r}")
        if slots < 1:
            raise ValueError(f"need at least one batch-norm slot, got slots={slots}")
        self.num_features, self.slots, self.mode = num_features, slots, mode
        self.per_step_affine, self.momentum, self.eps, self.key = per_step_affine, momentum, eps, key
        shape = (slots, num_features) if per_step_affine else (num_features,)
        self.weight = nn.Parameter(torch.ones(shape))
        self.bias = nn.Parameter(torch.zeros(shape))
        if mode == "per_step_running":
            self.register_buffer("running_mean", torch.zeros(slots, num_features))
            self.register_buffer("running_var", torch.ones(slots, num_features))

    def slot(self) -> int:
        return min(current_inner_step(), self.slots - 1)

    def forward(self, x: Tensor) -> Tensor:
        slot = self.slot()
        weight = self.weight[slot] if self.per_step_affine else self.weight
        bias = self.bias[slot] if self.per_step_affine else self.bias
        if self.mode == "per_step_running" and not self.training and not adapting_on_support():
            mean = self.running_mean[slot].view(1, -1, 1, 1)
            variance = self.running_var[slot].view(1, -1, 1, 1)
            normalised = (x - mean) * torch.rsqrt(variance + self.eps)
            return normalised * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)
        if self.mode == "per_step_running":
            with torch.no_grad():
                variance, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
                n = x.shape[0] * x.shape[2] * x.shape[3]
            record_statistic(f"{self.key}/{slot}/mean", mean)
            record_statistic(f"{self.key}/{slot}/var", variance * (n / max(n - 1, 1)))  # unbiased
        # The transductive batch norm's exact paths (closed form, fused, or primitive under vmap).
        return batch_norm_with_batch_statistics(x, weight, bias, self.eps)

    @torch.no_grad()
    def update_running_statistics(self, statistics: dict[str, Tensor]) -> None:
        """Fold batch statistics (already averaged over tasks) into the running averages."""
        if self.mode != "per_step_running":
            return
        for slot in range(self.slots):
            for name, buffer in (("mean", self.running_mean), ("var", self.running_var)):
                value = statistics.get(f"{self.key}/{slot}/{name}")
                if value is not None:
                    buffer[slot].lerp_(value.to(buffer.dtype), self.momentum)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, slots={self.slots}, per_step_affine={self.per_step_affine}, "
                f"mode={self.mode}")
