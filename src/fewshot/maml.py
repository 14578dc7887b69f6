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

from collections.abc import Mapping
from functools import partial
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from fewshot.episode import Episodes
from fewshot.inner_optimizers import SGD, InnerOptimizer, clip_by_norm
from fewshot.memory import measured_chunk_size, recompute
from fewshot.models.batch_norm import inside_functorch_transform
from fewshot.models.inner_step import (
    inner_step,
    mean_statistics,
    merge_statistics,
    recording_statistics,
)
from fewshot.task_threads import default_workers, run_tasks_on_threads, tasks_on_threads_supported

Params = dict[str, Tensor]
Batching = Literal["vmap", "loop", "threads", "auto"]
# A float, or per parameter name the rates of every inner step ``[steps]`` (MAML++ LSLR).
LearningRate = float | Mapping[str, Tensor]


class QueryMetrics(NamedTuple):
    """What adapting and scoring produce: query ``losses`` and ``accuracies`` after each scored
    step, and detached ``statistics`` by name: inner gradient norms per step, and the batch
    statistics that per-step running batch norm recorded."""

    losses: Tensor
    accuracies: Tensor
    statistics: dict[str, Tensor]


def learning_rate_at(lr: LearningRate, step: int) -> float | dict[str, Tensor]:
    """The inner learning rate(s) of ``step``; steps past the learned ones reuse the last."""
    if isinstance(lr, Mapping):
        return {name: rates[min(step, rates.shape[0] - 1)] for name, rates in lr.items()}
    return lr


def cross_entropy_on(model: nn.Module, params: Params, x: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy of ``model`` evaluated with ``params`` on ``x: [B, ...]``, ``y: [B]``."""
    return F.cross_entropy(functional_call(model, params, (x,)), y)


def _support_loss(model: nn.Module, step: int, adapted: Params, frozen: Params, x: Tensor,
                  y: Tensor):
    # Statistics recorded inside ``grad`` must leave it as auxiliary outputs, not side effects.
    with recording_statistics() as recorded, inner_step(step, on_support=True):
        loss = cross_entropy_on(model, {**frozen, **adapted}, x, y)
    return loss, mean_statistics(recorded)


def _support_gradients(model: nn.Module, step: int, adapted: Params, frozen: Params, x: Tensor,
                       y: Tensor, first_order: bool) -> tuple[Params, dict[str, Tensor]]:
    """Gradients of the support loss with respect to ``adapted``, differentiable (second order)
    unless ``first_order`` or gradients are off, and the statistics recorded on the way."""
    if inside_functorch_transform():  # under vmap (and recompute's vjp): torch.func.grad
        grads, statistics = grad(partial(_support_loss, model, step), has_aux=True)(
            adapted, frozen, x, y)
        return ({n: g.detach() for n, g in grads.items()} if first_order else grads), statistics
    # Outside transforms, plain autograd computes the same gradients with less work per
    # operation than torch.func.grad's wrappers (second-order per-task loop on Omniglot, one
    # CPU thread: torch.func.grad takes 12-19% longer, benchmarks/loop_ablation.py).
    differentiable = torch.is_grad_enabled() and not first_order
    with torch.enable_grad():
        leaves = {n: p if p.requires_grad else p.detach().requires_grad_() for n, p in adapted.items()}
        loss, statistics = _support_loss(model, step, leaves, frozen, x, y)
        grads = torch.autograd.grad(loss, list(leaves.values()), create_graph=differentiable,
                                    allow_unused=True)
    return ({n: torch.zeros_like(p) if g is None else g
             for (n, p), g in zip(leaves.items(), grads, strict=True)}, statistics)


class InnerLoop(NamedTuple):
    """How the inner loop updates parameters, beyond steps and learning rate.

    ``optimizer``: the differentiable transform from gradient to direction (SGD by default,
    see :mod:`fewshot.inner_optimizers`); ``max_grad_norm``: clip each task's inner gradient
    to this 2-norm; ``adapted``: names of the parameters the inner loop updates (``None``: all;
    ANIL adapts the head only, the rest stays at the meta-parameters).
    """

    optimizer: InnerOptimizer = SGD()
    max_grad_norm: float | None = None
    adapted: frozenset[str] | None = None

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


def inner_update(
    model: nn.Module, params: Params, x: Tensor, y: Tensor, lr: LearningRate, first_order: bool,
    step: int = 0, inner: InnerLoop = PLAIN_SGD, state: dict[str, Tensor] | None = None,
) -> tuple[Params, dict[str, Tensor], dict[str, Tensor]]:
    """One inner-loop update on the support loss, differentiable unless first order.

    ``step`` is the number of updates ``params`` already had; ``state`` the inner optimizer's
    state after them (``None`` before the first). Returns the updated parameters, the new
    optimizer state and detached statistics: the inner gradient's norm
    (``inner_grad_norm/step_k``, before clipping) and the batch statistics recorded by
    per-step batch norm, if any.
    """
    adapted, frozen = inner.split(params)
    if state is None:
        state = inner.optimizer.init(adapted)
    grads, statistics = _support_gradients(model, step, adapted, frozen, x, y, first_order)
    # Observability: the inner gradient's 2-norm per step (vanishing or exploding adaptation).
    norm = torch.sqrt(sum(g.detach().square().sum() for g in grads.values()))
    statistics = {**statistics, f"inner_grad_norm/step_{step}": norm}
    directions, state = inner.optimizer.direction(
        clip_by_norm(grads, inner.max_grad_norm), state, step)
    rate = learning_rate_at(lr, step)

    def rate_of(name: str) -> float | Tensor:
        return rate[name] if isinstance(rate, dict) else rate

    updated = {name: p - rate_of(name) * directions[name] for name, p in adapted.items()}
    return {**frozen, **updated}, state, statistics


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
    state = None
    for step in range(steps):
        params, state, _ = inner_update(model, params, support_x, support_y, lr, first_order,
                                        step, inner, state)
    return params


def predict(model: nn.Module, params: Params, x: Tensor, steps_taken: int) -> Tensor:
    """Logits of ``x`` under parameters that had ``steps_taken`` inner updates."""
    with inner_step(steps_taken):
        return functional_call(model, params, (x,))


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
) -> QueryMetrics:
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
        inner: the inner optimizer, gradient clipping and which parameters adapt.
        checkpoint_inner_steps: keep only each inner step's inputs and run the step again in
            the backward pass (:func:`fewshot.memory.recompute`): memory per step is one copy
            of the parameters instead of the step's activations; same gradients.

    Returns:
        :class:`QueryMetrics` with losses and accuracies ``[steps + 1]`` (after 0..steps
        steps) if ``every_step``, else ``[1]`` (after the last step).
    """
    losses, accuracies, recorded, state = [], [], {}, None
    for step in range(steps + 1):
        if every_step or step == steps:
            with recording_statistics() as query_statistics:
                logits = predict(model, params, query_x, step)
            merge_statistics(recorded, mean_statistics(query_statistics))
            losses.append(F.cross_entropy(logits, query_y))
            accuracies.append((logits.argmax(dim=-1) == query_y).float().mean())
        if step < steps and checkpoint_inner_steps:
            params, state, statistics = recompute(
                lambda d, c, step=step: inner_update(model, d[0], *c, d[1], first_order, step,
                                                     inner, d[2]),
                (params, lr, state), (support_x, support_y))
            merge_statistics(recorded, statistics)
        elif step < steps:
            params, state, statistics = inner_update(
                model, params, support_x, support_y, lr, first_order, step, inner, state)
            merge_statistics(recorded, statistics)
    return QueryMetrics(torch.stack(losses), torch.stack(accuracies), mean_statistics(recorded))


# On one CPU thread, vmap wins while tasks are tiny (per-call overhead dominates) and the loop
# wins once each task has enough images to keep the core busy (benchmarks/meta_step.py: Omniglot
# 5-way 1-shot with 1 query per class, 10 images a task, vmap 1.4x faster; with 5 queries per
# class, 30 images a task, the loop 1.2x faster). With more threads, whole tasks per thread
# beat both (fewshot.task_threads).
CPU_VMAP_MAX_IMAGES_PER_TASK = 16


def _one_thread_choice(images_per_task: int) -> Literal["vmap", "loop"]:
    return "vmap" if images_per_task <= CPU_VMAP_MAX_IMAGES_PER_TASK else "loop"


def resolve_batching(
    batching: Batching, device: torch.device, images_per_task: int = 0
) -> Literal["vmap", "loop", "threads"]:
    """``auto`` picks the strategy measured fastest on the device for tasks of this size.

    GPUs: always vmap, which fills the device with all tasks at once. CPU with more than one
    intra-op thread (``torch.get_num_threads()``): ``threads``, the tasks spread over worker
    threads with one core each (:mod:`fewshot.task_threads`). One CPU thread: vmap for small
    tasks (at most ``CPU_VMAP_MAX_IMAGES_PER_TASK`` support + query images), the loop
    otherwise. The choice depends only on the configuration, never on a timing, so runs stay
    reproducible.
    """
    if batching == "auto":
        if device.type == "cuda":
            return "vmap"
        if device.type == "cpu" and default_workers() > 1:
            return "threads"
        return _one_thread_choice(images_per_task)
    if batching not in ("vmap", "loop", "threads"):
        raise ValueError(f"batching must be 'vmap', 'loop', 'threads' or 'auto', got {batching!r}")
    return batching


def meta_batch_metrics(
    model: nn.Module,
    params: Params,
    episodes: Episodes,
    *,
    steps: int,
    lr: LearningRate,
    first_order: bool = False,
    every_step: bool = False,
    inner: InnerLoop = PLAIN_SGD,
    batching: Batching = "auto",
    chunk_size: int | Literal["auto"] | None = None,
    memory_budget: float | None = None,
    checkpoint_inner_steps: bool = False,
) -> QueryMetrics:
    """Run :func:`task_query_metrics` on every task of a meta-batch.

    Args:
        episodes: ``T`` tasks; see :class:`~fewshot.episode.Episodes` for shapes.
        batching: ``vmap`` vectorises over tasks, ``loop`` runs them one by one, ``threads``
            spreads them over CPU worker threads (:mod:`fewshot.task_threads`), ``auto`` picks
            by device (:func:`resolve_batching`). All give the same values and gradients.
            ``threads`` computes the meta-gradient once (no ``create_graph`` through it, no
            second backward pass) and gives way (to the loop, or under ``auto`` to the
            one-thread choice) where it cannot run or would leave cores idle: off the CPU,
            fewer tasks than threads, per-thread state around the call (``torch.func``
            transforms, autocast, dispatch modes, saved-tensor hooks), a ``memory_budget`` or
            ``checkpoint_inner_steps``, inputs that need gradients other than ``params`` and
            ``lr``.
        chunk_size: with ``vmap``, vectorise this many tasks at a time (bounds the memory of
            the vectorised computation, not of the graph kept for the backward pass). With a
            ``memory_budget``: the tasks per recomputed chunk; ``auto`` or ``None`` derive it
            from the budget.
        memory_budget: bytes the meta-step may use beyond what is already allocated. The tasks
            then run in chunks, each recomputed in the backward pass, so only one chunk's graph
            is alive at a time; the chunk size comes from the peak memory of two tasks, measured
            once per configuration (CUDA; CPU on Linux; elsewhere one chunk), see
            :mod:`fewshot.memory`. Same values and gradients, about one more forward pass
            (none when the budget holds all tasks at once).
        Other arguments as in :func:`task_query_metrics`.

    Returns:
        :class:`QueryMetrics`: losses and accuracies ``[T, steps + 1]`` if ``every_step`` else
        ``[T, 1]``; recorded batch statistics averaged over the tasks.

    Example:
        >>> import torch
        >>> from fewshot.models import Conv4, FewShotClassifier
        >>> model = FewShotClassifier(Conv4(1, 8, 28), ways=5)
        >>> params = dict(model.named_parameters())
        >>> episodes = Episodes(torch.rand(2, 5, 1, 28, 28), torch.arange(5).repeat(2, 1),
        ...                     torch.rand(2, 10, 1, 28, 28), torch.arange(5).repeat(2, 2))
        >>> losses, accuracies, _ = meta_batch_metrics(model, params, episodes, steps=1, lr=0.4)
        >>> losses.mean().backward()  # second-order meta-gradient in p.grad
        >>> tuple(losses.shape)
        (2, 1)
    """
    options = dict(steps=steps, first_order=first_order, every_step=every_step, inner=inner,
                   checkpoint_inner_steps=checkpoint_inner_steps)
    images_per_task = episodes.support_x.shape[1] + episodes.query_x.shape[1]
    strategy = resolve_batching(batching, episodes.support_x.device, images_per_task)
    if strategy == "threads" and not _threads_can_run(model, params, episodes, memory_budget,
                                                      checkpoint_inner_steps):
        strategy = "loop" if batching == "threads" else _one_thread_choice(images_per_task)
    if memory_budget is not None:
        metrics = _within_budget(model, params, lr, episodes, strategy, memory_budget,
                                 chunk_size, options)
    elif chunk_size == "auto":
        raise ValueError("chunk_size='auto' derives the chunk from a memory_budget: set one")
    else:
        metrics = _all_tasks(model, params, lr, episodes, strategy, chunk_size, options)
    losses, accuracies, statistics = metrics
    return QueryMetrics(losses, accuracies, {k: v.mean(dim=0) for k, v in statistics.items()})


def _threads_can_run(model: nn.Module, params: Params, episodes: Episodes,
                     memory_budget: float | None, checkpoint_inner_steps: bool) -> bool:
    """Whether the tasks may go to worker threads (:mod:`fewshot.task_threads`)."""
    if memory_budget is not None or checkpoint_inner_steps:
        return False  # both recompute under torch.func.vjp, whose state is per thread
    if any(t.requires_grad for t in episodes):
        return False  # the workers pass gradients to the parameters and learning rates only
    if any(p.requires_grad and name not in params for name, p in model.named_parameters()):
        return False  # ... not to module parameters left out of ``params``
    return tasks_on_threads_supported(episodes.support_x.device, episodes.num_tasks)


def _all_tasks(model: nn.Module, params: Params, lr: LearningRate, episodes: Episodes,
               strategy: str, chunk_size: int | None, options: dict) -> QueryMetrics:
    """Per-task metrics ``[T, ...]``, statistics not yet averaged over tasks."""
    per_task = partial(task_query_metrics, model, params, lr=lr, **options)
    if strategy == "vmap":
        return QueryMetrics(*vmap(per_task, chunk_size=chunk_size)(*episodes))
    if strategy == "threads":
        return run_tasks_on_threads(
            lambda own_model, differentiable, task: task_query_metrics(
                own_model, differentiable[0], *task, lr=differentiable[1], **options),
            model, (params, lr), episodes)
    results = [per_task(*task) for task in zip(*episodes, strict=True)]
    return QueryMetrics(torch.stack([r.losses for r in results]),
                        torch.stack([r.accuracies for r in results]),
                        {k: torch.stack([r.statistics[k] for r in results]) for k in results[0].statistics})


def _within_budget(model: nn.Module, params: Params, lr: LearningRate, episodes: Episodes,
                   strategy: str, budget: float, chunk_size: int | str | None,
                   options: dict) -> QueryMetrics:
    """:func:`_all_tasks` in chunks recomputed in the backward pass (see ``memory_budget``)."""
    def run(differentiable, tasks) -> QueryMetrics:
        return _all_tasks(model, *differentiable, Episodes(*tasks), strategy, None, options)

    if chunk_size in (None, "auto"):
        def first_tasks(n: int) -> None:  # the forward and backward pass of n tasks
            metrics = run((params, lr), tuple(t[:n] for t in episodes))
            wanted = [p for p in params.values() if p.requires_grad]
            if wanted and metrics.losses.requires_grad:
                torch.autograd.grad(metrics.losses.sum(), wanted, allow_unused=True)

        key = (strategy, type(model).__name__, tuple((n, p.shape, p.dtype) for n, p in params.items()),
               tuple(t.shape[1:] for t in episodes), episodes.support_x.device,
               torch.is_grad_enabled(), tuple(sorted(options.items(), key=lambda kv: kv[0])))
        chunk_size = measured_chunk_size(key, first_tasks, episodes.support_x.device, budget,
                                         episodes.num_tasks)
    if chunk_size >= episodes.num_tasks:  # everything fits: recomputing would only cost time
        return run((params, lr), tuple(episodes))
    chunks = [recompute(run, (params, lr), tuple(t[start:start + chunk_size] for t in episodes))
              for start in range(0, episodes.num_tasks, chunk_size)]
    return QueryMetrics(torch.cat([c.losses for c in chunks]),
                        torch.cat([c.accuracies for c in chunks]),
                        {k: torch.cat([c.statistics[k] for c in chunks]) for k in chunks[0].statistics})
