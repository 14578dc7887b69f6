"""Episode sampling: N-way K-shot tasks drawn from a dataset of labelled classes.

Every task is a pure function of ``(seed, stream, index)``: training meta-batch ``i`` is the
same whoever asks for it and whenever, so a resumed run sees exactly the tasks an
uninterrupted run would have seen, and evaluation episodes are fixed by their seed whatever the
batching or the number of DataLoader workers.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from fewshot.core.episode import Episodes

# Distinct random streams, so training and evaluation never share tasks by accident of seeds.
TRAIN_STREAM, VALIDATION_STREAM, TEST_STREAM = 0, 1, 2
# Augmentation draws from its own stream: switching it on changes how a meta-batch's images
# look, never which classes and images it holds.
TRAIN_AUGMENTATION_STREAM = 3

# Takes float images [n, C, H, W] of one task and a generator; returns them transformed.
TaskAugmentation = Callable[[Tensor, np.random.Generator], Tensor]


class ClassImages(Protocol):
    """What the sampler needs of a dataset split (see :class:`fewshot.data.omniglot.Omniglot`)."""

    classes: list[str]
    class_sizes: list[int]

    def load_class_images(self, class_id: int, image_indices: Sequence[int]) -> Tensor:
        """Float images ``[k, C, H, W]`` of one class."""
        ...


def check_task_size(dataset: ClassImages, split: str, ways: int, shots: int, queries: int) -> None:
    """Fail early, naming the split and the numbers, if the data cannot supply such tasks."""
    if ways < 2 or shots < 1 or queries < 1:
        raise ValueError(
            f"tasks need ways >= 2, shots >= 1 and queries >= 1, "
            f"got ways={ways}, shots={shots}, queries={queries}"
        )
    if ways > len(dataset.classes):
        raise ValueError(
            f"{ways}-way tasks need {ways} classes, but the {split!r} split has only "
            f"{len(dataset.classes)}"
        )
    needed = shots + queries
    smallest = int(np.argmin(dataset.class_sizes))
    if dataset.class_sizes[smallest] < needed:
        # Every short class at once, smallest first, so one run shows everything to fix.
        short = sorted((n, name) for name, n in zip(dataset.classes, dataset.class_sizes,
                                                    strict=True) if n < needed)
        others = ""
        if len(short) > 1:
            listed = ", ".join(f"{name!r} ({n})" for n, name in short[:20])
            more = f" and {len(short) - 20} more" if len(short) > 20 else ""
            others = f"; {len(short)} classes have fewer than {needed}: {listed}{more}"
        raise ValueError(
            f"{shots} support + {queries} query images per class need {needed} images, but class "
            f"{dataset.classes[smallest]!r} of the {split!r} split has only "
            f"{dataset.class_sizes[smallest]}{others}"
        )


def draw_task(dataset: ClassImages, ways: int, shots: int, queries: int,
              rng: np.random.Generator) -> list[tuple[int, list[int]]]:
    """Which images form one N-way task: ``[(class id, [image indices]), ...]``, the first
    ``shots`` indices of each class for the support set, the rest for the queries."""
    class_ids = rng.choice(len(dataset.classes), size=ways, replace=False)
    return [(int(c), rng.choice(dataset.class_sizes[c], size=shots + queries, replace=False).tolist())
            for c in class_ids]


def sample_task(
    dataset: ClassImages, ways: int, shots: int, queries: int, rng: np.random.Generator
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One N-way task: ``([N*K, C, H, W], [N*K], [N*Q, C, H, W], [N*Q])``, labels ``0..N-1``.

    Support and query images are disjoint draws (without replacement) from each class.
    """
    support, query = [], []
    for class_id, picks in draw_task(dataset, ways, shots, queries, rng):
        images = dataset.load_class_images(class_id, picks)
        support.append(images[:shots])
        query.append(images[shots:])
    labels = torch.arange(ways)
    return (
        torch.cat(support), labels.repeat_interleave(shots),
        torch.cat(query), labels.repeat_interleave(queries),
    )


def task_rng(seed: int, stream: int, index: int, task: int | None = None) -> np.random.Generator:
    """The random generator of one task: a pure function of its coordinates (the evaluation
    task ``index``, or task ``task`` of training step ``index``)."""
    return np.random.default_rng([seed, stream, index] + ([] if task is None else [task]))


def shard(count: int, rank: int, world_size: int, what: str) -> range:
    """The contiguous share of ``count`` items that process ``rank`` of ``world_size`` takes.

    Shares differ by at most one item (3 tasks on 2 processes: 2 and 1), the larger ones on
    the lower ranks; in rank order they are ``range(count)``. Every process needs at least
    one item, so ``count`` below ``world_size`` is refused, naming ``what``.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size} processes")
    if count < world_size:
        raise ValueError(
            f"{what}={count} is fewer than the {world_size} processes (devices x nodes): every "
            f"process needs at least one; make {what} >= {world_size} or use fewer processes")
    size, larger = divmod(count, world_size)
    begin = rank * size + min(rank, larger)
    return range(begin, begin + size + (rank < larger))


def stack_tasks(tasks: Sequence[tuple[Tensor, Tensor, Tensor, Tensor]]) -> Episodes:
    return Episodes(*(torch.stack(parts) for parts in zip(*tasks, strict=True)))


class MetaBatches(Dataset[Episodes]):
    """Training meta-batches: item ``i`` is the meta-batch of global step ``i``.

    Args:
        dataset: the training split.
        ways, shots, queries: N, K and query images per class of every task.
        tasks_per_batch: T, tasks per meta-batch.
        seed: with the step, determines every task.
        length: steps available (the DataLoader's sampler picks which ones).
        augmentation: applied to each task's support and query images together (e.g.
            :class:`fewshot.data.augmentation.Augmentation`), with a generator that is a pure
            function of ``(seed, step, task)``; None for none.
        rank, world_size: under distributed training each process draws only its own
            contiguous share of the T tasks (shares differ by at most one task when T does not
            divide); together they are exactly the tasks of a single process, since every task
            has its own random generator. The meta-learner weights each process's loss by its
            share, so the meta-gradient is the single-process one.
    """

    def __init__(
        self, dataset: ClassImages, ways: int, shots: int, queries: int,
        tasks_per_batch: int, seed: int, length: int, split: str = "train",
        augmentation: TaskAugmentation | None = None, rank: int = 0, world_size: int = 1,
    ) -> None:
        check_task_size(dataset, split, ways, shots, queries)
        if tasks_per_batch < 1:
            raise ValueError(f"meta_batch_size must be >= 1, got {tasks_per_batch}")
        self.dataset, self.ways, self.shots, self.queries = dataset, ways, shots, queries
        self.tasks_per_batch, self.seed, self.length = tasks_per_batch, seed, length
        self.augmentation = augmentation
        self.tasks = shard(tasks_per_batch, rank, world_size, "meta_batch_size")

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, step: int) -> Episodes:
        tasks = []
        for j in self.tasks:
            rng = task_rng(self.seed, TRAIN_STREAM, step, j)
            task = sample_task(self.dataset, self.ways, self.shots, self.queries, rng)
            if self.augmentation is not None:
                task = self._augmented(task, task_rng(self.seed, TRAIN_AUGMENTATION_STREAM, step, j))
            tasks.append(task)
        return stack_tasks(tasks)

    def _augmented(self, task: tuple[Tensor, Tensor, Tensor, Tensor],
                   rng: np.random.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        support_x, support_y, query_x, query_y = task
        images = self.augmentation(torch.cat([support_x, query_x]), rng)
        return images[:len(support_x)], support_y, images[len(support_x):], query_y


class EvaluationEpisodes(Dataset[Episodes]):
    """A fixed set of ``episodes`` evaluation tasks, served ``tasks_per_batch`` at a time.

    Task ``j`` depends only on ``(seed, stream, j)``, so the set is the same whatever the
    batching, the workers or the world size; the last batch may be smaller. Under distributed
    evaluation process ``rank`` takes a contiguous share of the episodes (shares differ by at
    most one), so the shares in rank order are the single-process episodes in order.
    """

    def __init__(
        self, dataset: ClassImages, ways: int, shots: int, queries: int, episodes: int,
        tasks_per_batch: int, seed: int, stream: int, split: str,
        rank: int = 0, world_size: int = 1,
    ) -> None:
        check_task_size(dataset, split, ways, shots, queries)
        if episodes < 1 or tasks_per_batch < 1:
            raise ValueError(
                f"need episodes >= 1 and tasks_per_batch >= 1, got {episodes} and {tasks_per_batch}"
            )
        self.dataset, self.ways, self.shots, self.queries = dataset, ways, shots, queries
        self.episodes, self.tasks_per_batch = episodes, tasks_per_batch
        self.seed, self.stream = seed, stream
        # Named as the option that sets it (val_episodes, test_episodes).
        self.share = shard(episodes, rank, world_size, f"{split}_episodes")

    def __len__(self) -> int:
        return -(-len(self.share) // self.tasks_per_batch)

    def fingerprint(self) -> str:
        """SHA-256 of the whole episode list (every process's share): for each episode, its
        classes by name and the images drawn from each. Two runs with the same fingerprint
        were scored on exactly the same tasks."""
        digest = hashlib.sha256()
        for index in range(self.episodes):
            rng = task_rng(self.seed, self.stream, index)
            drawn = draw_task(self.dataset, self.ways, self.shots, self.queries, rng)
            digest.update(json.dumps([[self.dataset.classes[c], picks] for c, picks in drawn])
                          .encode())
        return digest.hexdigest()

    def task(self, index: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        rng = task_rng(self.seed, self.stream, index)
        return sample_task(self.dataset, self.ways, self.shots, self.queries, rng)

    def __getitem__(self, index: int) -> Episodes:
        if not 0 <= index < len(self):
            raise IndexError(index)
        share = self.share[index * self.tasks_per_batch:(index + 1) * self.tasks_per_batch]
        return stack_tasks([self.task(j) for j in share])


class StepSampler(Sampler[int]):
    """Yields the global steps of one training epoch, skipping those already trained.

    Lightning calls :meth:`set_epoch` before each epoch. ``first_step`` is the global step the
    run resumes from, so a restarted epoch continues where the killed one stopped instead of
    replaying its first meta-batches. The sampler starts in that step's epoch: Lightning
    iterates a resumed epoch before its first ``set_epoch`` call.
    """

    def __init__(self, steps_per_epoch: int, first_step: int = 0) -> None:
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        self.steps_per_epoch, self.first_step = steps_per_epoch, first_step
        self.epoch = first_step // steps_per_epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        begin = self.epoch * self.steps_per_epoch
        return iter(range(max(begin, self.first_step), begin + self.steps_per_epoch))

    def __len__(self) -> int:
        # The full epoch, also when resuming inside it: Lightning restores how many batches of
        # the epoch are done and counts on from there, and ends the epoch when we run out.
        return self.steps_per_epoch
