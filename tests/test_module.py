"""MetaLearner in a real Lightning Trainer on fake Omniglot: fit, evaluate, resume exactly."""

from __future__ import annotations

import json

import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from fewshot.data.datamodule import FewShotDataModule
from fewshot.core.episode import Episodes
from fewshot.models import Conv4
from fewshot.training.module import MetaLearner


def make_data(root, cache, **overrides) -> FewShotDataModule:
    options = dict(root=str(root), cache_dir=str(cache), ways=3, shots=1, queries=2,
                   meta_batch_size=2, eval_queries=2, val_episodes=4, test_episodes=5,
                   eval_batch_size=2, steps_per_epoch=4, image_size=28)
    options.update(overrides)
    return FewShotDataModule(**options)


def make_model(**overrides) -> MetaLearner:
    seed_everything(0)
    options = dict(backbone=Conv4(1, 4, 28), ways=3, inner_steps=1, inner_lr=0.4,
                   eval_inner_steps=2, batching="loop")
    options.update(overrides)
    return MetaLearner(**options)


def make_trainer(tmp_path, **overrides) -> Trainer:
    options = dict(default_root_dir=tmp_path, max_steps=4, inference_mode=False,
                   enable_progress_bar=False, enable_model_summary=False, logger=False,
                   accelerator="cpu", devices=1, num_sanity_val_steps=0, deterministic=True)
    options.update(overrides)
    return Trainer(**options)


def test_fit_and_test_write_per_step_accuracy(fake_omniglot, tmp_path):
    model, data = make_model(), make_data(*fake_omniglot)
    trainer = make_trainer(tmp_path, logger=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.fit(model, datamodule=data)
    assert trainer.global_step == 4
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert "val/acc" in trainer.callback_metrics and "train/tasks_per_s" in trainer.logged_metrics
    trainer.test(model, datamodule=data)
    result = json.loads((tmp_path / "lightning_logs" / "version_0" / "test_results.json").read_text())
    assert result["episodes"] == 5 and result["ways"] == 3
    assert [row["inner_step"] for row in result["per_step"]] == [0, 1, 2]
    assert 0.0 <= result["accuracy"] <= 1.0
    assert result["accuracy"] == result["per_step"][-1]["accuracy"]


def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_run(fake_omniglot, tmp_path):
    full = make_model()
    make_trainer(tmp_path / "full", max_steps=6, val_check_interval=3).fit(
        full, datamodule=make_data(*fake_omniglot))

    first = make_model()
    make_trainer(tmp_path / "part", max_steps=3, val_check_interval=3).fit(
        first, datamodule=make_data(*fake_omniglot))
    checkpoint = next((tmp_path / "part").rglob("*.ckpt"))
    resumed = make_model(inner_lr=0.4)
    make_trainer(tmp_path / "resumed", max_steps=6, val_check_interval=3).fit(
        resumed, datamodule=make_data(*fake_omniglot), ckpt_path=checkpoint)

    for name, value in full.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name
    changed = any(not torch.equal(v, first.state_dict()[k]) for k, v in full.state_dict().items())
    assert changed  # steps 4-6 did something, so the equality above means something


def test_evaluation_under_inference_mode_is_refused_with_a_clear_message():
    model = make_model()
    episodes = Episodes(torch.rand(1, 3, 1, 28, 28), torch.arange(3)[None],
                        torch.rand(1, 3, 1, 28, 28), torch.arange(3)[None])
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode=False"):
        model.validation_step(episodes, 0)


def test_evaluation_adapts_without_touching_the_meta_parameters():
    model = make_model()
    episodes = Episodes(torch.rand(2, 3, 1, 28, 28), torch.arange(3).repeat(2, 1),
                        torch.rand(2, 6, 1, 28, 28), torch.arange(3).repeat(2, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.validation_step(episodes, 0)
    assert model._evaluation_accuracies[0].shape == (2, 3)  # tasks x (eval_inner_steps + 1)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("bad", [{"inner_steps": -1}, {"inner_lr": -0.1}, {"meta_lr": float("nan")},
                                 {"batching": "parallel"}])
def test_bad_hyperparameters_are_named(bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name if name != "batching" else "parallel"):
        make_model(**bad)


def test_adapt_and_predict_a_new_task_matches_the_evaluation_path():
    model = make_model()
    generator = torch.Generator().manual_seed(3)
    support_x, query_x = torch.rand(3, 1, 28, 28, generator=generator), torch.rand(6, 1, 28, 28, generator=generator)
    support_y, query_y = torch.arange(3), torch.arange(3).repeat(2)
    params = model.adapt(support_x, support_y)
    logits = model.predict_logits(params, query_x)
    assert logits.shape == (6, 3)
    episodes = Episodes(support_x[None], support_y[None], query_x[None], query_y[None])
    with torch.no_grad():
        model.validation_step(episodes, 0)
    expected = (logits.argmax(-1) == query_y).float().mean()
    assert model._evaluation_accuracies[0][0, -1].item() == pytest.approx(expected.item())


class InjectNaN(Callback):
    """Puts a NaN into the support images (``where="loss"``) or into one meta-gradient
    (``where="gradient"``) at one meta-iteration, and records the weights around it."""

    def __init__(self, step: int, where: str) -> None:
        self.step, self.where, self.weights, self.injected_at = step, where, [], None

    def _now(self, trainer) -> bool:
        return trainer.global_step == self.step and self.injected_at is None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.weights.append([p.detach().clone() for p in pl_module.parameters()])
        if self._now(trainer) and self.where == "loss":
            batch.support_x[0, 0, 0, 0, 0] = float("nan")
            self.injected_at = len(self.weights) - 1

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self._now(trainer) and self.where == "gradient":
            next(p for p in pl_module.parameters() if p.grad is not None).grad[0] = float("inf")
            self.injected_at = len(self.weights) - 1


@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_nonfinite_stops_naming_the_step_without_a_nan_checkpoint(fake_omniglot, tmp_path, where):
    model = make_model()
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1)
    trainer = make_trainer(tmp_path, max_steps=5, callbacks=[InjectNaN(2, where), checkpoints])
    with pytest.raises(FloatingPointError, match="at meta-iteration 2"):
        trainer.fit(model, datamodule=make_data(*fake_omniglot))
    saved = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    assert saved  # steps 1 and 2 were checkpointed ...
    for path in saved:  # ... and none of them holds a NaN
        state = torch.load(path, weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values())


@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_nonfinite_skip_leaves_the_weights_of_that_step_unchanged(fake_omniglot, tmp_path, where):
    model = make_model(nonfinite="skip")
    injector = InjectNaN(2, where)
    trainer = make_trainer(tmp_path, max_steps=4, callbacks=[injector])
    with pytest.warns(UserWarning, match="at meta-iteration 2: meta-step skipped"):
        trainer.fit(model, datamodule=make_data(*fake_omniglot))
    # The weights before the poisoned meta-batch are still the weights before the next one.
    before = injector.weights[injector.injected_at]
    after = injector.weights[injector.injected_at + 1]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert trainer.global_step == 4  # training went on to the end
