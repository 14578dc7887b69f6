"""Batch normalisation that is exact under ``torch.func.vmap`` and second-order autograd.

MAML normalises every task with the statistics of the task's own batch (the support set while
adapting, the query set when predicting). This is *transductive*: a query image's prediction
depends on the other query images of its task. The MAML paper and its reference code do this,
and so do published MAML numbers; fewshot's default follows them.

:func:`batch_norm_with_batch_statistics` picks one of three exact implementations:

- **No ``torch.func`` transform active** (the per-task loop, the worker threads, adaptation,
  plain inference): :class:`_BatchNorm`, PyTorch's fused forward and backward kernels plus a
  closed-form second derivative (:class:`_BatchNormGradients`). Second-order MAML spends most
  of its batch-norm time in the second derivative, which autograd builds from about forty
  full-size operations; the closed form needs about fifteen (conv4 on Omniglot, one CPU thread,
  ``python benchmarks/loop_ablation.py``, two runs: the whole meta-step takes 5-11% longer
  with autograd's second derivative, 22-28% longer with the primitive ops).
- **Inside ``vmap``**: primitive ops. The second-order gradient through the fused kernel is
  wrong under vmap when the affine parameters are adapted (about 2e-3 relative error over the
  meta-gradient in float64, torch 2.11 and 2.13, CPU and GPU); primitive ops' derivatives of
  every order are composed by autograd itself.
- **Other transforms** (``torch.func.grad``/``vjp`` without vmap, autocast, other dtypes):
  the fused kernel, exact there.

``tests/test_batch_norm.py`` checks every path against the others and against finite
differences in float64.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewshot.core.transforms import inside_functorch_transform, inside_vmap


def _per_channel(t: Tensor) -> Tensor:
    return t.view(1, -1, 1, 1)


class _BatchNorm(torch.autograd.Function):
    """Batch norm with batch statistics: fused forward and backward, closed-form second
    derivative. ``x: [B, C, H, W]``; ``weight``, ``bias``: ``[C]``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
        out, mean, invstd = torch.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, mean, invstd = ctx.saved_tensors
        # Through a second Function, so that a backward with create_graph=True records a node
        # whose own backward is the closed-form second derivative.
        grad_x, grad_weight, grad_bias = _BatchNormGradients.apply(
            grad_out, x, weight, mean, invstd, ctx.eps)
        return grad_x, grad_weight, grad_bias, None


class _BatchNormGradients(torch.autograd.Function):
    """``(grad_out, x, weight) -> (grad_x, grad_weight, grad_bias)`` of batch norm; ``mean``
    and ``invstd`` are x's batch statistics, taken as constants: their dependence on ``x`` is
    part of the closed form. Its backward is the second derivative (all MAML needs); asked with
    ``create_graph`` (a third derivative), it recomputes the statistics differentiably and
    autograd differentiates the closed form, slower but exact."""

    @staticmethod
    def forward(ctx: Any, grad_out: Tensor, x: Tensor, weight: Tensor, mean: Tensor,
                invstd: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
        grads = torch.ops.aten.native_batch_norm_backward(
            grad_out, x, weight, None, None, mean, invstd, True, eps, [True, True, True])
        ctx.save_for_backward(grad_out, x, weight, mean, invstd)
        ctx.eps = eps
        ctx.set_materialize_grads(False)  # an unused grad_x arrives as None: no zero tensor
        return grads

    @staticmethod
    def backward(ctx: Any, u: Tensor | None, a: Tensor | None, b: Tensor | None
                 ) -> tuple[Tensor | None, ...]:
        # Per channel, over its n entries, with x̂ = (x - mean) * r and r = invstd, the forward
        # computed  grad_x = w r (g - mean(g) - x̂ mean(g x̂)),  grad_weight = Σ g x̂,
        # grad_bias = Σ g.  This is the derivative of  Φ = Σ u·grad_x + a·grad_weight +
        # b·grad_bias  with respect to g, x and w, using d x̂_j / d x_i =
        # r (δ_ij - 1/n - x̂_i x̂_j / n) and d r / d x_i = -r² x̂_i / n. Every result is a
        # per-channel combination of the full-size tensors u, g and x̂.
        g, x, w, mean, r = ctx.saved_tensors
        dims, n = (0, 2, 3), x.numel() // x.shape[1]
        if torch.is_grad_enabled():  # create_graph: the statistics must carry x's graph
            variance, mean = torch.var_mean(x, dim=dims, correction=0)
            r = torch.rsqrt(variance + ctx.eps)
        a = torch.zeros_like(w) if a is None else a
        b = torch.zeros_like(w) if b is None else b
        x_hat = (x - _per_channel(mean)) * _per_channel(r)
        g_mean = g.mean(dims)
        gx = (g * x_hat).sum(dims)  # grad_weight
        if u is None:
            u_mean = ux = ug = torch.zeros_like(w)
        else:
            u_mean = u.mean(dims)
            ux = (u * x_hat).sum(dims)
            ug = (u * g).sum(dims) - n * u_mean * g_mean  # Σ u (g - mean(g))
        wr = w * r
        grad_w = r * (ug - ux * gx / n)
        k = (a - wr * ux / n) * r  # coefficient of g in grad_x
        m = wr * r * gx / n  # minus the coefficient of u in grad_x
        x_hat_coefficient = -wr * r / n * (ug - gx * ux / n) - k * gx / n + m * ux / n
        grad_x = torch.addcmul(_per_channel(m * u_mean - k * g_mean), x_hat,
                               _per_channel(x_hat_coefficient))
        grad_g = torch.addcmul(_per_channel(b - wr * u_mean), x_hat, _per_channel(a - wr * ux / n))
        grad_x = torch.addcmul(grad_x, g, _per_channel(k))
        if u is not None:
            grad_x = torch.addcmul(grad_x, u, _per_channel(-m))
            grad_g = torch.addcmul(grad_g, u, _per_channel(wr))
        return grad_g, grad_x, grad_w, None, None, None


def batch_norm_with_batch_statistics(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` with the batch's own per-channel mean and
    biased variance over ``[B, C, H, W]``, exact to second order on every path (see the
    module docstring for which path runs when)."""
    if inside_vmap():
        # One per-channel scale and shift, then a single multiply-add over the feature map:
        # fewer full-size passes (forward and every derivative) than normalising then scaling.
        variance, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0, keepdim=True)  # biased
        scale = _per_channel(weight) * torch.rsqrt(variance + eps)
        return x * scale + (_per_channel(bias) - mean * scale)
    closed_form = (not inside_functorch_transform() and x.dim() == 4
                   and x.dtype in (torch.float32, torch.float64)
                   and weight.dtype == x.dtype and bias.dtype == x.dtype
                   and not torch.is_autocast_enabled(x.device.type))
    if closed_form:
        return _BatchNorm.apply(x, weight, bias, eps)
    return F.batch_norm(x, None, None, weight, bias, True, 0.0, eps)


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
        return batch_norm_with_batch_statistics(x, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, statistics=batch"
