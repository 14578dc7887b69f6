"""The same MAML meta-step written with learn2learn and with higher, for benchmarks/meta_step.py.

Both run on a stock ``nn.Module``: fewshot's Conv4 with ``torch.nn.BatchNorm2d`` (training mode,
no running statistics, so every forward pass normalises with its own batch as fewshot does).
Each follows its library's own MAML example: a per-task loop that adapts a clone, then calls
``backward`` on the task's query loss, the meta-gradient accumulating in ``.grad``; the sum is
divided by the number of tasks, giving the gradient of the mean query loss.
:func:`learn2learn_threaded_step` is the best a learn2learn user can do on a multi-core CPU: the
same loop with the tasks split over worker threads of one intra-op thread each.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewshot.core.episode import Episodes
from fewshot.models import Conv4, FewShotClassifier


def stock_batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, track_running_stats=False)


def peer_model(model: FewShotClassifier, in_channels: int, hidden: int, size: int) -> FewShotClassifier:
    """A copy of fewshot's ``model`` whose batch norms are ``torch.nn.BatchNorm2d``, same weights."""
    peer = FewShotClassifier(Conv4(in_channels, hidden, size, norm_layer=stock_batch_norm),
                             model.head.out_features)
    peer.load_state_dict(model.state_dict())
    return peer.to(next(model.parameters()))


def _mean_of_accumulated(model: nn.Module, tasks: int) -> list[Tensor]:
    grads = [p.grad / tasks for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return grads


def learn2learn_step(maml_module: ModuleType, model: nn.Module, episodes: Episodes, steps: int,
                     lr: float, first_order: bool) -> list[Tensor]:
    """learn2learn 0.2.0: ``MAML(model).clone()``, ``adapt(loss)`` per inner step."""
    maml = maml_module.MAML(model, lr=lr, first_order=first_order)
    model.zero_grad(set_to_none=True)
    for sx, sy, qx, qy in zip(*episodes, strict=True):
        learner = maml.clone()
        for _ in range(steps):
            learner.adapt(F.cross_entropy(learner(sx), sy))
        F.cross_entropy(learner(qx), qy).backward()
    return _mean_of_accumulated(model, episodes.num_tasks)


_pools: dict[int, ThreadPoolExecutor] = {}


def _single_threaded_pool(workers: int) -> ThreadPoolExecutor:
    """``workers`` threads of one intra-op thread each, as a learn2learn user would set up."""
    if workers not in _pools:
        intra_op = torch.get_num_threads()
        started = threading.Barrier(workers + 1)

        def one_thread() -> None:
            torch.set_num_threads(1)  # this thread's own OpenMP setting
            started.wait(timeout=60)

        pool = ThreadPoolExecutor(workers, thread_name_prefix="learn2learn-tasks")
        for _ in range(workers):
            pool.submit(one_thread)
        started.wait(timeout=60)
        torch.set_num_threads(intra_op)  # set_num_threads(1) also lowered the process default
        _pools[workers] = pool
    return _pools[workers]


def learn2learn_threaded_step(maml_module: ModuleType, model: nn.Module, episodes: Episodes,
                              steps: int, lr: float, first_order: bool,
                              workers: int | None = None) -> list[Tensor]:
    """learn2learn's loop, best effort on a multi-core CPU: the tasks split into ``workers``
    contiguous shares (default: one per intra-op thread), each share run by its own thread with
    one intra-op thread, exactly :func:`learn2learn_step`'s per-task code (clones adapted,
    ``backward`` per task; autograd's gradient accumulation is locked, so ``.grad`` sums the
    threads' tasks)."""
    workers = min(workers or torch.get_num_threads(), episodes.num_tasks)
    maml = maml_module.MAML(model, lr=lr, first_order=first_order)
    model.zero_grad(set_to_none=True)
    bounds = [episodes.num_tasks * i // workers for i in range(workers + 1)]

    def share(start: int, stop: int) -> None:
        for sx, sy, qx, qy in zip(*(t[start:stop] for t in episodes), strict=True):
            learner = maml.clone()
            for _ in range(steps):
                learner.adapt(F.cross_entropy(learner(sx), sy))
            F.cross_entropy(learner(qx), qy).backward()

    pool = _single_threaded_pool(workers)
    for done in [pool.submit(share, bounds[i], bounds[i + 1]) for i in range(workers)]:
        done.result()
    return _mean_of_accumulated(model, episodes.num_tasks)


def higher_step(higher: ModuleType, model: nn.Module, episodes: Episodes, steps: int,
                lr: float, first_order: bool) -> list[Tensor]:
    """higher 0.2.1: ``innerloop_ctx`` with a differentiable SGD, ``copy_initial_weights=False``
    so the meta-gradient reaches ``model`` (higher's MAML example). Second order only: higher's
    ``track_higher_grads=False`` cuts the graph to the initial weights instead of giving FOMAML."""
    if first_order:
        raise ValueError("higher has no first-order MAML mode")
    inner_optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    model.zero_grad(set_to_none=True)
    for sx, sy, qx, qy in zip(*episodes, strict=True):
        with higher.innerloop_ctx(model, inner_optimizer, copy_initial_weights=False) as (fmodel, diffopt):
            for _ in range(steps):
                diffopt.step(F.cross_entropy(fmodel(sx), sy))
            F.cross_entropy(fmodel(qx), qy).backward()
    return _mean_of_accumulated(model, episodes.num_tasks)
