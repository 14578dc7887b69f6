"""DDP as users launch it: the real ``fewshot fit`` command, 2 CPU processes (gloo).

The other distributed tests build a bare Trainer; these run what a user types, with
validation, checkpointing, the default logger, the gradient monitor and testing after fit, and
check the checkpoint equals a 1-process run's at the same step (float64).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.slow


def write_split_folders(root: Path, seed: int = 0) -> Path:
    """``root/{train,val,test}/<class>/*.png``: 28x28 grayscale, 4/3/3 classes of 5 images."""
    rng = np.random.default_rng(seed)
    for split, classes in (("train", 4), ("val", 3), ("test", 3)):
        for c in range(classes):
            folder = root / split / f"{split}_{c}"
            folder.mkdir(parents=True)
            for i in range(5):
                pixels = (rng.random((28, 28)) > 0.5).astype(np.uint8) * 255
                Image.fromarray(pixels, "L").save(folder / f"{i}.png")
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# 3 tasks per meta-batch on 2 processes (2 and 1) and 3 validation and test episodes: the
# uneven shares are part of what is checked.
def fit_arguments(root: Path, out: Path) -> list[str]:
    return [
        "fit", "--seed_everything=0", "--data.dataset=folder", f"--data.root={root}",
        f"--data.cache_dir={out / 'cache'}", "--data.channels=1", "--data.image_size=28",
        "--data.ways=3", "--data.queries=2", "--data.meta_batch_size=3", "--data.eval_queries=2",
        "--data.val_episodes=3", "--data.test_episodes=3", "--data.steps_per_epoch=4",
        "--model.backbone.hidden_channels=8", "--trainer.precision=64-true",
        "--trainer.accelerator=cpu", "--trainer.max_steps=4", "--trainer.val_check_interval=2",
        "--trainer.check_val_every_n_epoch=null", "--test_after_fit=true",
        f"--trainer.default_root_dir={out}", f"--trainer.logger.init_args.save_dir={out}",
        "--trainer.enable_progress_bar=false", "--grad_monitor.histogram_every_n_steps=2",
    ]


def launch(command: list[str], out: Path) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment,
                            cwd=out)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def fewshot_command() -> list[str]:
    return [sys.executable, "-m", "fewshot"]


def run_folder(out: Path) -> Path:
    (folder,) = (out / "lightning_logs").iterdir()
    return folder


def weights(out: Path) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(run_folder(out) / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 4
    return checkpoint["state_dict"]


@pytest.fixture(scope="module")
def single_process(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    root = write_split_folders(tmp_path_factory.mktemp("folders"))
    out = tmp_path_factory.mktemp("single")
    launch([*fewshot_command(), *fit_arguments(root, out), "--trainer.devices=1"], out)
    return root, weights(out)


LAUNCHES = {
    "strategy": lambda args: [*fewshot_command(), *args, "--trainer.devices=2",
                              "--trainer.strategy=ddp"],
    # The original project's spelling (Lightning 1.x), in the space form.
    "original_accelerator": lambda args: [*fewshot_command(), *args, "--trainer.devices=2",
                                          "--accelerator", "ddp"],
    "torchrun": lambda args: [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                              f"--master_port={free_port()}", "-m", "fewshot", *args,
                              "--trainer.devices=2", "--trainer.strategy=ddp"],
}


@pytest.mark.parametrize("how", list(LAUNCHES))
def test_ddp_fit_with_validation_checkpoints_and_test_equals_one_process(
        single_process, tmp_path, how):
    root, expected = single_process
    result = launch(LAUNCHES[how](fit_arguments(root, tmp_path)), tmp_path)
    assert "Test accuracy over 3 episodes" in result.stdout
    folder = run_folder(tmp_path)
    for name in ("metrics.csv", "test_results.json", "histograms.jsonl", "hparams.yaml"):
        assert (folder / name).is_file(), name
    assert list((folder / "checkpoints").glob("best-*.ckpt"))
    actual = weights(tmp_path)
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        assert value.dtype == torch.float64 or not value.is_floating_point()
        # atol 1e-9: a conv bias before batch norm has no true gradient; Adam normalises its
        # rounding noise into drifts of ~1e-10 that differ with the reduction order. Every
        # other tensor agrees to ~1e-16.
        torch.testing.assert_close(actual[name], value, rtol=1e-9, atol=1e-9, msg=name)


def test_fewer_validation_episodes_than_processes_is_refused_by_name(single_process, tmp_path):
    root, _ = single_process
    command = [*fewshot_command(), *fit_arguments(root, tmp_path), "--data.val_episodes=1",
               "--trainer.devices=2", "--trainer.strategy=ddp"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env=environment, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "val_episodes=1 is fewer than the 2 processes" in result.stderr
    assert "Traceback" not in result.stderr
    shutil.rmtree(tmp_path / "lightning_logs", ignore_errors=True)
