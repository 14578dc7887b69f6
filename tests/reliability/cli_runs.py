"""Real ``fewshot fit`` processes on the fake Omniglot: start them, kill them, read what they left.

Every run of a test uses the same command line, as a job restarted after preemption would:
``--ckpt_path last`` starts from scratch when there is nothing to resume, and from the newest
``last.ckpt`` of the experiment folder otherwise. A checkpoint is written after every step.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

LAUNCHER = Path(__file__).with_name("fake_omniglot_cli.py")
MAX_STEPS = 16
STEPS_PER_EPOCH = 4  # validation after steps 4, 8, 12 and 16
# Columns that measure the machine, not the training.
TIMING_COLUMNS = {"train/tasks_per_s", "train/elapsed_s", "val/elapsed_s"}


@dataclass(frozen=True)
class FakeOmniglot:
    root: Path
    cache: Path
    counts: dict[str, int]
    split_sizes: tuple[int, int, int]

    def environment(self, **extra: str) -> dict[str, str]:
        fake = {"expected_characters": self.counts, "maml_split_sizes": self.split_sizes}
        # One thread: the runs are tiny, and the machine is shared.
        return {**os.environ, "FEWSHOT_FAKE_OMNIGLOT": json.dumps(fake),
                "FEWSHOT_CACHE_DIR": str(self.cache), "OMP_NUM_THREADS": "1", **extra}

    def fit_arguments(self, run_dir: Path, *extra: str) -> list[str]:
        return ["fit", f"--data.root={self.root}", f"--data.cache_dir={self.cache}",
                "--data.ways=3", "--data.queries=2", "--data.meta_batch_size=2",
                "--data.eval_queries=2", "--data.val_episodes=2",
                f"--data.steps_per_epoch={STEPS_PER_EPOCH}",
                "--model.backbone.hidden_channels=8",
                "--model.algorithm.init_args.eval_inner_steps=1",
                f"--trainer.max_steps={MAX_STEPS}", "--trainer.log_every_n_steps=1",
                "--trainer.num_sanity_val_steps=0", "--checkpoint.every_n_train_steps=1",
                f"--trainer.default_root_dir={run_dir}",
                f"--trainer.logger.init_args.save_dir={run_dir}",
                "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
                "--ckpt_path=last", *extra]


@dataclass
class Run:
    """One process: its run folder (``version_N``, None if it died before making one)."""

    returncode: int
    folder: Path | None
    stderr: str


def versions(run_dir: Path) -> list[Path]:
    folders = (run_dir / "lightning_logs").glob("version_*")
    return sorted(folders, key=lambda folder: int(folder.name.split("_")[1]))


def start(fake: FakeOmniglot, run_dir: Path, *extra: str, **env: str) -> tuple[subprocess.Popen, Path]:
    run_dir.mkdir(parents=True, exist_ok=True)
    stderr_path = run_dir / f"stderr-{time.monotonic_ns()}.txt"
    process = subprocess.Popen(
        [sys.executable, str(LAUNCHER), *fake.fit_arguments(run_dir, *extra)],
        env=fake.environment(**env), stdout=subprocess.DEVNULL, stderr=stderr_path.open("w"))
    return process, stderr_path


def finish(process: subprocess.Popen, stderr_path: Path, timeout: float = 120.0) -> Run:
    """Wait for a process from :func:`start` to end."""
    process.wait(timeout=timeout)
    folders = versions(stderr_path.parent)
    return Run(process.returncode, folders[-1] if folders else None, stderr_path.read_text())


def run(fake: FakeOmniglot, run_dir: Path, *extra: str,
        kill_when: Callable[[Path], bool] | None = None, delay: float = 0.0,
        timeout: float = 120.0, **env: str) -> Run:
    """Run ``fewshot fit`` to its end, or SIGKILL it ``delay`` seconds after ``kill_when`` says
    so (given the new run folder, polled every few milliseconds)."""
    before = set(versions(run_dir))
    process, stderr_path = start(fake, run_dir, *extra, **env)
    deadline = time.monotonic() + timeout
    try:
        while kill_when is not None and process.poll() is None:
            new = [v for v in versions(run_dir) if v not in before]
            if new and kill_when(new[0]):
                time.sleep(delay)
                process.send_signal(signal.SIGKILL)
                break
            assert time.monotonic() < deadline, "the run neither ended nor reached the kill point"
            time.sleep(0.005)
        process.wait(timeout=max(deadline - time.monotonic(), 1.0))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    new = [v for v in versions(run_dir) if v not in before]
    return Run(process.returncode, new[0] if new else None, stderr_path.read_text())


def metric_rows(folder: Path) -> list[dict[str, str]]:
    """The rows of ``folder/metrics.csv`` written so far (a half-written last line is left out)."""
    try:
        text = (folder / "metrics.csv").read_text()
    except FileNotFoundError:
        return []
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines = lines[:-1]
    return list(csv.DictReader(lines))


def training_rows(run_dir: Path) -> list[dict[str, str]]:
    """Every training row every run in ``run_dir`` logged (a step logged twice, by a killed run
    and by the run resuming it, appears twice): the non-empty ``train/*`` and ``epoch`` values."""
    rows = []
    for folder in versions(run_dir):
        for row in metric_rows(folder):
            if row.get("train/loss"):
                rows.append({k: v for k, v in row.items() if v and k not in TIMING_COLUMNS
                             and (k.startswith("train/") or k in ("step", "epoch"))})
    return rows


def steps_logged(folder: Path) -> int:
    return sum(1 for row in metric_rows(folder) if row.get("train/loss"))


def final_checkpoint(run_dir: Path) -> Path:
    return max(run_dir.rglob("last.ckpt"), key=lambda path: path.stat().st_mtime_ns)


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_identical(a: Any, b: Any, where: str = "checkpoint") -> None:
    """Equal structure, and bit-identical tensors (``torch.equal``) all the way down."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: {a.keys()} != {b.keys()}"
        for key in a:
            assert_identical(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{where}[{index}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_training_state(path: Path, reference: Path) -> None:
    """Weights, Adam's moments and step counts, scheduler, global step and epoch are identical."""
    got, want = load(path), load(reference)
    for key in ("global_step", "epoch", "state_dict", "optimizer_states", "lr_schedulers"):
        assert_identical(got[key], want[key], key)
