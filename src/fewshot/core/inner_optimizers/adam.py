"""Adam in the inner loop, with the epsilon placement that keeps second order finite.

Why Adam in the inner loop explodes, and what fixes it (``benchmarks/algorithms.py`` measures
it): Adam divides each gradient by its own running magnitude. Around a gradient ``g`` much
smaller than ``eps`` the first step ``g / (|g| + eps)`` has slope ``~1/eps`` (1e8 with
PyTorch's default), and ``sqrt`` has an infinite slope at 0, so the second-order meta-gradient
multiplies the tiny, noisy curvature of such parameters (the conv biases that batch norm
cancels have gradients of exactly or nearly zero) by enormous factors. And the first step
moves every parameter by ``lr`` whatever its gradient, so a learning rate tuned for SGD
(0.4) scrambles the network. :class:`Adam` here therefore puts ``eps`` inside the square root
(a smooth function, whose slope is at most ``1/eps``, instead of an infinite one at zero), and
defaults to ``eps=1e-3``: far below a typical inner-gradient entry (median 0.04 on Omniglot at
initialisation) and far above rounding noise, so the near-zero gradients of parameters batch
norm cancels get small, SGD-like steps instead of full-size sign steps. Use a learning rate of
Adam's scale (about the median step SGD takes: 0.02 on Omniglot for SGD's 0.4), or learn the
rates (LSLR / Meta-SGD); :func:`clip_by_norm` bounds the inner gradient if needed.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from fewshot.core.inner_optimizers.base import InnerOptimizer, Params, State


class Adam(InnerOptimizer):
    """Adam with bias correction (Kingma & Ba, 2015), differentiable end to end.

    ``direction = m_hat / sqrt(v_hat + eps**2)`` with ``eps_inside_sqrt`` (the default, smooth
    everywhere), or PyTorch's ``m_hat / (sqrt(v_hat) + eps)`` without it, whose second
    derivative is unbounded where a gradient is zero (kept to measure the difference).

    Args:
        beta1: decay of the first moment (the mean of the gradients), in ``[0, 1)``.
        beta2: decay of the second moment (the mean of their squares), in ``[0, 1)``.
        eps: the smoothing term (1e-3: see the module docstring).
        eps_inside_sqrt: put ``eps**2`` inside the square root (finite second order).
    """

    def __init__(self, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-3,
                 eps_inside_sqrt: bool = True) -> None:
        for name, value in (("beta1", beta1), ("beta2", beta2)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"inner Adam {name} must be in [0, 1), got {value}")
        if not eps > 0:
            raise ValueError(f"inner Adam eps must be > 0, got {eps}")
        self.beta1, self.beta2, self.eps = float(beta1), float(beta2), float(eps)
        self.eps_inside_sqrt = bool(eps_inside_sqrt)

    def init(self, params: Mapping[str, Tensor]) -> State:
        state = {}
        for name, p in params.items():
            state[f"m/{name}"] = torch.zeros_like(p)
            state[f"v/{name}"] = torch.zeros_like(p)
        return state

    def direction(self, grads: Params, state: State, step: int) -> tuple[Params, State]:
        # The step count is a Python int: inner loops are unrolled, so bias corrections are
        # constants and no counter tensor needs carrying through vmap.
        correction1 = 1.0 - self.beta1 ** (step + 1)
        correction2 = 1.0 - self.beta2 ** (step + 1)
        directions, new_state = {}, {}
        for name, g in grads.items():
            m = self.beta1 * state[f"m/{name}"] + (1.0 - self.beta1) * g
            v = self.beta2 * state[f"v/{name}"] + (1.0 - self.beta2) * g * g
            m_hat, v_hat = m / correction1, v / correction2
            if self.eps_inside_sqrt:
                directions[name] = m_hat / torch.sqrt(v_hat + self.eps ** 2)
            else:
                directions[name] = m_hat / (torch.sqrt(v_hat) + self.eps)
            new_state[f"m/{name}"], new_state[f"v/{name}"] = m, v
        return directions, new_state
