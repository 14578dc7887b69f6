"""A DDP process that dies or hangs: how long the others wait, and an error that names it.

A collective waits for every process of the group. When one is killed its sockets close and
gloo fails at once in the others, with a message about a reset connection; when one hangs (a
stopped process, a lost machine) they wait for the process group's timeout, 30 minutes by
default. :class:`LostProcess` shortens that wait to ``timeout`` seconds once the data are set
up (decoding a dataset on one process while the others wait may take longer), and, when a
collective fails, asks every process through the rendezvous store to report: those that do not
within a few seconds are named as lost in :class:`LostProcessError`.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta

import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer

# What gloo and NCCL say when a peer is gone or silent.
_LOST_PEER_WORDS = ("Connection reset", "Connection closed", "Broken pipe", "Timed out",
                    "timed out", "Socket Timeout", "NCCL communicator was aborted", "gloo")
# How long the survivors wait for each other's report once a collective failed.
_REPORT_WAIT_S = 3.0


class LostProcessError(RuntimeError):
    """A process of a distributed run was lost; this one stopped too."""


class LostProcess(Callback):
    """How long a DDP process waits for a lost peer before it stops with an error naming it.

    Args:
        timeout: seconds a collective (a meta-gradient all-reduce, a barrier) may wait for the
            other processes during training, validation and testing. It must exceed the longest
            gap between two collectives: the slowest process's share of one meta-step, or a
            checkpoint write. Data setup before it keeps the 30-minute default.
    """

    def __init__(self, timeout: float = 120.0) -> None:
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(f"ddp.timeout must be a positive number of seconds, got {timeout!r}")
        self.timeout = float(timeout)
        self.lost_ranks: list[int] | None = None
        self.cause: str = ""

    def _shorten_the_wait(self) -> None:
        if dist.is_available() and dist.is_initialized():
            from torch.distributed.distributed_c10d import _set_pg_timeout

            _set_pg_timeout(timedelta(seconds=self.timeout))

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._shorten_the_wait()

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._shorten_the_wait()

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._shorten_the_wait()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule,
                     exception: BaseException) -> None:
        if trainer.world_size > 1 and is_lost_peer(exception):
            self.cause = _first_line(str(exception))
            self.lost_ranks = _ranks_that_do_not_report(trainer.global_rank, trainer.world_size)

    def error(self, trainer: Trainer) -> LostProcessError:
        """The error to end this process with, after :meth:`on_exception` saw a lost peer."""
        lost = self.lost_ranks or []
        who = (f"process rank {lost[0]}" if len(lost) == 1 else
               f"process ranks {', '.join(map(str, lost))}" if lost else "another process")
        last = getattr(trainer.checkpoint_callback, "last_model_path", "") or ""
        resume = (f" The last checkpoint, {last}, is complete: the same command with "
                  "--ckpt_path last resumes from it." if last else "")
        return LostProcessError(
            f"{who} of {trainer.world_size} was lost (it died or stopped answering for "
            f"--ddp.timeout {self.timeout:g} s: {self.cause}); this process (rank "
            f"{trainer.global_rank}) stops too.{resume}")


def join_this_attempts_process_group(trainer: Trainer) -> None:
    """Under ``torchrun --max-restarts``, after a restart: join a process group of this
    attempt's own, before Lightning creates one.

    torchrun's agent keeps one rendezvous store across attempts, and torch's process group
    registers each process's address under the same keys every attempt: a restarted process
    that reaches the group before its peers reads a dead process's address and fails
    ("Gloo connectFullMesh failed ... Connection refused"). Keys prefixed by the attempt
    cannot be stale. Lightning then finds the group initialised and uses it.
    """
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0)
    world_size = int(os.environ.get("WORLD_SIZE") or 1)
    if (restart == 0 or world_size < 2 or not dist.is_available() or dist.is_initialized()
            or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"):
        return
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=False, timeout=timedelta(minutes=30))
    backend = "nccl" if trainer.strategy.root_device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.PrefixStore(f"fewshot/attempt_{restart}", store),
                            rank=int(os.environ["RANK"]), world_size=world_size)


def is_lost_peer(exception: BaseException) -> bool:
    """Whether ``exception`` is a collective failing because a peer is gone or silent."""
    if isinstance(exception, dist.DistError):
        return True
    return isinstance(exception, RuntimeError) and any(
        word in str(exception) for word in _LOST_PEER_WORDS)


def _ranks_that_do_not_report(rank: int, world_size: int) -> list[int] | None:
    """Every process that reaches this writes its rank to the rendezvous store; the ranks
    missing after a few seconds are lost. None if the store itself is gone (it lives in
    rank 0, or in torchrun's agent)."""
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        store = dist.PrefixStore("fewshot-survivors", _get_default_store())
        store.set_timeout(timedelta(seconds=_REPORT_WAIT_S))
        store.set(str(rank), "1")
        deadline = time.monotonic() + _REPORT_WAIT_S
        missing = [r for r in range(world_size) if r != rank]
        while missing and time.monotonic() < deadline:
            missing = [r for r in missing if not store.check([str(r)])]
            time.sleep(0.2)
        return missing
    except Exception:  # the store's host is lost too (rank 0, or torchrun's agent)
        return [1 - rank] if world_size == 2 else [0] if rank != 0 else None


def _first_line(text: str) -> str:
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return line[:300]


__all__ = ["LostProcess", "LostProcessError", "is_lost_peer", "join_this_attempts_process_group"]
