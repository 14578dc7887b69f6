"""Same config and seed, same run: two CPU ``fewshot fit`` processes log the same values and end
with the same weights; evaluation does not depend on the number of DataLoader workers."""

from __future__ import annotations

import torch
from cli_runs import TIMING_COLUMNS, assert_identical, load, metric_rows, versions

from fewshot.training.datamodule import FewShotDataModule


def test_two_runs_with_the_same_config_and_seed_are_identical(uninterrupted_runs):
    first, second = uninterrupted_runs()
    (run_a,), (run_b,) = versions(first), versions(second)
    rows_a, rows_b = metric_rows(run_a), metric_rows(run_b)
    assert len(rows_a) > 12  # training, gradient-norm and validation rows
    for row_a, row_b in zip(rows_a, rows_b, strict=True):
        for column in TIMING_COLUMNS:
            row_a.pop(column), row_b.pop(column)
        assert row_a == row_b  # every logged value, as written: bit for bit
    checkpoints_a = sorted(p.name for p in (run_a / "checkpoints").glob("*.ckpt"))
    assert checkpoints_a == sorted(p.name for p in (run_b / "checkpoints").glob("*.ckpt"))
    for name in checkpoints_a:
        a, b = load(run_a / "checkpoints" / name), load(run_b / "checkpoints" / name)
        for key in ("global_step", "epoch", "state_dict", "optimizer_states"):
            assert_identical(a[key], b[key], f"{name}: {key}")


def test_evaluation_episodes_do_not_depend_on_the_workers(fake_omniglot):
    root, cache = fake_omniglot
    served = {}
    for workers in (0, 2):
        data = FewShotDataModule(root=str(root), cache_dir=str(cache), ways=3, eval_queries=2,
                                 val_episodes=4, test_episodes=6, eval_batch_size=2,
                                 num_workers=workers)
        data.setup("validate")
        data.setup("test")
        served[workers] = [list(data.val_dataloader()), list(data.test_dataloader())]
    assert [len(batches) for batches in served[0]] == [2, 3]
    torch.testing.assert_close(served[2], served[0], rtol=0, atol=0)

