"""Batch normalisation that is exact under ``torch.func.vmap`` and second-order autograd.

MAML normalises every task with the statistics of the task's own batch (the support set while
adapting, the query set when predicting). This is *transductive*: a query image's prediction
depends on the other query images of its task. The MAML paper and its reference code do this,
and so do published MAML numbers; fewshot's default follows them.

Why not ``torch.nn.functional.batch_norm``: under ``vmap`` the second-order gradient through the
fused batch-norm kernel is wrong when the affine parameters are adapted in the inner loop (about
2e-3 relative error over the meta-gradient in float64, torch 2.11 and 2.13, CPU and GPU). The
statistics are therefore computed from primitive ops, whose derivatives of every order are
composed by autograd itself. ``tests/test_maml.py`` checks the meta-gradient against a hand-written
reference in float64 under vmap, which fails if this module is swapped for the fused kernel.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class TransductiveBatchNorm2d(nn.Module):
    """Batch norm over ``[batch, channels, height, width]`` using the batch's own statistics.

    There are no running statistics: train and eval behave identically, so a model adapted on a
    support set and evaluated on a query set normalises each with its own batch, as in MAML.

    Args:
        num_features: number of channels.
        eps: added to the variance for numerical stability.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        centred = x - mean
        variance = centred.square().mean(dim=(0, 2, 3), keepdim=True)  # biased, as in training BN
        normalised = centred * torch.rsqrt(variance + self.eps)
        return normalised * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, statistics=batch"
