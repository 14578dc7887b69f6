"""Callbacks alone: the throughput of the whole meta-batch, also under DDP."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from fewshot.training import callbacks
from fewshot.training.callbacks import Throughput


class Recorder:
    def __init__(self) -> None:
        self.logged: dict[str, float] = {}

    def log(self, name, value, **kwargs) -> None:
        self.logged[name] = value


@pytest.mark.parametrize(("datamodule", "world_size", "local_tasks", "expected"), [
    (None, 1, 4, 4 / 0.5),
    (None, 2, 2, 4 / 0.5),                                     # each process holds half
    (SimpleNamespace(hparams={"meta_batch_size": 3}), 2, 2, 3 / 0.5),  # uneven shares: 2 and 1
])
def test_tasks_per_second_counts_every_process(monkeypatch, datamodule, world_size, local_tasks,
                                               expected):
    clock = iter([10.0, 10.5])
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: next(clock))
    trainer = SimpleNamespace(datamodule=datamodule, world_size=world_size)
    module, batch = Recorder(), SimpleNamespace(num_tasks=local_tasks)
    throughput = Throughput()
    throughput.on_train_batch_end(trainer, module, None, batch, 0)
    throughput.on_train_batch_end(trainer, module, None, batch, 1)
    assert module.logged["train/tasks_per_s"] == pytest.approx(expected)
    # A validation in between does not count as a step.
    throughput.on_validation_end(trainer, module)
    assert throughput._last is None


def test_elapsed_time_is_logged_every_step_and_carries_over_a_resume(monkeypatch):
    clock = iter([100.0, 100.0, 103.0, 200.0, 200.0, 201.0, 201.5])
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: next(clock))
    trainer = SimpleNamespace(datamodule=None, world_size=1)
    module, batch = Recorder(), SimpleNamespace(num_tasks=2)
    first = Throughput()
    first.on_fit_start(trainer, module)                    # 100.0
    first.on_train_batch_end(trainer, module, None, batch, 0)  # now 100.0, elapsed at 103.0
    assert module.logged["train/elapsed_s"] == pytest.approx(3.0)
    saved = first.state_dict()                             # a checkpoint: 200.0 -> 100 s
    assert saved == {"elapsed_s": pytest.approx(100.0)}
    resumed = Throughput()
    resumed.load_state_dict(saved)
    resumed.on_fit_start(trainer, module)                  # 200.0
    resumed.on_train_batch_end(trainer, module, None, batch, 0)  # elapsed at 201.5
    assert module.logged["train/elapsed_s"] == pytest.approx(101.5)


def test_the_training_clock_stops_at_the_end_of_fit(monkeypatch):
    clock = iter([10.0, 25.0, 100.0])
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: next(clock))
    throughput, trainer, module = Throughput(), SimpleNamespace(), Recorder()
    throughput.on_fit_start(trainer, module)   # 10.0
    throughput.on_fit_end(trainer, module)     # 25.0: 15 s of training
    assert throughput.trained and throughput.elapsed() == pytest.approx(15.0)  # not 90 s later


def test_testing_the_best_checkpoint_after_fit_keeps_the_whole_training_time(monkeypatch):
    clock = iter([10.0, 70.0])
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: next(clock))
    throughput, trainer, module = Throughput(), SimpleNamespace(), Recorder()
    throughput.on_fit_start(trainer, module)   # 10.0
    throughput.on_fit_end(trainer, module)     # 70.0: 60 s of training
    throughput.load_state_dict({"elapsed_s": 25.0})  # the best checkpoint, saved at 25 s
    assert throughput.elapsed() == pytest.approx(60.0)
    fresh = Throughput()  # a resume or a test in a new process takes the checkpoint's clock
    fresh.load_state_dict({"elapsed_s": 25.0})
    assert fresh.elapsed() == pytest.approx(25.0)
