"""Shared helpers of the float64 equivalence tests: a tiny network, random episodes, the
meta-gradient of an algorithm run by an executor, and the relative error of two gradients.

Test modules in every folder import it by name (``from episodes_for_tests import ...``):
``tests/`` is on ``sys.path`` because ``tests/conftest.py`` lives there.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

from fewshot.algorithms import Algorithm
from fewshot.core.episode import Episodes
from fewshot.core.inner_loop import TaskResult
from fewshot.execution import Executor, Loop, run_meta_batch
from fewshot.models import Conv4, FewShotClassifier


def tiny_model(ways: int = 3, seed: int = 0) -> FewShotClassifier:
    """A float64 Conv4 (4 filters, 16x16 inputs) with non-trivial batch-norm affine values,
    so that adapting them matters."""
    torch.manual_seed(seed)
    model = FewShotClassifier(Conv4(in_channels=1, hidden_channels=4, image_size=16), ways)
    model = model.double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "blocks.1." in name or "blocks.5." in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


def random_episodes(tasks: int = 3, ways: int = 3, shots: int = 2, queries: int = 2,
                    seed: int = 1) -> Episodes:
    """``tasks`` float64 episodes of 16x16 single-channel images, labels in class order."""
    generator = torch.Generator().manual_seed(seed)

    def images(n: int) -> Tensor:
        return torch.rand(tasks, n, 1, 16, 16, generator=generator, dtype=torch.float64)

    def labels(per_class: int) -> Tensor:
        return torch.arange(ways).repeat_interleave(per_class).repeat(tasks, 1)

    return Episodes(images(ways * shots), labels(shots), images(ways * queries), labels(queries))


def relative_error(actual: Sequence[Tensor], expected: Sequence[Tensor]) -> float:
    """``||actual - expected|| / ||expected||`` over all tensors joined."""
    a = torch.cat([g.flatten() for g in actual])
    e = torch.cat([g.flatten() for g in expected])
    return ((a - e).norm() / e.norm()).item()


def meta_gradient(algorithm: Algorithm, network: torch.nn.Module, episodes: Episodes,
                  executor: Executor | None = None, epoch: int = 0,
                  ) -> tuple[Tensor, TaskResult, dict[str, Tensor]]:
    """``(meta-loss, results, gradients)`` of ``algorithm`` (already built on ``network``) on
    ``episodes`` run by ``executor`` (default: the loop). Gradients are by name: the network's
    parameters (``network.*``, unused ones as zeros) and the algorithm's meta-parameters
    (``algorithm.*``, dotted parameter names)."""
    results = run_meta_batch(algorithm, network, episodes, Loop() if executor is None else executor,
                             training=True, epoch=epoch)
    loss = algorithm.meta_loss(results, epoch)
    inputs = {f"network.{n}": p for n, p in network.named_parameters() if p.requires_grad}
    inputs.update({f"algorithm.{n}": p for n, p in algorithm.meta_parameters().items()})
    grads = torch.autograd.grad(loss, list(inputs.values()), allow_unused=True)
    return loss, results, {name: torch.zeros_like(p) if g is None else g
                           for (name, p), g in zip(inputs.items(), grads, strict=True)}


@contextmanager
def at_least_two_threads() -> Iterator[None]:
    """Run with two or more intra-op threads, so that the ``Threads`` executor really spreads
    the tasks over worker threads (on one thread it gives way to the loop); restored after."""
    before = torch.get_num_threads()
    if before < 2:
        torch.set_num_threads(2)
    try:
        yield
    finally:
        torch.set_num_threads(before)
