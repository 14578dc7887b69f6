"""Sine-wave tasks (MAML section 5.1): the distribution's ranges, shapes, determinism, the data module."""

from __future__ import annotations

import math

import pytest
import torch

from fewshot.data.episodes import TEST_STREAM, TRAIN_STREAM, VALIDATION_STREAM, task_rng
from fewshot.data.registry import task_of
from fewshot.data.sinusoid import PAPER, SineWave, Sinusoid, SinusoidEpisodes, SinusoidMetaBatches
from fewshot.training.datamodule import FewShotDataModule


def test_the_papers_ranges_and_the_targets_are_the_wave():
    assert Sinusoid((0.1, 5.0), (0.0, math.pi), (-5.0, 5.0)) == PAPER
    waves, inputs, targets = [], [], []
    for index in range(1000):
        wave, (sx, sy, qx, qy) = PAPER.task(task_rng(3, TEST_STREAM, index), shots=5, queries=10)
        assert sx.shape == sy.shape == (5, 1) and qx.shape == qy.shape == (10, 1)
        assert sx.dtype == sy.dtype == torch.float32
        waves.append(wave)
        inputs.append(torch.cat([sx, qx]))
        targets.append(torch.cat([sy, qy]))
    amplitudes = torch.tensor([w.amplitude for w in waves])
    phases = torch.tensor([w.phase for w in waves])
    x = torch.stack(inputs)
    torch.testing.assert_close(torch.stack(targets),
                               amplitudes[:, None, None] * torch.sin(x - phases[:, None, None]))
    for values, (low, high) in ((amplitudes, (0.1, 5.0)), (phases, (0.0, math.pi)),
                                (x, (-5.0, 5.0))):
        assert low <= values.min() and values.max() <= high
        # Uniform, and spread over the whole range: each tenth of it holds its share.
        counts = torch.histc(values.double(), bins=10, min=low, max=high)
        assert counts.min() > 0.6 * values.numel() / 10


def test_sine_wave_is_amplitude_times_sine_of_x_minus_phase():
    x = torch.tensor([[0.0], [math.pi / 2]])
    torch.testing.assert_close(SineWave(2.0, 0.0)(x), torch.tensor([[0.0], [2.0]]))
    torch.testing.assert_close(SineWave(1.0, math.pi / 2)(x), torch.tensor([[-1.0], [0.0]]))


def test_a_meta_batch_is_a_pure_function_of_seed_and_step():
    batches = SinusoidMetaBatches(shots=10, queries=10, tasks_per_batch=25, seed=7, length=100)
    again = SinusoidMetaBatches(shots=10, queries=10, tasks_per_batch=25, seed=7, length=100)
    batch = batches[42]
    assert batch.support_x.shape == (25, 10, 1) and batch.query_y.shape == (25, 10, 1)
    for part, same in zip(batch, again[42], strict=True):
        assert torch.equal(part, same)
    assert not torch.equal(batches[43].support_x, batch.support_x)
    other_seed = SinusoidMetaBatches(shots=10, queries=10, tasks_per_batch=25, seed=8, length=100)
    assert not torch.equal(other_seed[42].support_x, batch.support_x)
    # Task j of step i is the j-th draw of its own generator, whoever asks.
    _, task = PAPER.task(task_rng(7, TRAIN_STREAM, 42, 3), 10, 10)
    assert torch.equal(batch.support_x[3], task[0])


def test_distributed_shares_are_the_single_process_meta_batch():
    whole = SinusoidMetaBatches(5, 10, 25, seed=0, length=10)[4]
    shares = [SinusoidMetaBatches(5, 10, 25, seed=0, length=10, rank=r, world_size=2)[4]
              for r in range(2)]
    assert [s.num_tasks for s in shares] == [13, 12]
    assert torch.equal(torch.cat([s.support_x for s in shares]), whole.support_x)


def test_evaluation_tasks_are_fixed_by_the_seed_whatever_the_batching():
    def tasks(batch_size: int, seed: int = 0, stream: int = TEST_STREAM) -> torch.Tensor:
        episodes = SinusoidEpisodes(5, 20, episodes=11, tasks_per_batch=batch_size, seed=seed,
                                    stream=stream, split="test")
        return torch.cat([episodes[i].query_y for i in range(len(episodes))])

    assert tasks(4).shape == (11, 20, 1)
    assert torch.equal(tasks(4), tasks(11)) and torch.equal(tasks(4), tasks(1))
    assert not torch.equal(tasks(4), tasks(4, seed=1))
    assert not torch.equal(tasks(4), tasks(4, stream=VALIDATION_STREAM))
    episodes = SinusoidEpisodes(5, 20, 11, 4, seed=0, stream=TEST_STREAM, split="test")
    same = SinusoidEpisodes(5, 20, 11, 3, seed=0, stream=TEST_STREAM, split="test")
    other = SinusoidEpisodes(5, 20, 11, 4, seed=1, stream=TEST_STREAM, split="test")
    assert episodes.fingerprint() == same.fingerprint() != other.fingerprint()
    wave, task = episodes.wave_and_task(6)
    torch.testing.assert_close(task[3], wave(task[2]))
    with pytest.raises(IndexError):
        episodes[len(episodes)]


@pytest.mark.parametrize(("arguments", "message"), [
    ({"shots": 0, "queries": 10}, "shots >= 1 and queries >= 1, got shots=0"),
    ({"shots": 5, "queries": 0}, "queries=0"),
])
def test_task_sizes_are_checked_by_name(arguments, message):
    with pytest.raises(ValueError, match=message):
        SinusoidMetaBatches(**arguments, tasks_per_batch=25, seed=0, length=1)
    with pytest.raises(ValueError, match="meta_batch_size must be >= 1"):
        SinusoidMetaBatches(5, 10, tasks_per_batch=0, seed=0, length=1)
    with pytest.raises(ValueError, match="test_episodes must be >= 1"):
        SinusoidEpisodes(5, 10, 0, 1, seed=0, stream=TEST_STREAM, split="test")


def test_the_data_module_serves_sine_waves_and_says_they_are_regression():
    assert task_of("sinusoid") == "regression" and task_of("omniglot") == "classification"
    data = FewShotDataModule(dataset="sinusoid", ways=1, shots=5, queries=10, meta_batch_size=25,
                             eval_queries=30, val_episodes=7, test_episodes=9, eval_batch_size=4)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch.support_x.shape == (25, 5, 1) and batch.query_x.shape == (25, 10, 1)
    assert torch.equal(batch.support_y, data.train_set[0].support_y)  # step 0 first
    assert sum(b.num_tasks for b in data.val_dataloader()) == 7
    data.setup("test")
    test = next(iter(data.test_dataloader()))
    assert test.query_x.shape == (4, 30, 1)
    assert data.test_set.fingerprint() != data.val_set.fingerprint()


def test_sine_waves_have_one_way():
    with pytest.raises(ValueError, match="sinusoid tasks are regression, one function each: "
                                         "ways must be 1, got ways=5"):
        FewShotDataModule(dataset="sinusoid", ways=5)
