"""MetaLearner in a real Lightning Trainer on fake Omniglot: fit, evaluate, resume exactly; what
its checkpoints record, and that every shipped config's checkpoint loads back."""

from __future__ import annotations

import functools
import importlib
import inspect
import json
from pathlib import Path

import lightning
import pytest
import torch
import yaml
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from fewshot.algorithms import MAML, MAMLPlusPlus
from fewshot.core.episode import Episodes
from fewshot.core.inner_optimizers import Adam
from fewshot.execution import Auto, Loop, MemoryBudget
from fewshot.models import MLP, Conv4, ResNet12, backbone_settings
from fewshot.training.callbacks import NonFinitePolicy, TestResultsWriter, Throughput
from fewshot.training.cli import build_cli
from fewshot.training.datamodule import FewShotDataModule
from fewshot.training.module import MetaLearner

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))


def make_data(root, cache, **overrides) -> FewShotDataModule:
    options = dict(root=str(root), cache_dir=str(cache), ways=3, shots=1, queries=2,
                   meta_batch_size=2, eval_queries=2, val_episodes=4, test_episodes=5,
                   eval_batch_size=2, steps_per_epoch=4, image_size=28)
    options.update(overrides)
    return FewShotDataModule(**options)


def make_model(algorithm=None, **overrides) -> MetaLearner:
    seed_everything(0)
    algorithm = MAML(inner_steps=1, inner_lr=0.4, eval_inner_steps=2) if algorithm is None else algorithm
    options = dict(backbone=Conv4(1, 4, 28), ways=3, algorithm=algorithm, executor=Loop())
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
    trainer = make_trainer(tmp_path, logger=True, callbacks=[Throughput(), TestResultsWriter()])
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
    assert result["algorithm"]["algorithm"] == "MAML" and result["algorithm"]["inner_steps"] == 1


def test_a_bare_trainer_writes_no_results_file(fake_omniglot, tmp_path):
    # The results file is the TestResultsWriter callback's job (the CLI always adds it).
    model, data = make_model(), make_data(*fake_omniglot)
    trainer = make_trainer(tmp_path, logger=True)
    trainer.test(model, datamodule=data)
    assert 0.0 <= trainer.callback_metrics["test/acc"] <= 1.0
    assert model.test_result["episodes"] == 5
    assert not list(tmp_path.rglob("test_results.json"))


def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_run(fake_omniglot, tmp_path):
    full = make_model()
    make_trainer(tmp_path / "full", max_steps=6, val_check_interval=3).fit(
        full, datamodule=make_data(*fake_omniglot))

    first = make_model()
    make_trainer(tmp_path / "part", max_steps=3, val_check_interval=3).fit(
        first, datamodule=make_data(*fake_omniglot))
    checkpoint = next((tmp_path / "part").rglob("*.ckpt"))
    resumed = make_model(MAML(inner_steps=1, inner_lr=0.4, eval_inner_steps=2))
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


@pytest.mark.parametrize(("options", "named"), [
    (lambda: {"algorithm": MAML(inner_steps=-1)}, "inner_steps must be an integer >= 0, got -1"),
    (lambda: {"algorithm": MAML(inner_lr=-0.1)}, "inner_lr must be a non-negative number, got -0.1"),
    (lambda: {"algorithm": MAML(eval_inner_lr=float("nan"))}, "eval_inner_lr"),
    (lambda: {"executor": "fewshot.execution.Parallel"}, "executor 'fewshot.execution.Parallel'"),
    (lambda: {"algorithm": {"class_path": "os.system", "init_args": {"command": "true"}}},
     "algorithm 'os.system' is not one fewshot knows"),
], ids=["inner_steps", "inner_lr", "eval_inner_lr", "executor", "unknown-algorithm"])
def test_bad_hyperparameters_are_named(options, named):
    with pytest.raises(ValueError, match=named):
        make_model(**options())


def test_a_bad_meta_learning_rate_is_named_when_the_optimizer_is_made():
    model = make_model(optimizer=functools.partial(torch.optim.Adam, lr=float("nan")))
    with pytest.raises(ValueError, match="learning rate: nan"):
        model.configure_optimizers()


def test_adapt_and_predict_a_new_task_matches_the_evaluation_path():
    model = make_model()
    generator = torch.Generator().manual_seed(3)
    support_x, query_x = torch.rand(3, 1, 28, 28, generator=generator), torch.rand(6, 1, 28, 28, generator=generator)
    support_y, query_y = torch.arange(3), torch.arange(3).repeat(2)
    adapted = model.adapt(support_x, support_y)
    assert adapted.steps_taken == 2  # eval_inner_steps
    logits = model.predict_logits(adapted, query_x)
    assert logits.shape == (6, 3)
    episodes = Episodes(support_x[None], support_y[None], query_x[None], query_y[None])
    with torch.no_grad():
        model.validation_step(episodes, 0)
    expected = (logits.argmax(-1) == query_y).float().mean()
    assert model._evaluation_accuracies[0][0, -1].item() == pytest.approx(expected.item())


class InjectNaN(Callback):
    """Puts a NaN into the support images (``where="loss"``) or into one meta-gradient
    (``where="gradient"``) at one meta-iteration, and records the weights around it.
    Must come before :class:`NonFinitePolicy` in the callbacks."""

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
    trainer = make_trainer(tmp_path, max_steps=5,
                           callbacks=[InjectNaN(2, where), NonFinitePolicy("stop"), checkpoints])
    with pytest.raises(FloatingPointError,
                       match=r"at meta-iteration 2 \(set --nonfinite.policy skip"):
        trainer.fit(model, datamodule=make_data(*fake_omniglot))
    saved = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    assert len(saved) == 2  # steps 1 and 2 were checkpointed ...
    for path in saved:  # ... and none of them holds a NaN
        state = torch.load(path, weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values())


@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_nonfinite_skip_leaves_the_weights_of_that_step_unchanged(fake_omniglot, tmp_path, where):
    model = make_model()
    injector, policy = InjectNaN(2, where), NonFinitePolicy("skip")
    trainer = make_trainer(tmp_path, max_steps=4, callbacks=[injector, policy])
    with pytest.warns(UserWarning, match="at meta-iteration 2: meta-step skipped"):
        trainer.fit(model, datamodule=make_data(*fake_omniglot))
    # The weights before the poisoned meta-batch are still the weights before the next one.
    before = injector.weights[injector.injected_at]
    after = injector.weights[injector.injected_at + 1]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert any(not torch.equal(a, b)  # while the other steps did move them
               for a, b in zip(injector.weights[0], injector.weights[1], strict=True))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert trainer.global_step == 4  # training went on to the end
    assert policy.skipped_steps == 1 and policy.state_dict() == {"skipped_steps": 1}


def test_an_unknown_nonfinite_policy_is_named():
    with pytest.raises(ValueError, match="'maybe'"):
        NonFinitePolicy("maybe")


# -- what a checkpoint records -------------------------------------------------------------


def test_the_constructor_stays_small_and_its_hyperparameters_are_plain_data():
    parameters = [p for p in inspect.signature(MetaLearner.__init__).parameters if p != "self"]
    assert len(parameters) <= 10, parameters
    model = MetaLearner(
        ResNet12(3, (2, 3, 4, 5), image_size=16), ways=4,
        algorithm=MAMLPlusPlus(inner_steps=2, inner_lr=0.3, eval_inner_steps=3),
        inner_optimizer=Adam(beta1=0.8), executor=MemoryBudget(1.5, executor=Loop()),
        optimizer=functools.partial(torch.optim.SGD, lr=0.1))
    hparams = dict(model.hparams)
    assert set(hparams) == {"backbone", "ways", "algorithm", "inner_optimizer", "executor"}
    assert json.loads(json.dumps(hparams)) == hparams  # plain data: no objects, no tuples
    assert hparams["backbone"]["class_path"].endswith("ResNet12")
    assert hparams["backbone"]["init_args"]["channels"] == [2, 3, 4, 5]
    assert hparams["algorithm"]["class_path"].endswith("MAMLPlusPlus")
    assert hparams["algorithm"]["init_args"]["eval_inner_steps"] == 3
    assert hparams["inner_optimizer"]["init_args"]["beta1"] == 0.8
    assert hparams["executor"]["init_args"]["executor"]["class_path"].endswith("Loop")
    # The settings alone rebuild the same module: same classes, same arguments, same shapes.
    rebuilt = MetaLearner(**hparams)
    assert dict(rebuilt.hparams) == hparams
    assert type(rebuilt.executor.executor) is Loop and rebuilt.inner_optimizer.beta1 == 0.8
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()}


def test_checkpoints_of_a_fit_record_backbone_and_algorithm_and_load_back(fake_omniglot, tmp_path):
    model = make_model(MAMLPlusPlus(inner_steps=1, inner_lr=0.4, eval_inner_steps=2,
                                    derivative_order_annealing=False))
    trainer = make_trainer(tmp_path, max_steps=2,
                           callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)])
    trainer.fit(model, datamodule=make_data(*fake_omniglot))
    path = tmp_path / "ckpt" / "last.ckpt"
    recorded = torch.load(path, weights_only=True)["hyper_parameters"]  # no pickled objects
    assert recorded["backbone"] == backbone_settings(model.network.features)
    assert recorded["backbone"]["class_path"] == "fewshot.models.conv4.Conv4"
    assert recorded["backbone"]["init_args"]["hidden_channels"] == 4
    assert recorded["algorithm"]["class_path"] == "fewshot.algorithms.mamlpp.MAMLPlusPlus"
    assert recorded["algorithm"] == model.algorithm.settings()
    assert recorded["executor"]["class_path"] == "fewshot.execution.loop.Loop"
    loaded = MetaLearner.load_from_checkpoint(path)
    assert_same_model(loaded, model)


def assert_same_model(loaded: MetaLearner, model: MetaLearner) -> None:
    assert type(loaded.algorithm) is type(model.algorithm)
    assert loaded.algorithm.settings() == model.algorithm.settings()
    assert type(loaded.network.features) is type(model.network.features)
    assert backbone_settings(loaded.network.features) == backbone_settings(model.network.features)
    assert loaded.inner_optimizer.settings() == model.inner_optimizer.settings()
    assert loaded.executor.settings() == model.executor.settings()
    expected = model.state_dict()
    got = loaded.state_dict()
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert got[name].dtype == value.dtype and torch.equal(got[name], value), name


def imported(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_checkpoints_and_loads_back(config, tmp_path):
    source = yaml.safe_load(config.read_text())
    backbone = source["model"].get("backbone", {"class_path": "fewshot.models.Conv4"})
    # Narrow layers for speed; everything else (image size, channels, ways, algorithm, per-step
    # batch norm, learned rates, executor) exactly as the config has it.
    shrink = {ResNet12: "--model.backbone.init_args.channels=[2,3,4,5]",
              MLP: "--model.backbone.init_args.hidden_features=[3,3]"}.get(
        imported(backbone["class_path"]), "--model.backbone.init_args.hidden_channels=3")
    cli = build_cli(["-c", str(config), shrink, "--trainer.logger=false",
                     f"--trainer.default_root_dir={tmp_path}"], run=False)
    model = cli.model
    assert type(model.network.features) is imported(backbone["class_path"])
    algorithm = source["model"].get("algorithm", {"class_path": "fewshot.algorithms.MAML"})
    assert type(model.algorithm) is imported(algorithm["class_path"])
    # Trained-looking weights, learned rates and running statistics, not the initial ones.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for value in model.state_dict().values():
            if value.is_floating_point():
                value.add_(torch.rand(value.shape, generator=generator, dtype=value.dtype))
    path = tmp_path / "saved.ckpt"
    cli.trainer.strategy.connect(model)
    cli.trainer.save_checkpoint(path)  # through the CLI's (atomic) checkpoint writer

    checkpoint = torch.load(path, weights_only=True)  # plain data only
    assert checkpoint["pytorch-lightning_version"] == lightning.__version__
    recorded = checkpoint["hyper_parameters"]
    json.dumps(recorded)
    assert isinstance(recorded["backbone"], dict), recorded["backbone"]
    assert imported(recorded["backbone"]["class_path"]) is imported(backbone["class_path"])
    assert imported(recorded["algorithm"]["class_path"]) is imported(algorithm["class_path"])
    for name, value in (algorithm.get("init_args") or {}).items():
        assert recorded["algorithm"]["init_args"][name] == value, name
    assert recorded["ways"] == source["data"]["ways"]

    loaded = MetaLearner.load_from_checkpoint(path)
    assert_same_model(loaded, model)
    assert dict(loaded.hparams) == recorded
    size = source["data"].get("image_size", 28)
    images = (torch.rand(4, 1, generator=generator) if source["data"]["dataset"] == "sinusoid"
              else torch.rand(4, source["data"].get("channels", 1), size, size, generator=generator))
    model.eval(), loaded.eval()
    torch.testing.assert_close(loaded(images), model(images), rtol=0, atol=0)


def test_a_backbone_that_cannot_describe_itself_is_recorded_by_class_path():
    class Unregistered(torch.nn.Module):
        out_features = 4

        def forward(self, x):
            return x.flatten(1)[:, :4]

    model = MetaLearner(Unregistered(), ways=3, executor=Auto())
    assert model.hparams["backbone"].endswith("Unregistered")
    json.dumps(dict(model.hparams))

