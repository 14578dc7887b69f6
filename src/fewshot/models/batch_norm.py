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

Outside ``vmap`` (the per-task loop, evaluation, plain inference) the fused kernel is exact and
about 20% faster per meta-step on a CPU, so it is used there; :func:`inside_vmap` decides.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:  # private, but the only way to see a vmap level from inside grad(vmap(...)) or vmap(grad(...))
    from torch._functorch.pyfunctorch import TransformType as _TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
except ImportError:  # pragma: no cover - an older or newer torch: always take the exact path
    retrieve_all_functorch_interpreters = None


def inside_vmap() -> bool:
    """Whether any ``torch.func.vmap`` is active around the current call (at any depth).

    A tensor's own ``is_batchedtensor`` is not enough: under ``vmap(grad(f))`` the tensor ``f``
    sees is a gradient wrapper around the batched one. When the check is unavailable, the
    answer is ``True``, which selects the exact path everywhere.
    """
    if retrieve_all_functorch_interpreters is None:
        return True
    return any(i.key() == _TransformType.Vmap for i in retrieve_all_functorch_interpreters())


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
        if not inside_vmap():  # fused kernel: exact (and faster) whenever no vmap is active
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        # One per-channel scale and shift, then a single multiply-add over the feature map: fewer
        # full-size passes (forward and every derivative) than normalising then scaling.
        variance, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0, keepdim=True)  # biased
        scale = self.weight.view(1, -1, 1, 1) * torch.rsqrt(variance + self.eps)
        return x * scale + (self.bias.view(1, -1, 1, 1) - mean * scale)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, statistics=batch"
