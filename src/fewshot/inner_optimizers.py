"""Differentiable inner-loop optimizers as pure transforms: state in, state out.

MAML adapts with plain gradient descent. These transforms turn the support-set gradient of
each inner step into the *direction* the parameters move along (``params - lr * direction``),
keeping any optimizer state (momentum, Adam's moments) in a dict of tensors that is passed in
and returned, never stored. Every operation is differentiable, so second-order MAML
backpropagates through the optimizer itself, and nothing depends on a tensor's value in
Python, so the transforms run unchanged under ``torch.func.vmap``.

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
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import Tensor

Params = dict[str, Tensor]
State = dict[str, Tensor]
InnerOptimizerName = Literal["sgd", "momentum", "adam"]


class InnerOptimizer(Protocol):
    """A differentiable, functional optimizer for the inner loop."""

    def init(self, params: Mapping[str, Tensor]) -> State:
        """The state before the first step (tensors only, so it can be vmapped)."""

    def direction(self, grads: Params, state: State, step: int) -> tuple[Params, State]:
        """The update direction of inner ``step`` (0-based) and the new state."""


@dataclass(frozen=True)
class SGD:
    """Plain gradient descent: the direction is the gradient (MAML)."""

    def init(self, params: Mapping[str, Tensor]) -> State:
        return {}

    def direction(self, grads: Params, state: State, step: int) -> tuple[Params, State]:
        return grads, state


@dataclass(frozen=True)
class Momentum:
    """Heavy-ball momentum as ``torch.optim.SGD`` computes it: ``v = momentum * v + g``."""

    momentum: float = 0.9

    def __post_init__(self) -> None:
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"inner momentum must be in [0, 1), got {self.momentum}")

    def init(self, params: Mapping[str, Tensor]) -> State:
        return {f"velocity/{name}": torch.zeros_like(p) for name, p in params.items()}

    def direction(self, grads: Params, state: State, step: int) -> tuple[Params, State]:
        velocity = {name: self.momentum * state[f"velocity/{name}"] + g for name, g in grads.items()}
        return velocity, {f"velocity/{name}": v for name, v in velocity.items()}


@dataclass(frozen=True)
class Adam:
    """Adam with bias correction (Kingma & Ba, 2015), differentiable end to end.

    ``direction = m_hat / sqrt(v_hat + eps**2)`` with ``eps_inside_sqrt`` (the default, smooth
    everywhere), or PyTorch's ``m_hat / (sqrt(v_hat) + eps)`` without it, whose second
    derivative is unbounded where a gradient is zero (kept to measure the difference).
    """

    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-3
    eps_inside_sqrt: bool = True

    def __post_init__(self) -> None:
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"inner Adam {name} must be in [0, 1), got {getattr(self, name)}")
        if not self.eps > 0:
            raise ValueError(f"inner Adam eps must be > 0, got {self.eps}")

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


def clip_by_norm(grads: Params, max_norm: float | None) -> Params:
    """Scale ``grads`` so their joint 2-norm is at most ``max_norm`` (differentiably).

    Branch-free (``min(1, max_norm / norm)``), so it runs under vmap with one norm per task.
    """
    if max_norm is None:
        return grads
    norm = torch.sqrt(sum(g.square().sum() for g in grads.values()))
    scale = torch.clamp(max_norm / (norm + 1e-12), max=1.0)
    return {name: g * scale for name, g in grads.items()}


def make_inner_optimizer(
    name: InnerOptimizerName = "sgd",
    *,
    momentum: float = 0.9,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-3,
    eps_inside_sqrt: bool = True,
) -> InnerOptimizer:
    """The inner optimizer called ``name`` with its hyperparameters."""
    if name == "sgd":
        return SGD()
    if name == "momentum":
        return Momentum(momentum)
    if name == "adam":
        return Adam(betas[0], betas[1], eps, eps_inside_sqrt)
    raise ValueError(f"inner_optimizer must be 'sgd', 'momentum' or 'adam', got {name!r}")

