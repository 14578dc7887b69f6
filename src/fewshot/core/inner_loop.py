"""The inner loop of gradient-based meta-learning: pure functions over name-keyed parameter dicts.

One per-task function adapts the parameters on the support set with ``steps`` differentiable
updates and scores the query set (:func:`task_query_metrics`). Whoever calls it decides how
the query losses become a meta-loss (:mod:`fewshot.algorithms`) and how the tasks of a
meta-batch run (:mod:`fewshot.execution`). With ``first_order=False`` the meta-gradient flows
through the inner gradients (second-order MAML); with ``first_order=True`` they are constants.

Nothing here imports Lightning or mutates a module: ``model`` only provides the computation,
``params`` the values (Finn, Abbeel & Levine, "Model-Agnostic Meta-Learning for Fast
Adaptation of Deep Networks", ICML 2017).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad

from fewshot.core.inner_optimizers import SGD, InnerOptimizer, clip_by_norm
from fewshot.core.recompute import recompute
from fewshot.core.step_context import (
    inner_step,
    mean_statistics,
    merge_statistics,
    recording_statistics,
)
from fewshot.core.transforms import inside_functorch_transform

Params = dict[str, Tensor]
# ``(outputs, targets) -> scalar``: the loss of the support and query sets.
Loss = Callable[[Tensor, Tensor], Tensor]
# A float, or per parameter name the rates of every inner step ``[steps, ...]`` (MAML++ LSLR:
# ``[steps]``; Meta-SGD: ``[steps, *parameter.shape]``).
LearningRate = float | Mapping[str, Tensor]


class TaskResult(NamedTuple):
    """What adapting and scoring a task produce (stacked over tasks: a leading ``[T]``).

    Attributes:
        objective: ``[S]`` differentiable values the algorithm's meta-loss combines: the query
            losses after each scored step (gradient-based algorithms), or a surrogate whose
            gradient is the algorithm's meta-gradient (Reptile).
        losses: ``[S]`` the query losses, for the record.
        accuracies: ``[S]`` query accuracies (classification; NaN where the targets are not
            class labels).
        diagnostics: detached observations by name: the inner gradient's norm per step.
        batch_norm_statistics: detached batch statistics recorded by per-step batch norm, by
            ``layer/slot/mean|var``: state for the caller to fold in, never applied here.
    """

    objective: Tensor
    losses: Tensor
    accuracies: Tensor
    diagnostics: dict[str, Tensor]
    batch_norm_statistics: dict[str, Tensor]


def accuracy(outputs: Tensor, targets: Tensor) -> Tensor:
    """Fraction of ``outputs [B, N]`` whose argmax is ``targets [B]``; NaN for non-class
    targets (regression), where accuracy means nothing."""
    if targets.is_floating_point() or outputs.dim() != 2:
        return outputs.new_full((), float("nan"))
    return (outputs.argmax(dim=-1) == targets).to(outputs.dtype).mean()


class InnerLoop(NamedTuple):
    """How the inner loop updates parameters, beyond steps and learning rate.

    ``optimizer``: the differentiable transform from gradient to direction (SGD by default,
    see :mod:`fewshot.core.inner_optimizers`); ``max_grad_norm``: clip each task's inner
    gradient to this 2-norm; ``adapted``: names of the parameters the inner loop updates
    (``None``: all; ANIL adapts the head only); ``loss``: of the support and query sets
    (cross-entropy by default); ``start_at_zero``: parameters every task starts from zero
    instead of their meta-learned value (the zeroing trick's head weight);
    ``first_step_adapts``: the only parameters whose support gradient the first update
    computes, the others' being exactly zero (``None``: all). Zeroing the linear head's weight
    makes the first support gradient of every layer before the head zero, since it reaches
    them through that weight, so the first update need not differentiate them.
    """

    optimizer: InnerOptimizer = SGD()
    max_grad_norm: float | None = None
    adapted: frozenset[str] | None = None
    loss: Loss = F.cross_entropy
    start_at_zero: frozenset[str] = frozenset()
    first_step_adapts: frozenset[str] | None = None

    def starting_point(self, params: Params) -> Params:
        """``params`` with the ``start_at_zero`` ones replaced by constant zeros."""
        if not self.start_at_zero:
            return params
        missing = self.start_at_zero - params.keys()
        if missing:
            raise KeyError(f"the inner loop should start {sorted(missing)} at zero, which the "
                           "model lacks")
        return {**params, **{n: torch.zeros_like(params[n], requires_grad=False)
                             for n in self.start_at_zero}}

    def split(self, params: Params) -> tuple[Params, Params]:
        """``params`` as (adapted by the inner loop, left as they are)."""
        if self.adapted is None:
            return params, {}
        missing = self.adapted - params.keys()
        if missing:
            raise KeyError(f"the inner loop should adapt {sorted(missing)}, which the model lacks")
        return ({n: p for n, p in params.items() if n in self.adapted},
                {n: p for n, p in params.items() if n not in self.adapted})


PLAIN_SGD = InnerLoop()


def learning_rate_at(lr: LearningRate, step: int) -> float | dict[str, Tensor]:
    """The inner learning rate(s) of ``step``; steps past the learned ones reuse the last."""
    if isinstance(lr, Mapping):
        return {name: rates[min(step, rates.shape[0] - 1)] for name, rates in lr.items()}
    return lr


def _support_loss(model: nn.Module, loss: Loss, step: int, adapted: Params, frozen: Params,
                  x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    # Statistics recorded inside ``grad`` must leave it as auxiliary outputs, not side effects.
    with recording_statistics() as recorded, inner_step(step, on_support=True):
        value = loss(functional_call(model, {**frozen, **adapted}, (x,)), y)
    return value, mean_statistics(recorded)


def _support_gradients(model: nn.Module, inner: InnerLoop, step: int, adapted: Params,
                       frozen: Params, x: Tensor, y: Tensor, first_order: bool,
                       ) -> tuple[Params, dict[str, Tensor]]:
    """Gradients of the support loss with respect to ``adapted``, differentiable (second order)
    unless ``first_order`` or gradients are off, and the statistics recorded on the way."""
    if inside_functorch_transform():  # under vmap (and recompute's vjp): torch.func.grad
        grads, statistics = grad(partial(_support_loss, model, inner.loss, step), has_aux=True)(
            adapted, frozen, x, y)
        return ({n: g.detach() for n, g in grads.items()} if first_order else grads), statistics
    # Outside transforms, plain autograd computes the same gradients with less work per
    # operation than torch.func.grad's wrappers (second-order per-task loop on Omniglot, one
    # CPU thread: torch.func.grad takes 12-19% longer, benchmarks/loop_ablation.py).
    differentiable = torch.is_grad_enabled() and not first_order
    with torch.enable_grad():
        leaves = {n: p if p.requires_grad else p.detach().requires_grad_() for n, p in adapted.items()}
        loss, statistics = _support_loss(model, inner.loss, step, leaves, frozen, x, y)
        grads = torch.autograd.grad(loss, list(leaves.values()), create_graph=differentiable,
                                    allow_unused=True)
    return ({n: torch.zeros_like(p) if g is None else g
             for (n, p), g in zip(leaves.items(), grads, strict=True)}, statistics)


class StepOutput(NamedTuple):
    """One inner update: new parameters and optimizer state, and what it observed."""

    params: Params
    state: dict[str, Tensor]
    diagnostics: dict[str, Tensor]
    batch_norm_statistics: dict[str, Tensor]


def inner_update(
    model: nn.Module, params: Params, x: Tensor, y: Tensor, lr: LearningRate, first_order: bool,
    step: int = 0, inner: InnerLoop = PLAIN_SGD, state: dict[str, Tensor] | None = None,
) -> StepOutput:
    """One inner-loop update on the support loss, differentiable unless first order.

    ``step`` is the number of updates ``params`` already had; ``state`` the inner optimizer's
    state after them (``None`` before the first). Returns the updated parameters, the new
    optimizer state, the inner gradient's norm (``inner_grad_norm/step_k``, before clipping)
    and the batch statistics recorded by per-step batch norm, if any.
    """
    adapted, frozen = inner.split(params)
    if state is None:
        state = inner.optimizer.init(adapted)
    if step == 0 and inner.first_step_adapts is not None:
        # The others' gradients are exactly zero (see InnerLoop): differentiate only these.
        live = {n: p for n, p in adapted.items() if n in inner.first_step_adapts}
        still = {n: p for n, p in adapted.items() if n not in inner.first_step_adapts}
        grads, statistics = _support_gradients(model, inner, step, live, {**frozen, **still},
                                                x, y, first_order)
        grads = {n: grads[n] if n in grads else torch.zeros_like(p) for n, p in adapted.items()}
    else:
        grads, statistics = _support_gradients(model, inner, step, adapted, frozen, x, y,
                                               first_order)
    # Observability: the inner gradient's 2-norm per step (vanishing or exploding adaptation).
    norm = torch.sqrt(sum(g.detach().square().sum() for g in grads.values()))
    directions, state = inner.optimizer.direction(
        clip_by_norm(grads, inner.max_grad_norm), state, step)
    rate = learning_rate_at(lr, step)

    def rate_of(name: str) -> float | Tensor:
        return rate[name] if isinstance(rate, dict) else rate

    updated = {name: p - rate_of(name) * directions[name] for name, p in adapted.items()}
    return StepOutput({**frozen, **updated}, state, {f"inner_grad_norm/step_{step}": norm},
                      statistics)


def adapt(
    model: nn.Module,
    params: Params,
    support_x: Tensor,
    support_y: Tensor,
    *,
    steps: int,
    lr: LearningRate,
    first_order: bool = False,
    inner: InnerLoop = PLAIN_SGD,
) -> Params:
    """Fine-tune ``params`` on one task's support set: ``steps`` inner updates of size ``lr``."""
    params, state = inner.starting_point(params), None
    for step in range(steps):
        params, state, _, _ = inner_update(model, params, support_x, support_y, lr, first_order,
                                           step, inner, state)
    return params


def predict(model: nn.Module, params: Params, x: Tensor, steps_taken: int) -> Tensor:
    """Outputs (logits) of ``x`` under parameters that had ``steps_taken`` inner updates."""
    with inner_step(steps_taken):
        return functional_call(model, params, (x,))


def _recomputed_update(model: nn.Module, first_order: bool, step: int, inner: InnerLoop,
                       differentiable: tuple[Any, ...], constant: tuple[Tensor, Tensor]) -> StepOutput:
    params, lr, state = differentiable
    output = inner_update(model, params, *constant, lr, first_order, step, inner, state)
    # Only what the step computed leaves the recomputed function: parameters the inner loop
    # does not adapt (ANIL's body) are inputs, and an input returned unchanged would get a
    # wrong gradient under vmap.
    adapted, _ = inner.split(output.params)
    return output._replace(params=adapted)


def task_query_metrics(
    model: nn.Module,
    params: Params,
    support_x: Tensor,
    support_y: Tensor,
    query_x: Tensor,
    query_y: Tensor,
    *,
    steps: int,
    lr: LearningRate,
    first_order: bool = False,
    every_step: bool = False,
    inner: InnerLoop = PLAIN_SGD,
    checkpoint_inner_steps: bool = False,
) -> TaskResult:
    """Adapt on one task's support set and score its query set.

    Args:
        model: supplies the computation; its own parameter values are not used.
        params: the meta-parameters (initialisation) to adapt from.
        support_x, support_y: ``[N*K, C, H, W]`` and ``[N*K]``.
        query_x, query_y: ``[N*Q, C, H, W]`` and ``[N*Q]``.
        steps: inner gradient steps (may differ between training and testing).
        lr: inner learning rate, or per-parameter per-step rates (see ``LearningRate``).
        first_order: treat inner gradients as constants (FOMAML).
        every_step: also score the query set before adapting and after every step.
        inner: the inner optimizer, gradient clipping, which parameters adapt, the loss.
        checkpoint_inner_steps: keep only each inner step's inputs and run the step again in
            the backward pass (:func:`fewshot.core.recompute.recompute`): memory per step is
            one copy of the parameters instead of the step's activations; same gradients.

    Returns:
        :class:`TaskResult` with ``objective = losses`` and accuracies ``[steps + 1]`` (after
        0..steps steps) if ``every_step``, else ``[1]`` (after the last step).
    """
    losses, accuracies, diagnostics, recorded, state = [], [], {}, {}, None
    params = inner.starting_point(params)
    for step in range(steps + 1):
        if every_step or step == steps:
            with recording_statistics() as query_statistics:
                outputs = predict(model, params, query_x, step)
            merge_statistics(recorded, mean_statistics(query_statistics))
            losses.append(inner.loss(outputs, query_y))
            accuracies.append(accuracy(outputs.detach(), query_y))
        if step == steps:
            break
        if checkpoint_inner_steps:
            update = partial(_recomputed_update, model, first_order, step, inner)
            updated, state, observed, statistics = recompute(
                update, (params, lr, state), (support_x, support_y))
            params = {**params, **updated}
        else:
            params, state, observed, statistics = inner_update(
                model, params, support_x, support_y, lr, first_order, step, inner, state)
        diagnostics.update(observed)
        merge_statistics(recorded, statistics)
    losses = torch.stack(losses)
    return TaskResult(losses, losses.detach(), torch.stack(accuracies), diagnostics,
                      mean_statistics(recorded))
