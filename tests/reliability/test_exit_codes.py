"""Every bad input a user can give the ``fewshot`` command ends the same way: exit code 2, one
message on stderr that names the culprit, and no traceback (unless ``FEWSHOT_DEBUG=1``)."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch  # noqa: F401  (see below)
import numpy as np
import pytest
import torch
from PIL import Image

from fewshot.cli import main
from fewshot.data.image_folder import ImageFolder

# Lightning's loggers bind their handler to the sys.stderr of the moment Lightning is imported:
# imported here, that is pytest's own stream for the session, not the capsys stream of the first
# test to call main(), which is closed when that test ends ("--- Logging error ---" in the
# stderr of every later test).


def png(rng: np.random.Generator, mode: str = "L", size: int = 12, fmt: str = "PNG") -> bytes:
    pixels = {"L": lambda: rng.integers(0, 256, (size, size), dtype=np.uint8),
              "I;16": lambda: rng.integers(0, 65536, (size, size), dtype=np.uint16),
              "F": lambda: rng.random((size, size), dtype=np.float32),
              "CMYK": lambda: rng.integers(0, 256, (size, size, 4), dtype=np.uint8),
              "1": lambda: rng.random((size, size)) > 0.5}[mode]()
    buffer = io.BytesIO()
    Image.fromarray(pixels, None if mode in ("L", "I;16", "1") else mode).save(buffer, format=fmt)
    return buffer.getvalue()


def image_tree(root: Path, classes: int = 3, per_class: int = 4, mode: str = "L",
               fmt: str = "PNG", suffix: str = ".png") -> Path:
    """``root/{train,val,test}/<class>/<images>``, enough for 3-way 1-shot 2-query tasks."""
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        for c in range(classes):
            folder = root / split / f"{split}_class{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                (folder / f"img{i}{suffix}").write_bytes(png(rng, mode, fmt=fmt))
    return root


@dataclass
class Where:
    """Where a case may write its bad files, and the fake Omniglot the other options use."""

    tmp: Path
    omniglot: Path
    cache: Path

    def fit(self, *options: str, subcommand: str = "fit") -> list[str]:
        return [subcommand, f"--data.root={self.omniglot}", f"--data.cache_dir={self.cache}",
                "--data.ways=3", "--data.queries=2", "--data.meta_batch_size=2",
                "--data.eval_queries=2", "--data.val_episodes=2", "--data.test_episodes=2",
                "--data.steps_per_epoch=2", "--model.backbone.hidden_channels=8",
                "--trainer.max_steps=1", f"--trainer.default_root_dir={self.tmp / 'runs'}",
                f"--trainer.logger.init_args.save_dir={self.tmp / 'runs'}",
                "--trainer.enable_progress_bar=false", *options]

    def folder(self, root: Path, *options: str) -> list[str]:
        return self.fit("--data.dataset=folder", f"--data.root={root}", *options)

    def empty_folder(self, name: str) -> Path:
        (self.tmp / name).mkdir()
        return self.tmp / name

    def file(self, name: str, content: bytes | str) -> Path:
        path = self.tmp / name
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return path


def truncated_checkpoint(where: Where) -> Path:
    buffer = io.BytesIO()
    torch.save({"state_dict": {"w": torch.zeros(1000)}, "hyper_parameters": {}}, buffer)
    return where.file("truncated.ckpt", buffer.getvalue()[:2000])


def truncated_png() -> bytes:
    return png(np.random.default_rng(1), size=32)[:60]


def argv_with_the_last_checkpoint_of_another_experiment(where: Where) -> list[str]:
    # The only last.ckpt where --ckpt_path last looks is that of a run of 20-way tasks.
    folder = where.tmp / "runs" / "lightning_logs" / "version_0" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save({"hyper_parameters": {"ways": 20}, "datamodule_hyper_parameters": {"ways": 20}},
               folder / "last.ckpt")
    return where.fit("--ckpt_path=last", subcommand="test")


def argv_with_the_last_checkpoint_of_a_wider_backbone(where: Where) -> list[str]:
    # The only last.ckpt where --ckpt_path last looks is that of a run whose settings differ
    # from this one's in the backbone's width alone.
    from fewshot.training.cli import build_cli

    folder = where.tmp / "runs" / "lightning_logs" / "version_0" / "checkpoints"
    wider = build_cli(where.fit("--model.backbone.hidden_channels=16")[1:], run=False)
    wider.trainer.strategy.connect(wider.model)
    wider.trainer.datamodule = wider.datamodule
    wider.trainer.save_checkpoint(folder / "last.ckpt")
    return where.fit("--ckpt_path=last", subcommand="test")


def bad_image_tree(where: Where, bad: str, content: bytes) -> Path:
    root = image_tree(where.tmp / "images")
    (root / "train" / "train_class1" / bad).write_bytes(content)
    return root


def tree_with_an_empty_class(where: Where) -> Path:
    root = image_tree(where.tmp / "images")
    (root / "train" / "train_class9").mkdir()
    return root


@dataclass
class Case:
    id: str
    argv: Callable[[Where], list[str]]
    culprit: str  # a regular expression stderr must match
    in_a_process: bool = False  # run `python -m fewshot.cli` instead of main() in this process
    marks: tuple = ()


# MetaLearner's `algorithm: Algorithm | dict | None` (and executor, inner_optimizer, backbone)
# lets jsonargparse fall back to a plain dict when the class's arguments are wrong, and the
# module then reports "algorithm None is not one fewshot knows" instead of the bad argument.
CASES = [
    # Options on the command line
    Case("ways-0", lambda w: w.fit("--data.ways=0"), r"at least 2 ways, got ways=0"),
    Case("ways-1", lambda w: w.fit("--data.ways=1"), r"at least 2 ways, got ways=1"),
    Case("shots-0", lambda w: w.fit("--data.shots=0"), r"shots >= 1.*shots=0"),
    Case("queries-0", lambda w: w.fit("--data.queries=0"), r"queries >= 1.*queries=0"),
    Case("eval-queries-0", lambda w: w.fit("--data.eval_queries=0"),
         r"eval_queries must be >= 1, got 0"),
    Case("val-episodes-0", lambda w: w.fit("--data.val_episodes=0"),
         r"val_episodes must be >= 1, got 0"),
    Case("meta-batch-0", lambda w: w.fit("--data.meta_batch_size=0"),
         r"meta_batch_size must be >= 1, got 0"),
    Case("steps-per-epoch-0", lambda w: w.fit("--data.steps_per_epoch=0"),
         r"steps_per_epoch must be >= 1, got 0"),
    Case("inner-steps-negative", lambda w: w.fit("--model.algorithm.init_args.inner_steps=-1"),
         r"inner_steps must be an integer >= 0, got -1"),
    Case("inner-lr-negative", lambda w: w.fit("--model.algorithm.init_args.inner_lr=-0.1"),
         r"inner_lr must be a non-negative number, got -0.1"),
    Case("meta-lr-negative", lambda w: w.fit("--model.optimizer.init_args.lr=-1"),
         r"Invalid learning rate: -1"),
    Case("unknown-algorithm", lambda w: w.fit("--model.algorithm=fewshot.algorithms.Nope"),
         r"fewshot.algorithms.Nope"),
    Case("mamlpp-bad-batch-norm", lambda w: w.fit(
        "--model.algorithm=fewshot.algorithms.MAMLPlusPlus",
        "--model.algorithm.init_args.batch_norm=global"), r'"batch_norm".*\n.*Got value: global'),
    Case("algorithm-option-typo", lambda w: w.fit("--model.algorithm.init_args.inner_stepz=3"),
         r"'inner_stepz' is not accepted"),
    Case("executor-wrong-type", lambda w: w.fit(
        "--model.executor=fewshot.execution.Vmap", "--model.executor.init_args.chunk_size=two"),
         r"chunk_size(.*\n)*.*Given value: two"),
    Case("executor-chunk-size-0", lambda w: w.fit(
        "--model.executor=fewshot.execution.Vmap", "--model.executor.init_args.chunk_size=0"),
         r"chunk_size must be a positive number of tasks or None, got 0"),
    Case("inner-adam-beta-1", lambda w: w.fit(
        "--model.inner_optimizer=fewshot.core.inner_optimizers.Adam",
        "--model.inner_optimizer.init_args.beta1=1.0"), r"inner Adam beta1 must be in \[0, 1\), got 1.0"),
    Case("hidden-channels-0", lambda w: w.fit("--model.backbone.hidden_channels=0"),
         r"Conv4 needs positive sizes, .*hidden_channels=0"),
    Case("image-size-0", lambda w: w.fit("--data.image_size=0"),
         r"Conv4 needs positive sizes, .*image_size=0"),
    Case("workers-negative", lambda w: w.fit("--data.num_workers=-1"),
         r"num_workers must be >= 0, got -1"),
    Case("unknown-dataset", lambda w: w.fit("--data.dataset=imagenet"),
         r"unknown dataset 'imagenet'"),
    Case("unknown-option", lambda w: w.fit("--data.wayz=3"), r"unrecognized arguments: --data.wayz"),
    Case("wrong-type", lambda w: w.fit("--data.ways=three"), r'"data.ways".*\n.*three'),
    Case("unknown-choice", lambda w: w.fit("--nonfinite.policy=maybe"),
         r'"nonfinite.policy".*\n.*maybe'),
    Case("linked-setting-given", lambda w: w.fit("--model.ways=3"),
         r'"model.ways" must be given via "data.ways"'),
    Case("max-steps-negative", lambda w: w.fit("--trainer.max_steps=-5"),
         r"`max_steps` must be a non-negative integer.*-5"),
    Case("unknown-accelerator", lambda w: w.fit("--trainer.accelerator=toaster"),
         r"invalid accelerator name: `accelerator='toaster'`"),
    # Config files
    Case("config-missing", lambda w: w.fit(f"--config={w.tmp / 'nowhere.yaml'}"),
         r"nowhere.yaml"),
    Case("config-yaml-syntax", lambda w: ["fit", "-c", str(w.file("broken.yaml", "data:\n  ways: [3\n"))],
         r'broken.yaml is not readable YAML: .*\n.*broken.yaml", line 2', in_a_process=True),
    Case("config-not-a-mapping", lambda w: w.fit("-c", str(w.file("list.yaml", "- 1\n- 2\n"))),
         r"list.yaml must be a mapping of options"),
    Case("config-unknown-key", lambda w: w.fit("-c", str(w.file("key.yaml", "data:\n  wayz: 3\n"))),
         r"does not accept option 'data.wayz'"),
    # Datasets and images
    Case("omniglot-missing", lambda w: w.fit(f"--data.root={w.tmp / 'nothing'}"),
         r"Omniglot not found in .*nothing"),
    Case("omniglot-as-rgb", lambda w: w.fit("--data.channels=3"),
         r"Omniglot images have 1 channel, got channels=3"),
    Case("folder-missing", lambda w: w.folder(w.tmp / "nothing"),
         r"Image folder .*nothing does not exist"),
    Case("folder-empty", lambda w: w.folder(w.empty_folder("no-classes")),
         r"no-classes has 0 class folder\(s\)"),
    Case("class-folder-without-images", lambda w: w.folder(tree_with_an_empty_class(w)),
         r"classes without images: train_class9"),
    Case("corrupt-image", lambda w: w.folder(bad_image_tree(w, "bad.png", truncated_png())),
         r"bad.png: corrupt or truncated"),
    Case("corrupt-image-two-workers", lambda w: w.folder(
        bad_image_tree(w, "bad.png", truncated_png()), "--data.num_workers=2"),
         r"bad.png: corrupt or truncated", in_a_process=True),
    Case("not-an-image", lambda w: w.folder(bad_image_tree(w, "notes.txt", b"shopping list")),
         r"notes.txt: not an image"),
    Case("empty-image-file", lambda w: w.folder(bad_image_tree(w, "empty.png", b"")),
         r"empty.png: empty file"),
    Case("channels-2", lambda w: w.folder(image_tree(w.tmp / "images"), "--data.channels=2"),
         r"channels must be 1 \(grayscale\) or 3 \(RGB\), got 2"),
    # Checkpoints
    Case("test-missing-checkpoint",
         lambda w: w.fit(f"--ckpt_path={w.tmp / 'missing.ckpt'}", subcommand="test"),
         r"Checkpoint file not found: .*missing.ckpt"),
    Case("test-corrupt-checkpoint", lambda w: w.fit(
        f"--ckpt_path={w.file('garbage.ckpt', os.urandom(300))}", subcommand="test"),
         r"garbage.ckpt is corrupt or not a PyTorch checkpoint"),
    Case("resume-from-truncated-checkpoint",
         lambda w: w.fit(f"--ckpt_path={truncated_checkpoint(w)}"),
         r"truncated.ckpt is corrupt or not a PyTorch checkpoint"),
    Case("test-last-without-a-run", lambda w: w.fit("--ckpt_path=last", subcommand="test"),
         r"--ckpt_path last: no run with these settings in .*runs.* has a last.ckpt"),
    Case("test-last-of-another-experiment", argv_with_the_last_checkpoint_of_another_experiment,
         r"--ckpt_path last: no run with these settings in .*runs.* has a last.ckpt"),
    Case("test-last-of-a-wider-backbone", argv_with_the_last_checkpoint_of_a_wider_backbone,
         r"--ckpt_path last: no run with these settings in .*runs.* has a last.ckpt"),
    Case("adapt-missing-checkpoint", lambda w: [
        "adapt", "--checkpoint", str(w.tmp / "missing.ckpt"), "--support",
        str(image_tree(w.tmp / "images") / "train"), "--query", str(w.tmp / "images" / "test")],
         r"checkpoint .*missing.ckpt does not exist"),
]


@pytest.mark.parametrize("case", [pytest.param(case, marks=case.marks, id=case.id)
                                  for case in CASES])
def test_bad_input_exits_2_with_one_message_naming_it(case, fake_omniglot, tmp_path, capsys):
    where = Where(tmp_path, *fake_omniglot)
    argv = case.argv(where)
    if case.in_a_process:
        finished = subprocess.run([sys.executable, "-m", "fewshot.cli", *argv], text=True,
                                  capture_output=True, timeout=120,
                                  env={**os.environ, "FEWSHOT_DEBUG": ""})
        code, stderr = finished.returncode, finished.stderr
    else:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        code, stderr = exit_info.value.code, capsys.readouterr().err
    assert code == 2, stderr
    assert "Traceback" not in stderr, stderr
    assert len(re.findall(r"^(fewshot: )?error:", stderr, flags=re.MULTILINE)) == 1, stderr
    assert re.search(case.culprit, stderr), stderr


def test_fewshot_debug_shows_the_traceback_instead(fake_omniglot, tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSHOT_DEBUG", "1")
    with pytest.raises(ValueError, match="at least 2 ways, got ways=1"):
        main(Where(tmp_path, *fake_omniglot).fit("--data.ways=1"))


def test_a_hostile_checkpoint_given_to_fit_or_test_never_runs(fake_omniglot, tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"state_dict": {}, "hyper_parameters": Payload()}, tmp_path / "shared.ckpt")
    for subcommand in ("fit", "test"):
        with pytest.raises(SystemExit) as exit_info:
            main(Where(tmp_path, *fake_omniglot).fit(f"--ckpt_path={tmp_path / 'shared.ckpt'}",
                                                     subcommand=subcommand))
        assert exit_info.value.code == 2
        assert "shared.ckpt was refused" in capsys.readouterr().err
    assert not marker.exists()


@pytest.mark.parametrize(("mode", "fmt", "suffix"), [
    ("I;16", "PNG", ".png"), ("F", "TIFF", ".tif"), ("CMYK", "JPEG", ".jpg"), ("1", "PNG", ".png")])
def test_images_in_unusual_modes_are_converted_not_refused(tmp_path, mode, fmt, suffix):
    root = image_tree(tmp_path / "images", mode=mode, fmt=fmt, suffix=suffix)
    for channels in (1, 3):
        split = ImageFolder(root, "train", image_size=8, channels=channels,
                            cache_dir=tmp_path / "cache")
        assert split.load_class_images(0, range(4)).shape == (4, channels, 8, 8)
