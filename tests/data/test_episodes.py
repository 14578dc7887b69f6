"""Episode sampling: shapes, labels, disjointness, determinism and size errors."""

from __future__ import annotations

import pytest
import torch
from numbered_images import NumberedImages

from fewshot.data.episodes import (
    TEST_STREAM,
    TRAIN_STREAM,
    EvaluationEpisodes,
    MetaBatches,
    StepSampler,
    sample_task,
    task_rng,
)


def decode(images: torch.Tensor) -> list[tuple[int, int]]:
    values = images[:, 0, 0, 0].long().tolist()
    return [(v // 100, v % 100) for v in values]


def test_task_shapes_labels_and_disjoint_support_query():
    data = NumberedImages([20] * 10)
    sx, sy, qx, qy = sample_task(data, ways=5, shots=2, queries=3, rng=task_rng(0, TRAIN_STREAM, 0))
    assert sx.shape == (10, 1, 2, 2) and qx.shape == (15, 1, 2, 2)
    assert sy.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert qy.tolist() == [label for label in range(5) for _ in range(3)]
    support, query = decode(sx), decode(qx)
    assert not set(support) & set(query)
    # every label stands for exactly one class, the same in support and query
    label_class = {}
    for (cls, _), label in zip(support + query, sy.tolist() + qy.tolist(), strict=True):
        assert label_class.setdefault(label, cls) == cls
    assert len(set(label_class.values())) == 5


def test_meta_batch_is_a_pure_function_of_seed_and_step():
    data = NumberedImages([20] * 30)
    batches = MetaBatches(data, 5, 1, 2, tasks_per_batch=4, seed=7, length=100)
    again = MetaBatches(data, 5, 1, 2, tasks_per_batch=4, seed=7, length=100)
    assert batches[42].support_x.shape == (4, 5, 1, 2, 2)
    assert batches[42].query_y.shape == (4, 10)
    torch.testing.assert_close(batches[42], again[42])  # any order of access
    assert not torch.equal(batches[42].support_x, batches[43].support_x)
    other_seed = MetaBatches(data, 5, 1, 2, tasks_per_batch=4, seed=8, length=100)
    assert not torch.equal(batches[42].support_x, other_seed[42].support_x)


def test_evaluation_episodes_do_not_depend_on_batching():
    data = NumberedImages([20] * 30)
    by_4 = EvaluationEpisodes(data, 5, 1, 3, episodes=10, tasks_per_batch=4, seed=0,
                              stream=TEST_STREAM, split="test")
    by_3 = EvaluationEpisodes(data, 5, 1, 3, episodes=10, tasks_per_batch=3, seed=0,
                              stream=TEST_STREAM, split="test")
    assert len(by_4) == 3 and by_4[2].num_tasks == 2
    flat_4 = torch.cat([by_4[i].query_x for i in range(len(by_4))])
    flat_3 = torch.cat([by_3[i].query_x for i in range(len(by_3))])
    torch.testing.assert_close(flat_4, flat_3)
    with pytest.raises(IndexError):
        by_4[3]


def test_size_errors_name_split_and_numbers():
    with pytest.raises(ValueError, match=r"20-way tasks need 20 classes, but the 'val' split has only 8"):
        MetaBatches(NumberedImages([20] * 8), 20, 1, 1, 4, 0, 10, split="val")
    small = NumberedImages([20, 20, 5, 20, 20])
    with pytest.raises(ValueError, match=r"need 6 images, but class 'class2' of the 'train' split has only 5"):
        EvaluationEpisodes(small, 5, 1, 5, 10, 2, 0, TEST_STREAM, split="train")
    with pytest.raises(ValueError, match="shots >= 1"):
        MetaBatches(small, 5, 0, 1, 4, 0, 10)


def test_step_sampler_covers_epochs_and_skips_trained_steps_on_resume():
    sampler = StepSampler(steps_per_epoch=5)
    sampler.set_epoch(1)
    assert list(sampler) == [5, 6, 7, 8, 9]
    resumed = StepSampler(steps_per_epoch=5, first_step=7)
    resumed.set_epoch(1)
    assert list(resumed) == [7, 8, 9] and len(resumed) == 5
    resumed.set_epoch(2)
    assert list(resumed) == [10, 11, 12, 13, 14]
