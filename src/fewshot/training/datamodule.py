"""The LightningDataModule serving episodes of a few-shot dataset."""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Literal

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from fewshot.data.augmentation import Augmentation, AugmentPer
from fewshot.data.class_images import check_disjoint_splits
from fewshot.data.episodes import (
    TEST_STREAM,
    VALIDATION_STREAM,
    ClassImages,
    EvaluationEpisodes,
    MetaBatches,
    StepSampler,
)
from fewshot.data.registry import DATASETS, REGRESSION_DATASETS, class_split_for, dataset_class
from fewshot.data.sinusoid import SinusoidEpisodes, SinusoidMetaBatches

__all__ = ["DATASETS", "FewShotDataModule", "default_root"]


def default_root(dataset: str) -> Path:
    """``$FEWSHOT_DATA_ROOT/<dataset>`` if the variable is set, else ``./data/<dataset>``."""
    return Path(os.environ.get("FEWSHOT_DATA_ROOT", "data")) / dataset


class FewShotDataModule(LightningDataModule):
    """Episodes of N-way K-shot tasks for meta-training, validation and testing.

    The original project's flags map onto these options: ``episode_classes`` is ``ways``,
    ``support_samples`` is ``shots``, ``query_samples`` is ``queries``, ``batch_size`` (tasks
    per meta-batch) is ``meta_batch_size``.

    Args:
        dataset: a name in :data:`fewshot.data.registry.DATASETS`: ``omniglot``,
            ``mini_imagenet``, ``tiered_imagenet``, ``cifar_fs``, ``fc100`` or ``folder`` (your own images,
            ``root/{train,val,test}/<class>/<images>`` or ``root/<class>/<images>``), or
            ``sinusoid``. The last is MAML's sine-wave regression (:mod:`fewshot.data.sinusoid`:
            generated tasks, ``ways`` 1, ``shots`` and ``queries`` points per task, no image
            options).
        root: folder with the dataset's archives or extracted folders (default: see
            :func:`default_root`).
        download: fetch the dataset into ``root`` if missing (Omniglot, CIFAR-FS: the official
            archives; mini-ImageNet, tiered-ImageNet, FC100: the mirror learn2learn uses).
        class_split: which classes form train/val/test; None is the dataset's standard split,
            and so is a split that only another dataset knows (``maml`` of an Omniglot config
            pointed at ``--data.dataset folder``).
            Omniglot: ``maml`` (default; seeded 1100/100/423 characters), ``lake``
            (background/evaluation; no validation set) or a folder of split files.
            mini-ImageNet: ``ravi`` (default, the only one). CIFAR-FS: ``bertinetto`` (default)
            or a folder of split files. folder: ``folders`` (default when ``root`` has split
            folders), ``random`` (seeded by ``split_seed``) or a folder of split files.
        image_size: images are resized to ``image_size x image_size``.
        channels: image channels the model expects: 1 (Omniglot; grayscale) or 3 (RGB).
        ways: N, classes per task (training and evaluation).
        shots: K, support images per class.
        queries: query images per class of training tasks.
        meta_batch_size: tasks per training meta-batch.
        eval_queries: query images per class of validation and test tasks.
        val_episodes: number of fixed validation tasks (scored at every validation).
        test_episodes: number of fixed test tasks (600 in the literature).
        eval_batch_size: tasks per evaluation batch (default ``meta_batch_size``).
        steps_per_epoch: meta-iterations per epoch.
        seed: determines every task (training tasks by global step, evaluation tasks by index).
        num_workers: DataLoader worker processes.
        cache_dir: writable folder for decoded-image caches (default ``$FEWSHOT_CACHE_DIR`` or
            ``~/.cache/fewshot``).
        skip_bad_images: leave unreadable image files out with one warning instead of failing.
        split_seed: seed of seeded class splits (Omniglot ``maml``, folder ``random``).
        random_crop_padding: training augmentation: zero-pad by this many pixels, then crop
            back at a random offset (0: off); validation and test are never augmented.
        horizontal_flip: training augmentation: flip half of the images left-right.
        color_jitter: training augmentation: brightness, contrast and saturation factors
            drawn from ``[1 - x, 1 + x]`` (0: off).
        augment_per: ``image`` (independent draws) or ``task`` (one draw per task).
        resize: how non-square images become square: ``squash``, ``crop`` (centred) or ``pad``
            (white margins); for datasets of files (``folder``, mini-ImageNet's folders). The
            trained model records it, and ``fewshot adapt`` prepares new photos the same way.
    """

    def __init__(
        self,
        dataset: str = "omniglot",
        root: str | None = None,
        download: bool = False,
        class_split: str | None = None,
        image_size: int = 28,
        channels: int = 1,
        ways: int = 5,
        shots: int = 1,
        queries: int = 15,
        meta_batch_size: int = 32,
        eval_queries: int = 15,
        val_episodes: int = 100,
        test_episodes: int = 600,
        eval_batch_size: int | None = None,
        steps_per_epoch: int = 500,
        seed: int = 0,
        num_workers: int = 0,
        cache_dir: str | None = None,
        skip_bad_images: bool = False,
        split_seed: int = 0,
        random_crop_padding: int = 0,
        horizontal_flip: bool = False,
        color_jitter: float = 0.0,
        augment_per: AugmentPer = "image",
        resize: Literal["squash", "crop", "pad"] = "squash",
    ) -> None:
        super().__init__()
        if dataset not in REGRESSION_DATASETS:
            dataset_class(dataset).check_channels(channels)
        elif ways != 1:
            raise ValueError(f"{dataset} tasks are regression, one function each: ways must be "
                             f"1, got ways={ways}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.save_hyperparameters()
        self.root = Path(root) if root is not None else default_root(dataset)
        self.eval_batch_size = eval_batch_size or meta_batch_size
        augmentation = Augmentation(random_crop_padding, horizontal_flip, color_jitter, augment_per)
        self.augmentation = augmentation if augmentation.enabled else None
        self._splits: dict[str, ClassImages] = {}

    def _load_split(self, split: str, download: bool = False) -> ClassImages:
        hp = self.hparams
        if split not in self._splits:
            # Every registered dataset takes these options (fewshot.data.class_images).
            cls = dataset_class(hp.dataset)
            # Datasets of square images have no resize option.
            extra = ({"resize": hp.resize}
                     if "resize" in inspect.signature(cls.__init__).parameters else {})
            dataset = cls(
                self.root, split=split, class_split=class_split_for(hp.dataset, hp.class_split),
                image_size=hp.image_size, **extra,
                channels=hp.channels, download=download, cache_dir=hp.cache_dir,
                skip_bad_images=hp.skip_bad_images, split_seed=hp.split_seed)
            self._splits[split] = dataset
            # Splits built separately (e.g. from pickles) must not share classes either.
            check_disjoint_splits(
                {name: dict(zip(s.classes, s.class_sizes, strict=True))
                 for name, s in self._splits.items()}, f"{hp.dataset} in {self.root}")
        return self._splits[split]

    def prepare_data(self) -> None:
        if self.hparams.download:
            self._load_split("train", download=True)

    def _distribution(self) -> tuple[int, int]:
        """This process's rank and the world size; tasks are sharded here, not by Lightning."""
        trainer = self.trainer
        if trainer is None or trainer.world_size == 1:
            return 0, 1
        if getattr(trainer._accelerator_connector, "use_distributed_sampler", False):
            raise ValueError(
                "fewshot shards the tasks of each meta-batch over processes itself: create the "
                "Trainer with use_distributed_sampler=False (the fewshot CLI does)")
        return trainer.global_rank, trainer.world_size

    def setup(self, stage: str) -> None:
        hp = self.hparams
        rank, world_size = self._distribution()
        if hp.dataset in REGRESSION_DATASETS:
            self._setup_sine_waves(stage, rank, world_size)
            return
        if stage == "fit":
            self.train_set = MetaBatches(
                self._load_split("train"), hp.ways, hp.shots, hp.queries, hp.meta_batch_size,
                hp.seed, length=2**62, split="train", augmentation=self.augmentation,
                rank=rank, world_size=world_size,
            )
        if stage in ("fit", "validate"):
            self.val_set = self._evaluation_episodes("val", hp.val_episodes, VALIDATION_STREAM)
        if stage == "test":
            self.test_set = self._evaluation_episodes("test", hp.test_episodes, TEST_STREAM)

    def _evaluation_episodes(self, split: str, episodes: int, stream: int) -> EvaluationEpisodes:
        hp = self.hparams
        # Named by their options here; the episode classes only know episodes and queries.
        for name, value in ((f"{split}_episodes", episodes), ("eval_queries", hp.eval_queries),
                            ("eval_batch_size", self.eval_batch_size)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        rank, world_size = self._distribution()
        return EvaluationEpisodes(
            self._load_split(split), hp.ways, hp.shots, hp.eval_queries, episodes,
            self.eval_batch_size, hp.seed, stream, split, rank=rank, world_size=world_size,
        )

    def _setup_sine_waves(self, stage: str, rank: int, world_size: int) -> None:
        hp = self.hparams
        if stage == "fit":
            self.train_set = SinusoidMetaBatches(hp.shots, hp.queries, hp.meta_batch_size, hp.seed,
                                                 length=2**62, rank=rank, world_size=world_size)
        evaluation = {"val": ("fit", "validate"), "test": ("test",)}
        for split, stream, episodes in (("val", VALIDATION_STREAM, hp.val_episodes),
                                        ("test", TEST_STREAM, hp.test_episodes)):
            if stage in evaluation[split]:
                setattr(self, f"{split}_set", SinusoidEpisodes(
                    hp.shots, hp.eval_queries, episodes, self.eval_batch_size, hp.seed, stream,
                    split, rank=rank, world_size=world_size))

    def _loader(self, dataset, sampler=None) -> DataLoader:
        workers = self.hparams.num_workers
        return DataLoader(
            dataset, batch_size=None, sampler=sampler, num_workers=workers,
            persistent_workers=workers > 0, pin_memory=self._on_gpu(),
        )

    def _on_gpu(self) -> bool:
        trainer = self.trainer
        return trainer is not None and trainer.strategy.root_device.type == "cuda"

    def train_dataloader(self) -> DataLoader:
        # Resuming: start from the restored global step, so the run sees the tasks it would
        # have seen without the interruption.
        first_step = self.trainer.global_step if self.trainer is not None else 0
        return self._loader(self.train_set, StepSampler(self.hparams.steps_per_epoch, first_step))

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set)
