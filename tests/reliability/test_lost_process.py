"""A rank dies under DDP: 2 gloo processes on the CPU running the real ``fewshot fit``.

- Launched by ``torchrun --max-restarts``, a worker killed with SIGKILL makes torchrun start
  the job again, which resumes from the last checkpoint by itself (no ``--ckpt_path``) and
  ends with exactly the weights of an uninterrupted run.
- Without restarts, the surviving process stops within ``--ddp.timeout`` (and a few seconds)
  with one error naming the lost rank, and the last checkpoint is complete.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_runs import LAUNCHER, FakeOmniglot, assert_same_training_state, final_checkpoint

from fewshot.inference.checkpoints import check_checkpoint_bytes

pytestmark = pytest.mark.slow

STEPS = 8
TIMEOUT_S = 5  # --ddp.timeout of the hanging-process test (the default is 120)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_arguments(fake: FakeOmniglot, run_dir: Path, *extra: str) -> list[str]:
    # The kill tests' command, on 2 processes, without --ckpt_path: the restart must resume alone.
    arguments = [a for a in fake.fit_arguments(run_dir) if a != "--ckpt_path=last"]
    return [*arguments, f"--trainer.max_steps={STEPS}", "--trainer.accelerator=cpu",
            "--trainer.devices=2", "--trainer.strategy=ddp", *extra]


def torchrun(fake: FakeOmniglot, run_dir: Path, *extra: str) -> list[str]:
    # --standalone: a rendezvous of its own per attempt (with a fixed --master_port, the
    # restarted workers can find the dead ones' addresses and fail to connect).
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            *extra, str(LAUNCHER), *ddp_arguments(fake, run_dir)]


def start(command: list[str], fake: FakeOmniglot, run_dir: Path) -> tuple[subprocess.Popen, Path]:
    run_dir.mkdir(parents=True, exist_ok=True)
    stderr = run_dir / "stderr.txt"
    process = subprocess.Popen(command, env=fake.environment(MASTER_PORT=str(free_port())),
                               cwd=run_dir, stdout=subprocess.DEVNULL, stderr=stderr.open("w"))
    return process, stderr


def wait(process: subprocess.Popen, timeout: float = 600) -> int:
    try:
        return process.wait(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def worker_of_rank(parent: int, rank: int) -> int:
    """The pid of the child of ``parent`` (torchrun's agent, or Lightning's rank 0) that runs
    rank ``rank``, once it has started."""
    for _ in range(600):
        children = subprocess.run(["pgrep", "-P", str(parent)], capture_output=True,
                                  text=True).stdout.split()
        for pid in map(int, children):
            try:
                environment = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"LOCAL_RANK={rank}".encode() in environment:
                return pid
        time.sleep(0.1)
    raise AssertionError(f"no process of rank {rank} under {parent}")


def after_the_first_checkpoints(run_dir: Path, steps: int = 3) -> None:
    """Wait until a ``last.ckpt`` of step ``steps`` or later is on disk."""
    import torch

    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        for path in run_dir.rglob("last.ckpt"):
            try:
                if torch.load(path, weights_only=True)["global_step"] >= steps:
                    return
            except Exception:  # being replaced at this moment
                pass
        time.sleep(0.2)
    raise AssertionError("the run wrote no checkpoint")


def test_torchrun_restarts_a_killed_worker_and_ends_with_the_uninterrupted_weights(
        fake_cli, tmp_path):
    elastic_dir = tmp_path / "elastic"
    elastic, elastic_err = start(torchrun(fake_cli, elastic_dir, "--max-restarts=1"), fake_cli,
                                 elastic_dir)
    worker = worker_of_rank(elastic.pid, 1)
    after_the_first_checkpoints(elastic_dir)
    os.kill(worker, signal.SIGKILL)
    assert wait(elastic) == 0, elastic_err.read_text()[-5000:]
    # One after the other: four processes on two cores would only be slower.
    reference, reference_err = start(torchrun(fake_cli, tmp_path / "uninterrupted"), fake_cli,
                                     tmp_path / "uninterrupted")
    assert wait(reference) == 0, reference_err.read_text()[-5000:]
    stderr = elastic_err.read_text()
    assert "torchrun restart 1: resuming from the last checkpoint" in stderr, stderr[-5000:]
    assert "Resuming run version_0 from step" in stderr, stderr[-5000:]
    assert_same_training_state(final_checkpoint(elastic_dir),
                               final_checkpoint(tmp_path / "uninterrupted"))


@pytest.mark.parametrize("fault", ["SIGSTOP", "SIGKILL"])
def test_the_survivor_of_a_lost_process_stops_in_bounded_time_naming_it(fake_cli, tmp_path,
                                                                         fault):
    """SIGSTOP: the process hangs with its sockets open, so only the timeout ends the wait.
    SIGKILL: its sockets close; gloo fails at once, or Lightning's launcher sees the child die
    and ends the run itself (whichever comes first), naming the rank either way."""
    command = [sys.executable, str(LAUNCHER),
               *ddp_arguments(fake_cli, tmp_path, f"--ddp.timeout={TIMEOUT_S}",
                              "--trainer.max_steps=10000")]
    survivor, stderr_path = start(command, fake_cli, tmp_path)
    victim = worker_of_rank(survivor.pid, 1)
    try:
        after_the_first_checkpoints(tmp_path, steps=2)
        os.kill(victim, getattr(signal, fault))
        lost_at = time.monotonic()
        code = wait(survivor, timeout=120)
        exit_seconds = time.monotonic() - lost_at
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)
    stderr = stderr_path.read_text()
    print(f"{fault}: the survivor exited {exit_seconds:.1f} s after its peer was lost")
    assert code != 0
    if fault == "SIGSTOP":
        assert exit_seconds < TIMEOUT_S + 15, exit_seconds
        assert code == 1, stderr[-3000:]
        error_lines = [line for line in stderr.splitlines() if line.startswith("fewshot: error:")]
        assert len(error_lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
        assert f"process rank 1 of 2 was lost (it died or stopped answering for --ddp.timeout "\
               f"{TIMEOUT_S} s" in error_lines[0]
    else:
        assert exit_seconds < 30, exit_seconds
        assert (f"Child process with PID {victim} terminated with code -9" in stderr
                or "process rank 1 of 2 was lost" in stderr), stderr[-3000:]
    (last,) = tmp_path.rglob("last.ckpt")
    check_checkpoint_bytes(last)  # complete: every record matches its CRC-32
    import torch

    assert torch.load(last, weights_only=True)["global_step"] >= 2
