"""Distributed meta-training: 2 CPU processes (gloo) compute what 1 process computes."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from numbered_images import NumberedImages

from fewshot.algorithms import MAML, MAMLPlusPlus
from fewshot.data.episodes import TEST_STREAM, EvaluationEpisodes, MetaBatches
from fewshot.execution import Loop
from fewshot.models import Conv4
from fewshot.training.datamodule import FewShotDataModule
from fewshot.training.module import MetaLearner

ALGORITHMS = {
    "maml": lambda: MAML(inner_steps=2, inner_lr=0.4),
    # Everything of MAML++ that adds state shared over processes: learned per-step rates,
    # per-step batch-norm weights and running statistics (gathered over the processes).
    "mamlpp": lambda: MAMLPlusPlus(inner_steps=2, inner_lr=0.4, multi_step_loss=True,
                                   multi_step_loss_epochs=5, learned_rates="per_tensor",
                                   derivative_order_annealing=False, per_step_bn_weights=True,
                                   batch_norm="per_step_running"),
}


@pytest.mark.parametrize(("tasks", "world_size", "sizes"), [(4, 2, [2, 2]), (3, 2, [2, 1]),
                                                            (5, 3, [2, 2, 1]), (3, 3, [1, 1, 1])])
def test_shards_of_a_meta_batch_are_the_single_process_batch(tasks, world_size, sizes):
    data = NumberedImages([20] * 30)
    whole = MetaBatches(data, 5, 1, 2, tasks_per_batch=tasks, seed=3, length=10)[7]
    shares = [MetaBatches(data, 5, 1, 2, tasks, 3, 10, rank=r, world_size=world_size)[7]
              for r in range(world_size)]
    assert [share.num_tasks for share in shares] == sizes
    for part, joined in zip(whole, zip(*shares, strict=True), strict=True):
        torch.testing.assert_close(part, torch.cat(joined))


def test_fewer_tasks_or_episodes_than_processes_are_refused_by_name():
    data = NumberedImages([20] * 30)
    with pytest.raises(ValueError, match="meta_batch_size=2 is fewer than the 3 processes"):
        MetaBatches(data, 5, 1, 2, 2, 3, 10, rank=0, world_size=3)
    with pytest.raises(ValueError, match="val_episodes=1 is fewer than the 2 processes"):
        EvaluationEpisodes(data, 5, 1, 3, 1, 2, 0, TEST_STREAM, "val", rank=1, world_size=2)


@pytest.mark.parametrize("world_size", [2, 3])
def test_evaluation_episodes_are_the_same_set_whatever_the_world_size(world_size):
    data = NumberedImages([20] * 30)
    single = EvaluationEpisodes(data, 5, 1, 3, 11, 2, 0, TEST_STREAM, "test")
    shares = [EvaluationEpisodes(data, 5, 1, 3, 11, 2, 0, TEST_STREAM, "test", r, world_size)
              for r in range(world_size)]
    every = torch.cat([single[i].query_x for i in range(len(single))])
    sharded = torch.cat([s[i].query_x for s in shares for i in range(len(s))])
    assert len(single) == 6
    # In rank order, the shares are the single-process episodes in order.
    torch.testing.assert_close(sharded, every)


class Recorder(Callback):
    """Rank 0 saves the (all-reduced) meta-gradient and the weights after the step."""

    def __init__(self, path) -> None:
        self.path = path

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.gradients = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters()}

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            weights = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
            torch.save({"gradients": self.gradients, "weights": weights}, self.path)


def one_meta_step(fake_omniglot, tmp_path, devices: int, algorithm: str, tasks: int) -> dict:
    root, cache = fake_omniglot
    data = FewShotDataModule(root=str(root), cache_dir=str(cache), ways=3, queries=2,
                             meta_batch_size=tasks, eval_queries=2, val_episodes=2, test_episodes=2,
                             steps_per_epoch=5, image_size=28)
    torch.manual_seed(0)
    model = MetaLearner(Conv4(1, 4, 28), ways=3, algorithm=ALGORITHMS[algorithm](),
                        executor=Loop())
    path = tmp_path / f"result-{devices}.pt"
    trainer = Trainer(
        accelerator="cpu", devices=devices, strategy="ddp_fork" if devices > 1 else "auto",
        precision="64-true", max_steps=1, limit_val_batches=0, num_sanity_val_steps=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, inference_mode=False, use_distributed_sampler=False,
        default_root_dir=tmp_path, callbacks=[Recorder(path)])
    trainer.fit(model, datamodule=data)
    return torch.load(path, weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("tasks", [4, 3])  # 3: uneven shares (2 and 1), weighted
@pytest.mark.parametrize("algorithm", ["maml", "mamlpp"])
def test_two_processes_match_one_process(fake_omniglot, tmp_path, algorithm, tasks):
    single = one_meta_step(fake_omniglot, tmp_path, 1, algorithm, tasks)
    double = one_meta_step(fake_omniglot, tmp_path, 2, algorithm, tasks)
    assert single["gradients"].keys() == double["gradients"].keys()
    if algorithm == "mamlpp":  # the learned rates and per-step statistics are compared too
        assert any(name.startswith("algorithm.inner_lrs.") for name in single["gradients"])
        assert any("running_mean" in name for name in single["weights"])
    for name, gradient in single["gradients"].items():
        assert gradient.dtype == torch.float64
        torch.testing.assert_close(double["gradients"][name], gradient, rtol=1e-9, atol=1e-12,
                                   msg=name)
    for name, value in single["weights"].items():  # parameters and running statistics
        torch.testing.assert_close(double["weights"][name], value, rtol=1e-9, atol=1e-12,
                                   msg=name)


def test_sync_batchnorm_is_refused(tmp_path):
    model = MetaLearner(Conv4(1, 4, 28), ways=3)
    trainer = Trainer(sync_batchnorm=True, logger=False, default_root_dir=tmp_path)
    model.trainer = trainer
    with pytest.raises(ValueError, match="sync_batchnorm is not supported"):
        model.setup("fit")


def test_the_distributed_sampler_must_be_off(fake_omniglot, tmp_path):
    root, cache = fake_omniglot
    data = FewShotDataModule(root=str(root), cache_dir=str(cache), ways=3)
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp_fork", logger=False,
                      default_root_dir=tmp_path)
    data.trainer = trainer
    with pytest.raises(ValueError, match="use_distributed_sampler=False"):
        data.setup("fit")
