"""The functional core of MAML: pure functions over name-keyed parameter dicts.

One per-task function adapts the parameters on the support set with ``steps`` of gradient
descent and scores the query set; a meta-batch runs it for every task, either vectorised with
``torch.func.vmap`` or in a plain loop (same result, different speed and memory). The caller
turns the query losses into a meta-loss and calls ``backward`` on it: with
``first_order=False`` the meta-gradient flows through the inner gradients (second-order MAML),
with ``first_order=True`` the inner gradients are treated as constants (first-order MAML).

Nothing here imports Lightning or mutates a module: ``model`` only provides the computation,
``params`` the values (Finn, Abbeel & Levine, "Model-Agnostic Meta-Learning for Fast
Adaptation of Deep Networks", ICML 2017).
"""

from __future__ import annotations

from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from fewshot.episode import Episodes

Params = dict[str, Tensor]
Batching = Literal["vmap", "loop", "auto"]


def cross_entropy_on(model: nn.Module, params: Params, x: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy of ``model`` evaluated with ``params`` on ``x: [B, ...]``, ``y: [B]``."""
    return F.cross_entropy(functional_call(model, params, (x,)), y)


def inner_sgd_step(
    model: nn.Module, params: Params, x: Tensor, y: Tensor, lr: float, first_order: bool
) -> Params:
    """One step of gradient descent on the support loss, differentiable unless first order."""
    grads = grad(partial(cross_entropy_on, model))(params, x, y)
    if first_order:
        grads = {name: g.detach() for name, g in grads.items()}
    return {name: p - lr * grads[name] for name, p in params.items()}


def adapt(
    model: nn.Module,
    params: Params,
    support_x: Tensor,
    support_y: Tensor,
    *,
    steps: int,
    lr: float,
    first_order: bool = False,
) -> Params:
    """Fine-tune ``params`` on one task's support set: ``steps`` SGD steps of size ``lr``."""
    for _ in range(steps):
        params = inner_sgd_step(model, params, support_x, support_y, lr, first_order)
    return params


def _loss_and_accuracy(model: nn.Module, params: Params, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    logits = functional_call(model, params, (x,))
    accuracy = (logits.argmax(dim=-1) == y).float().mean()
    return F.cross_entropy(logits, y), accuracy


def task_query_metrics(
    model: nn.Module,
    params: Params,
    support_x: Tensor,
    support_y: Tensor,
    query_x: Tensor,
    query_y: Tensor,
    *,
    steps: int,
    lr: float,
    first_order: bool = False,
    every_step: bool = False,
) -> tuple[Tensor, Tensor]:
    """Adapt on one task's support set and score its query set.

    Args:
        model: supplies the computation; its own parameter values are not used.
        params: the meta-parameters (initialisation) to adapt from.
        support_x, support_y: ``[N*K, C, H, W]`` and ``[N*K]``.
        query_x, query_y: ``[N*Q, C, H, W]`` and ``[N*Q]``.
        steps: inner gradient steps (may differ between training and testing).
        lr: inner learning rate.
        first_order: treat inner gradients as constants (FOMAML).
        every_step: also score the query set before adapting and after every step.

    Returns:
        ``(losses, accuracies)``, each ``[steps + 1]`` (after 0..steps steps) if ``every_step``,
        else ``[1]`` (after the last step).
    """
    losses, accuracies = [], []
    for step in range(steps + 1):
        if every_step or step == steps:
            loss, accuracy = _loss_and_accuracy(model, params, query_x, query_y)
            losses.append(loss)
            accuracies.append(accuracy)
        if step < steps:
            params = inner_sgd_step(model, params, support_x, support_y, lr, first_order)
    return torch.stack(losses), torch.stack(accuracies)


# On CPU, vmap wins while tasks are tiny (per-call overhead dominates) and the loop wins once
# each task has enough images to keep the cores busy (benchmarks/meta_step.py: Omniglot 5-way
# 1-shot with 1 query per class, 10 images a task, vmap 1.4x faster; with 5 queries per class,
# 30 images a task, the loop 1.2x faster).
CPU_VMAP_MAX_IMAGES_PER_TASK = 16


def resolve_batching(
    batching: Batching, device: torch.device, images_per_task: int = 0
) -> Literal["vmap", "loop"]:
    """``auto`` picks the strategy measured faster on the device for tasks of this size.

    GPUs: always vmap, which fills the device with all tasks at once. CPU: vmap for small tasks
    (at most ``CPU_VMAP_MAX_IMAGES_PER_TASK`` support + query images), the loop otherwise. The
    choice depends only on the configuration, never on a timing, so runs stay reproducible.
    """
    if batching == "auto":
        if device.type == "cuda" or images_per_task <= CPU_VMAP_MAX_IMAGES_PER_TASK:
            return "vmap"
        return "loop"
    if batching not in ("vmap", "loop"):
        raise ValueError(f"batching must be 'vmap', 'loop' or 'auto', got {batching!r}")
    return batching


def meta_batch_metrics(
    model: nn.Module,
    params: Params,
    episodes: Episodes,
    *,
    steps: int,
    lr: float,
    first_order: bool = False,
    every_step: bool = False,
    batching: Batching = "auto",
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Run :func:`task_query_metrics` on every task of a meta-batch.

    Args:
        episodes: ``T`` tasks; see :class:`~fewshot.episode.Episodes` for shapes.
        batching: ``vmap`` vectorises over tasks, ``loop`` runs them one by one, ``auto`` picks
            by device (:func:`resolve_batching`). Both give the same values and gradients.
        chunk_size: with ``vmap``, vectorise this many tasks at a time to bound memory.
        Other arguments as in :func:`task_query_metrics`.

    Returns:
        ``(losses, accuracies)``, each ``[T, steps + 1]`` if ``every_step`` else ``[T, 1]``.

    Example:
        >>> import torch
        >>> from fewshot.models import Conv4, FewShotClassifier
        >>> model = FewShotClassifier(Conv4(1, 8, 28), ways=5)
        >>> params = dict(model.named_parameters())
        >>> episodes = Episodes(torch.rand(2, 5, 1, 28, 28), torch.arange(5).repeat(2, 1),
        ...                     torch.rand(2, 10, 1, 28, 28), torch.arange(5).repeat(2, 2))
        >>> losses, accuracies = meta_batch_metrics(model, params, episodes, steps=1, lr=0.4)
        >>> losses.mean().backward()  # second-order meta-gradient in p.grad
        >>> tuple(losses.shape)
        (2, 1)
    """
    per_task = partial(
        task_query_metrics, model, params,
        steps=steps, lr=lr, first_order=first_order, every_step=every_step,
    )
    images_per_task = episodes.support_x.shape[1] + episodes.query_x.shape[1]
    if resolve_batching(batching, episodes.support_x.device, images_per_task) == "vmap":
        return vmap(per_task, chunk_size=chunk_size)(*episodes)
    results = [per_task(*task) for task in zip(*episodes, strict=True)]
    losses, accuracies = zip(*results, strict=True)
    return torch.stack(losses), torch.stack(accuracies)
