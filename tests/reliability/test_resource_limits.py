"""Memory, pixels and disk running out: the project's own error naming what to change, never
the operating system's kill, a decoded bomb, or half a file."""

from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import resource
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_exit_codes import Where, bad_image_tree, image_tree
from test_silent_corruption import save_a_checkpoint

from fewshot.cli import main
from fewshot.data import split_cache
from fewshot.data.image_decoding import MAX_IMAGE_PIXELS
from fewshot.data.image_folder import ImageFolder
from fewshot.inference import export as export_module
from fewshot.inference.checkpoints import read_model
from fewshot.inference.export import CheckpointError, write_export
from fewshot.inference.images import ImageError, Preprocessing

MEMORY_LIMIT_GIB = 3  # address space of the whole process: torch and Lightning take about 1.5


def rgb_tree(root: Path, size: int = 84) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        for c in range(5):
            folder = root / split / f"{split}{c}"
            folder.mkdir(parents=True)
            for i in range(4):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


@pytest.mark.slow
def test_a_meta_step_beyond_the_memory_limit_names_the_executors_that_bound_it(tmp_path):
    """ResNet-12 at 84 px, second order, 5 inner steps, 4 tasks: about 5 GiB, in a process
    limited to 3 GiB (RLIMIT_AS)."""
    root = rgb_tree(tmp_path / "images")
    limit = MEMORY_LIMIT_GIB * 2**30

    def limit_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    finished = subprocess.run(
        [sys.executable, "-m", "fewshot", "fit", "--data.dataset=folder", f"--data.root={root}",
         f"--data.cache_dir={tmp_path / 'cache'}", "--data.channels=3", "--data.image_size=84",
         "--data.ways=5", "--data.queries=3", "--data.meta_batch_size=4",
         "--data.eval_queries=1", "--data.val_episodes=1",
         "--model.backbone=fewshot.models.ResNet12",
         "--model.algorithm=fewshot.algorithms.MAML", "--model.algorithm.init_args.inner_steps=5",
         "--trainer.max_steps=1", "--trainer.num_sanity_val_steps=0",
         "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path / 'runs'}"],
        preexec_fn=limit_memory, capture_output=True, text=True, timeout=300,
        # One thread and two malloc arenas: the address space of a many-core machine's threads
        # would otherwise count against the limit before the meta-step does.
        env={**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2", "FEWSHOT_DEBUG": ""})
    stderr = finished.stderr
    assert finished.returncode == 2, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    (line,) = [line for line in stderr.splitlines() if line.startswith("fewshot: error:")]
    assert "the meta-step needs more memory than this process may use" in line
    assert "memory_budget_gib" in line and "MemoryBudget --model.executor.budget_gib" in line
    assert "checkpoint_inner_steps" in line and "RecomputeInnerSteps" in line


def bomb_png() -> bytes:
    """A real, decodable 1-bit PNG of 10,000 x 10,000 pixels (100 million: just over the
    limit) in a few kilobytes; it decodes to 100 MB as grayscale, 300 MB as RGB."""
    buffer = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(buffer, format="PNG")
    assert MAX_IMAGE_PIXELS < 10_000 * 10_000 and len(buffer.getvalue()) < 100_000
    return buffer.getvalue()


def test_a_decompression_bomb_is_refused_by_name(fake_omniglot, tmp_path, capsys):
    bomb = bomb_png()
    where = Where(tmp_path, *fake_omniglot)
    # In a training folder: the one error naming every bad file, exit code 2.
    with pytest.raises(SystemExit) as exit_info:
        main(where.folder(bad_image_tree(where, "bomb.png", bomb)))
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2, stderr
    assert re.search(r"bomb.png: refused as a possible decompression bomb: 10000 x 10000 = "
                     r"100,000,000 pixels, more than the 89,478,485", stderr), stderr
    # Given to adapt (the inference reader).
    (tmp_path / "query").mkdir()
    (tmp_path / "query" / "bomb.png").write_bytes(bomb)
    with pytest.raises(ImageError, match=r"bomb.png: refused as a possible decompression bomb"):
        Preprocessing.for_dataset("omniglot", 28, 1).prepare(tmp_path / "query" / "bomb.png")


class _DiskFillsUp(io.RawIOBase):
    """A file on a disk with ``room`` bytes left: what fits is written, then ENOSPC."""

    def __init__(self, file, room: int) -> None:
        self.file, self.room = file, room

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        data = bytes(data)
        if len(data) > self.room:
            self.file.write(data[: self.room])
            self.file.flush()
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.file.write(data)

    def close(self) -> None:
        self.file.close()
        super().close()

    def fileno(self) -> int:
        return self.file.fileno()


@contextlib.contextmanager
def disk_with_room(monkeypatch: pytest.MonkeyPatch, module, room: int) -> Iterator[None]:
    """Files ``module`` opens with ``os.fdopen`` hold at most ``room`` bytes each."""
    real = os.fdopen
    monkeypatch.setattr(module.os, "fdopen",
                        lambda fd, *a, **k: _DiskFillsUp(real(fd, *a, **k), room))
    yield
    monkeypatch.setattr(module.os, "fdopen", real)


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A real 128 KiB tmpfs (root only; skipped elsewhere)."""
    folder = tmp_path / "small-disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(folder)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize("disk", ["simulated", "tmpfs"])
def test_a_full_disk_while_writing_the_cache_leaves_no_half_file_and_names_it(
        tmp_path, monkeypatch, request, disk):
    root = image_tree(tmp_path / "images", per_class=6)
    if disk == "tmpfs":
        cache = request.getfixturevalue("small_filesystem")
        size, room = 96, None  # 9 classes x 6 images x 96 x 96 x 3 = 448 KiB > 128 KiB
    else:
        cache, size, room = tmp_path / "cache", 32, 10_000
    with contextlib.ExitStack() as stack:
        if room is not None:
            stack.enter_context(disk_with_room(monkeypatch, split_cache, room))
        # numpy's writer reports a short write ("N requested and M written") as its error.
        with pytest.warns(UserWarning, match=rf"Cannot write the image cache: writing "
                                             rf"{re.escape(str(cache))}/.*\.npy failed \((.*No "
                                             r"space left on device|\d+ requested and \d+ "
                                             r"written)\)"):
            split = ImageFolder(root, "train", image_size=size, channels=3, cache_dir=cache)
    assert split.load_class_images(0, [0]).shape == (1, 3, size, size)  # served from memory
    assert leftovers(cache) == []


@pytest.mark.parametrize("disk", ["simulated", "tmpfs"])
def test_a_full_disk_while_writing_an_export_leaves_no_half_file_and_names_it(
        fake_omniglot, tmp_path, monkeypatch, request, disk):
    # hidden_channels=64: about 450 KiB of weights
    where = Where(tmp_path, *fake_omniglot)
    model = read_model(save_a_checkpoint(where, tmp_path / "checkpoints",
                                         "--model.backbone.hidden_channels=64"))
    if disk == "tmpfs":
        target = request.getfixturevalue("small_filesystem") / "export"
        stack = contextlib.nullcontext()
    else:
        target = tmp_path / "export"
        stack = disk_with_room(monkeypatch, export_module, 100_000)
    with stack, pytest.raises(CheckpointError, match=rf"cannot write the export: writing "
                                                     rf"{re.escape(str(target))}/model.safetensors "
                                                     r"failed \(No space left on device\)"):
        write_export(model, target)
    assert leftovers(target) == []
