"""FewShotDataModule over the image datasets: shapes, workers, augmentation, setup errors, CLI."""

from __future__ import annotations

import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from fake_datasets import (
    write_cifar100_archive,
    write_cifar_fs_split,
    write_mini_imagenet_folders,
    write_mini_imagenet_pickles,
)

from fewshot.cli import main
from fewshot.data.download import IntegrityError
from fewshot.data.mini_imagenet import MiniImageNet
from fewshot.training.datamodule import FewShotDataModule

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SMALL = dict(ways=3, shots=1, queries=2, meta_batch_size=2, eval_queries=2, val_episodes=4,
             test_episodes=4, steps_per_epoch=3)


@pytest.fixture(scope="module")
def mini_root(tmp_path_factory) -> Path:
    return write_mini_imagenet_folders(tmp_path_factory.mktemp("mini"), images_per_class=4)


@pytest.fixture(autouse=True)
def _small_classes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(MiniImageNet, "images_per_class", 4)


def _batches(data: FewShotDataModule, loader: str, count: int) -> list:
    iterator = iter(getattr(data, loader)())
    return [next(iterator) for _ in range(count)]


def test_mini_imagenet_episodes_have_rgb_shapes(mini_root, tmp_path):
    data = FewShotDataModule("mini_imagenet", str(mini_root), image_size=16, channels=3,
                             cache_dir=str(tmp_path), **SMALL)
    data.setup("fit")
    batch = data.train_set[0]
    assert batch.support_x.shape == (2, 3, 3, 16, 16) and batch.query_x.shape == (2, 6, 3, 16, 16)
    assert batch.query_y.tolist() == [[0, 0, 1, 1, 2, 2]] * 2
    assert len(data.val_set) == 2
    data.setup("test")
    assert len(data.test_set[0].support_x[0]) == 3


@pytest.mark.parametrize("augment", [False, True])
def test_two_workers_serve_exactly_the_episodes_of_none(mini_root, tmp_path, augment):
    options = dict(SMALL, cache_dir=str(tmp_path), image_size=16, channels=3,
                   random_crop_padding=2 if augment else 0, horizontal_flip=augment,
                   color_jitter=0.3 if augment else 0.0)
    served = {}
    for workers in (0, 2):
        data = FewShotDataModule("mini_imagenet", str(mini_root), num_workers=workers, **options)
        data.setup("fit")
        served[workers] = (_batches(data, "train_dataloader", 3),
                           _batches(data, "val_dataloader", 2))
    torch.testing.assert_close(served[2], served[0], rtol=0, atol=0)


def test_augmentation_touches_training_only(mini_root, tmp_path):
    plain = FewShotDataModule("mini_imagenet", str(mini_root), image_size=16, channels=3,
                              cache_dir=str(tmp_path), **SMALL)
    augmented = FewShotDataModule("mini_imagenet", str(mini_root), image_size=16, channels=3,
                                  cache_dir=str(tmp_path), random_crop_padding=2,
                                  horizontal_flip=True, augment_per="task", **SMALL)
    for data in (plain, augmented):
        data.setup("fit")
        data.setup("test")
    assert not torch.equal(plain.train_set[1].support_x, augmented.train_set[1].support_x)
    torch.testing.assert_close(plain.val_set[1], augmented.val_set[1])
    torch.testing.assert_close(plain.test_set[0], augmented.test_set[0])
    with pytest.raises(ValueError, match="augmentation per must be 'image' or 'task'"):
        FewShotDataModule("mini_imagenet", augment_per="episode")


def test_dataset_survives_pickling_for_spawned_workers_without_copying_images(mini_root, tmp_path):
    data = FewShotDataModule("mini_imagenet", str(mini_root), image_size=16, channels=3,
                             cache_dir=str(tmp_path), **SMALL)
    data.setup("fit")
    train = data.train_set.dataset
    payload = pickle.dumps(train)
    assert len(payload) < train._images.nbytes / 10  # the cache path, not the pixels
    torch.testing.assert_close(pickle.loads(payload).load_class_images(3, [0, 1]),
                               train.load_class_images(3, [0, 1]))


def test_too_few_images_for_the_task_is_reported_at_setup(mini_root, tmp_path):
    data = FewShotDataModule("mini_imagenet", str(mini_root), image_size=8, channels=3,
                             cache_dir=str(tmp_path), **dict(SMALL, shots=2, queries=3))
    with pytest.raises(ValueError, match=r"2 support \+ 3 query images per class need 5 images, "
                                         r"but class '.*' of the 'train' split has only 4; "
                                         r"64 classes have fewer than 5"):
        data.setup("fit")


def test_pickled_splits_sharing_a_class_are_refused_at_setup(tmp_path):
    root = tmp_path / "mini"
    written = write_mini_imagenet_pickles(root, size=16, splits=("train", "val"))
    val = written["val"]
    shared = next(iter(written["train"]["class_dict"]))
    renamed = next(iter(val["class_dict"]))
    val["class_dict"][shared] = val["class_dict"].pop(renamed)
    (root / "mini-imagenet-cache-val.pkl").write_bytes(pickle.dumps(val))
    data = FewShotDataModule("mini_imagenet", str(root), image_size=16, channels=3,
                             cache_dir=str(tmp_path / "c"), **SMALL)
    with pytest.raises(IntegrityError, match=rf"'{shared}' in 'train' \(4 images\) and 'val' "
                                             r"\(4 images\)"):
        data.setup("fit")


def test_folder_dataset_in_grayscale(tmp_path):
    from test_image_folder import split_tree

    root = split_tree(tmp_path / "mine", per_class=3)
    data = FewShotDataModule("folder", str(root), image_size=12, channels=1,
                             cache_dir=str(tmp_path / "c"), **SMALL)
    data.setup("fit")
    assert data.train_set[0].support_x.shape == (2, 3, 1, 12, 12)
    with pytest.raises(ValueError, match="cannot be downloaded"):
        FewShotDataModule("folder", str(root), download=True).prepare_data()


@pytest.mark.slow
def test_cifar_fs_config_trains_and_tests_through_the_cli(tmp_path, capsys):
    root = tmp_path / "cifar"
    write_cifar100_archive(root, train_per_class=3, test_per_class=1)
    split = write_cifar_fs_split(tmp_path / "split")
    main(["fit", "--config", str(CONFIGS / "maml_cifar_fs_5way_1shot.yaml"),
          f"--data.root={root}", f"--data.class_split={split}", "--data.download=false",
          f"--data.cache_dir={tmp_path / 'c'}", "--data.queries=2", "--data.eval_queries=2",
          "--data.val_episodes=2", "--data.test_episodes=2", "--data.steps_per_epoch=2",
          "--data.num_workers=0", "--data.random_crop_padding=4", "--data.horizontal_flip=true",
          "--model.backbone.hidden_channels=4",
          "--model.algorithm.init_args.eval_inner_steps=1",
          "--model.algorithm.init_args.inner_steps=1", "--trainer.max_steps=2", "--trainer.val_check_interval=2",
          f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
          "--trainer.enable_progress_bar=false", "--test_after_fit=true"])
    (results,) = tmp_path.rglob("test_results.json")
    assert "accuracy" in results.read_text()
    (config,) = tmp_path.rglob("config.yaml")
    assert yaml.safe_load(config.read_text())["data"]["dataset"] == "cifar_fs"
    # data.channels and data.image_size reached the backbone through the CLI's links.
    checkpoint = torch.load(next(tmp_path.rglob("last.ckpt")), weights_only=False)
    weights = checkpoint["state_dict"]
    first_conv = next(v for k, v in weights.items() if k.endswith("weight") and v.dim() == 4)
    assert first_conv.shape == (4, 3, 3, 3)
    head = next(v for k, v in weights.items() if "head" in k and k.endswith("weight"))
    assert head.shape == (5, 4 * 2 * 2)  # 32 px after four 2x2 max-pools


def test_omniglot_with_two_workers_serves_the_episodes_of_none(fake_omniglot):
    root, cache = fake_omniglot
    served = {}
    for workers in (0, 2):
        data = FewShotDataModule(root=str(root), cache_dir=str(cache), num_workers=workers,
                                 **SMALL)
        data.setup("fit")
        served[workers] = _batches(data, "train_dataloader", 3)
    torch.testing.assert_close(served[2], served[0], rtol=0, atol=0)


def test_loaders_pin_memory_only_for_a_gpu_trainer(mini_root, tmp_path):
    data = FewShotDataModule("mini_imagenet", str(mini_root), image_size=8, channels=3,
                             cache_dir=str(tmp_path), num_workers=1, **SMALL)
    data.setup("fit")
    assert not data.val_dataloader().pin_memory
    data.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda")),
                                   global_step=2)
    loader = data.train_dataloader()
    assert loader.pin_memory and loader.num_workers == 1 and loader.persistent_workers
    assert list(loader.sampler) == [2]  # resumes at the trainer's global step
