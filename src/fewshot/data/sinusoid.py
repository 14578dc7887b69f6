"""Few-shot sine-wave regression, MAML's first experiment (Finn et al., 2017, section 5.1).

A task is one sine wave ``y = amplitude * sin(x - phase)`` with the amplitude drawn uniformly
from ``[0.1, 5.0]`` and the phase from ``[0, pi]``; its ``K`` support and ``Q`` query points
have inputs drawn uniformly from ``[-5, 5]``, and the loss is the mean squared error.

As with the image datasets (:mod:`fewshot.data.episodes`), every task is a pure function of
``(seed, stream, index)``: training meta-batch ``i`` is the same whoever asks for it, and the
evaluation tasks are fixed by the seed. Tasks come as :class:`~fewshot.core.episode.Episodes`
with one "way": inputs and targets are float ``[T, K, 1]`` (support) and ``[T, Q, 1]`` (query).
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from fewshot.core.episode import Episodes
from fewshot.data.episodes import TRAIN_STREAM, shard, stack_tasks, task_rng

__all__ = ["PAPER", "SineWave", "Sinusoid", "SinusoidEpisodes", "SinusoidMetaBatches"]

Task = tuple[Tensor, Tensor, Tensor, Tensor]


class SineWave(NamedTuple):
    """One task's function: ``y = amplitude * sin(x - phase)``."""

    amplitude: float
    phase: float

    def __call__(self, x: Tensor) -> Tensor:
        return self.amplitude * torch.sin(x - self.phase)


class Sinusoid(NamedTuple):
    """The distribution of sine-wave tasks (the paper's ranges by default).

    Example:
        >>> from fewshot.data.episodes import task_rng
        >>> wave, (support_x, support_y, query_x, query_y) = Sinusoid().task(task_rng(0, 2, 0), 5, 10)
        >>> support_x.shape, query_y.shape, 0.1 <= wave.amplitude <= 5.0
        (torch.Size([5, 1]), torch.Size([10, 1]), True)
    """

    amplitude: tuple[float, float] = (0.1, 5.0)
    phase: tuple[float, float] = (0.0, math.pi)
    inputs: tuple[float, float] = (-5.0, 5.0)

    def wave(self, rng: np.random.Generator) -> SineWave:
        """A sine wave drawn from the distribution."""
        return SineWave(float(rng.uniform(*self.amplitude)), float(rng.uniform(*self.phase)))

    def task(self, rng: np.random.Generator, shots: int, queries: int) -> tuple[SineWave, Task]:
        """A wave and its ``shots`` support and ``queries`` query points, float32 ``[n, 1]``."""
        wave = self.wave(rng)
        x = torch.from_numpy(rng.uniform(*self.inputs, size=(shots + queries, 1))).float()
        y = wave(x)
        return wave, (x[:shots], y[:shots], x[shots:], y[shots:])


# The paper's task distribution (section 5.1).
PAPER = Sinusoid()


def _check_sizes(shots: int, queries: int, count: int, what: str) -> None:
    if shots < 1 or queries < 1:
        raise ValueError(f"sine-wave tasks need shots >= 1 and queries >= 1, got shots={shots}, "
                         f"queries={queries}")
    if count < 1:
        raise ValueError(f"{what} must be >= 1, got {count}")


class SinusoidMetaBatches(Dataset[Episodes]):
    """Training meta-batches of sine-wave tasks: item ``i`` is the meta-batch of global step ``i``.

    Args:
        shots, queries: support and query points per task.
        tasks_per_batch: tasks per meta-batch (25 in the paper).
        seed: with the step, determines every task.
        length: steps available (the DataLoader's sampler picks which ones).
        rank, world_size: each process draws its own contiguous share of the tasks
            (:func:`fewshot.data.episodes.shard`).
        distribution: the task distribution (the paper's by default).
    """

    def __init__(self, shots: int, queries: int, tasks_per_batch: int, seed: int, length: int,
                 rank: int = 0, world_size: int = 1, distribution: Sinusoid = PAPER) -> None:
        _check_sizes(shots, queries, tasks_per_batch, "meta_batch_size")
        self.shots, self.queries, self.seed, self.length = shots, queries, seed, length
        self.distribution = distribution
        self.tasks = shard(tasks_per_batch, rank, world_size, "meta_batch_size")

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, step: int) -> Episodes:
        return stack_tasks([self.distribution.task(task_rng(self.seed, TRAIN_STREAM, step, j),
                                                   self.shots, self.queries)[1]
                            for j in self.tasks])


class SinusoidEpisodes(Dataset[Episodes]):
    """A fixed set of ``episodes`` evaluation tasks, served ``tasks_per_batch`` at a time.

    Task ``j`` depends only on ``(seed, stream, j)``, whatever the batching or world size (the
    same contract as :class:`fewshot.data.episodes.EvaluationEpisodes`).
    """

    def __init__(self, shots: int, queries: int, episodes: int, tasks_per_batch: int, seed: int,
                 stream: int, split: str, rank: int = 0, world_size: int = 1,
                 distribution: Sinusoid = PAPER) -> None:
        _check_sizes(shots, queries, episodes, f"{split}_episodes")
        if tasks_per_batch < 1:
            raise ValueError(f"eval_batch_size must be >= 1, got {tasks_per_batch}")
        self.shots, self.queries, self.episodes = shots, queries, episodes
        self.tasks_per_batch, self.seed, self.stream = tasks_per_batch, seed, stream
        self.distribution = distribution
        self.share = shard(episodes, rank, world_size, f"{split}_episodes")

    def __len__(self) -> int:
        return -(-len(self.share) // self.tasks_per_batch)

    def wave_and_task(self, index: int) -> tuple[SineWave, Task]:
        """Evaluation task ``index`` and the sine wave behind it (for pictures)."""
        return self.distribution.task(task_rng(self.seed, self.stream, index), self.shots,
                                      self.queries)

    def task(self, index: int) -> Task:
        return self.wave_and_task(index)[1]

    def fingerprint(self) -> str:
        """SHA-256 of every task's wave and points: equal fingerprints, equal test tasks."""
        digest = hashlib.sha256()
        for index in range(self.episodes):
            wave, task = self.wave_and_task(index)
            digest.update(json.dumps([wave.amplitude, wave.phase]).encode())
            for part in task:
                digest.update(part.numpy().tobytes())
        return digest.hexdigest()

    def __getitem__(self, index: int) -> Episodes:
        if not 0 <= index < len(self):
            raise IndexError(index)
        share = self.share[index * self.tasks_per_batch:(index + 1) * self.tasks_per_batch]
        return stack_tasks([self.task(j) for j in share])
