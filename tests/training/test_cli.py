"""The fewshot command line: shipped configs, legacy flags, linked settings, user errors."""

from __future__ import annotations

import hashlib
import importlib
import json
from pathlib import Path

import pytest
import torch
import yaml

from fewshot.algorithms import MAML, MAMLPlusPlus
from fewshot.cli import main
from fewshot.execution import Loop
from fewshot.training.callbacks import NonFinitePolicy, TestResultsWriter, Throughput
from fewshot.training.cli import build_cli
from fewshot.training.original_flags import translate_original_flags
from fewshot.training.schedules import CosineAnnealing

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))


def imported(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def built_from(spec: dict):
    """The object a ``{"class_path", "init_args"}`` of a config file means: its class with
    those arguments and the class's own defaults for the rest."""
    return imported(spec["class_path"])(**(spec.get("init_args") or {}))


def test_configs_are_shipped():
    names = {c.stem for c in CONFIGS}
    for ways in (5, 20):
        for shots in (1, 5):
            assert f"omniglot_{ways}way_{shots}shot" in names


# The CLI's default algorithm is MAML; jsonargparse carries MAML's default init_args over when a
# config names another class, so a setting the config leaves to the class's own default gets
# MAML's instead (here learned_rates="none" instead of MetaSGD's "per_entry").

@pytest.mark.parametrize("config", [
    c
    for c in CONFIGS], ids=lambda p: p.stem)
def test_print_config_round_trips(config, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    source = yaml.safe_load(config.read_text())
    parsed = yaml.safe_load(printed)
    for key, value in source["data"].items():
        assert parsed["data"][key] == value, ("data", key)
    for key, value in source["model"].items():
        if isinstance(value, dict) and "class_path" in value:
            # Injected objects: the same class, given every argument the config gives.
            assert imported(parsed["model"][key]["class_path"]) is imported(value["class_path"])
            init_args = parsed["model"][key].get("init_args") or {}
            for name, setting in (value.get("init_args") or {}).items():
                if not (key == "backbone" and name in ("image_size", "in_channels")):
                    assert init_args[name] == setting, ("model", key, name)
        else:
            assert parsed["model"][key] == value, ("model", key)
    assert "ways" not in parsed["model"]  # linked from data.ways, so it cannot be repeated
    # The algorithm the run trains is the one the config names: its settings, the class's own
    # defaults for whatever the config leaves out.
    algorithm = source["model"].get("algorithm", {"class_path": "fewshot.algorithms.MAML"})
    assert built_from(parsed["model"]["algorithm"]).settings() == built_from(algorithm).settings()
    (tmp_path / "printed.yaml").write_text(printed)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(tmp_path / "printed.yaml"), "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out) == parsed


def test_legacy_flags_map_to_options():
    argv = ["--episode_classes=20", "--support_samples", "5", "--query_samples=3",
            "--batch_size=8", "--inner_loop_steps=2", "--trainer.max_steps=1"]
    # Inner steps are an option of MAML, so the algorithm class is named first.
    assert translate_original_flags(argv) == [
        "--model.algorithm=fewshot.algorithms.MAML", "--data.ways=20", "--data.shots=5", "--data.queries=3",
        "--data.meta_batch_size=8", "--model.algorithm.init_args.inner_steps=2",
        "--trainer.max_steps=1"]
    cli = build_cli(argv, run=False)
    assert cli.datamodule.hparams.ways == 20 and cli.model.hparams.ways == 20
    assert cli.model.network.head.out_features == 20
    assert cli.model.algorithm.inner_steps == 2 and cli.datamodule.hparams.meta_batch_size == 8
    assert cli.model.hparams["algorithm"]["init_args"]["inner_steps"] == 2


def test_linked_settings_cannot_disagree(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["--data.ways=5", "--model.ways=3"], run=False)
    assert exit_info.value.code != 0
    cli = build_cli(["--data.image_size=84", "--data.ways=5"], run=False)
    assert cli.model.network.features.out_features == 64 * 5 * 5


def test_algorithm_executor_schedule_and_policy_flags_reach_their_objects():
    cli = build_cli(["--model.algorithm=fewshot.algorithms.MAMLPlusPlus",
                     "--model.algorithm.init_args.inner_steps=3",
                     "--model.algorithm.init_args.learned_rates=per_tensor",
                     "--model.executor=fewshot.execution.Loop",
                     "--model.optimizer.init_args.lr=0.005",
                     "--model.lr_scheduler=fewshot.training.schedules.CosineAnnealing",
                     "--trainer.max_steps=7", "--nonfinite.policy=skip"], run=False)
    model = cli.model
    assert type(model.algorithm) is MAMLPlusPlus and model.algorithm.inner_steps == 3
    assert all(rates.shape == (3,) for rates in model.algorithm.inner_lrs.values())
    assert isinstance(model.executor, Loop)
    assert model.hparams["executor"]["class_path"].endswith("Loop")
    model.trainer = cli.trainer
    configured = model.configure_optimizers()
    assert configured["optimizer"].param_groups[0]["lr"] == 0.005
    schedule = configured["lr_scheduler"]["scheduler"]
    assert isinstance(schedule, CosineAnnealing) and schedule.T_max == 7
    policies = [c for c in cli.trainer.callbacks if isinstance(c, NonFinitePolicy)]
    assert [p.policy for p in policies] == ["skip"]
    # Always on: tasks/s in the logs, test_results.json after testing.
    for always in (Throughput, TestResultsWriter):
        assert sum(isinstance(c, always) for c in cli.trainer.callbacks) == 1, always
    plain = build_cli([], run=False)
    assert type(plain.model.algorithm) is MAML
    assert [c.policy for c in plain.trainer.callbacks if isinstance(c, NonFinitePolicy)] == ["stop"]


def test_short_spelling_of_an_algorithm_setting():
    # jsonargparse also accepts the option without "init_args".
    cli = build_cli(["--model.algorithm.inner_steps=4", "--model.optimizer.lr=0.02"], run=False)
    assert cli.model.algorithm.inner_steps == 4
    assert cli.model.configure_optimizers().param_groups[0]["lr"] == 0.02


def test_missing_data_is_one_clear_line_and_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", f"--data.root={tmp_path / 'nowhere'}", "--trainer.max_steps=1",
              f"--trainer.default_root_dir={tmp_path}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "fewshot: error:" in err and "nowhere" in err and "Traceback" not in err


def test_fit_then_test_end_to_end(fake_omniglot, tmp_path, capsys):
    root, cache = fake_omniglot
    common = [f"--data.root={root}", f"--data.cache_dir={cache}", "--data.ways=3",
              "--data.queries=2", "--data.meta_batch_size=2", "--data.eval_queries=2",
              "--data.val_episodes=4", "--data.test_episodes=6", "--data.steps_per_epoch=2",
              "--model.backbone=fewshot.models.Conv4", "--model.backbone.hidden_channels=4",
              f"--trainer.default_root_dir={tmp_path}",
              f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.enable_progress_bar=false"]
    main(["fit", *common, "--trainer.max_steps=2", "--test_after_fit=true"])
    results = list(tmp_path.rglob("test_results.json"))
    assert len(results) == 1
    result = json.loads(results[0].read_text())
    assert result["episodes"] == 6 and len(result["per_step"]) == 2
    assert result["algorithm"]["algorithm"] == "MAML"
    # The export of the tested checkpoint carries a model card with that result.
    run_folder = results[0].parent
    main(["export", "--checkpoint", str(run_folder), "--output", str(tmp_path / "export"),
          "--training-note", "Trained for a test."])
    card = (tmp_path / "export" / "README.md").read_text()
    assert f"{100 * result['accuracy']:.2f} +- {100 * result['ci95']:.2f}%" in card
    for expected in ("over 6 test episodes", "omniglot (class split: ", "3-way 1-shot", "MAML (",
                     "Conv4 (", "28x28 grayscale", "2 meta-iterations", "Trained for a test.",
                     "fewshot adapt --checkpoint", "fewshot.load(", f"torch {torch.__version__}"):
        assert expected in card, expected
    metadata = json.loads((tmp_path / "export" / "fewshot.json").read_text())
    assert metadata["source"]["test"]["episodes_sha256"] == result["provenance"]["test_episodes_sha256"]
    assert metadata["source"]["checkpoint_sha256"] == result["provenance"]["checkpoint_sha256"]
    checkpoint = next(tmp_path.rglob("last.ckpt"))
    main(["test", *common, f"--ckpt_path={checkpoint}", "--seed_everything=7"])
    assert "Test accuracy over 6 episodes (3-way 1-shot" in capsys.readouterr().out
    # Traceable: what the numbers came from.
    first, second = (json.loads(p.read_text())["provenance"]
                     for p in sorted(tmp_path.rglob("test_results.json"), key=lambda p: p.stat().st_mtime))
    assert second["checkpoint_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert second["seed_everything"] == 7 and second["data_seed"] == 0
    assert second["dataset"] == "omniglot" and second["class_split"] == "maml"
    assert first["test_episodes_sha256"] == second["test_episodes_sha256"]  # the same 6 tasks
    assert len(second["test_episodes_sha256"]) == 64
    assert {"fewshot", "torch", "lightning", "python"} <= set(second["versions"])
    assert second["git"] is None or len(second["git"]["commit"]) == 40
    main(["test", *common, f"--ckpt_path={checkpoint}", "--data.seed=1"])
    third = json.loads(max(tmp_path.rglob("test_results.json"),
                           key=lambda p: p.stat().st_mtime).read_text())["provenance"]
    assert third["test_episodes_sha256"] != second["test_episodes_sha256"]  # other tasks


def test_early_stopping_on_validation_accuracy_is_configurable():
    cli = build_cli(["--trainer.callbacks+=EarlyStopping", "--trainer.callbacks.monitor=val/acc",
                     "--trainer.callbacks.mode=max", "--trainer.callbacks.patience=5",
                     "--model.optimizer.init_args.weight_decay=0.0001"], run=False)
    stoppers = [c for c in cli.trainer.callbacks if type(c).__name__ == "EarlyStopping"]
    assert len(stoppers) == 1 and stoppers[0].monitor == "val/acc" and stoppers[0].patience == 5
    assert cli.model.configure_optimizers().param_groups[0]["weight_decay"] == 0.0001


def test_wandb_sweep_names_real_options():
    sweep = yaml.safe_load((CONFIGS[0].parent / "sweeps" / "wandb_sweep.yaml").read_text())
    options = [f"--{name}=1" for name in sweep["parameters"]]
    cli = build_cli(options, run=False)  # parses: every swept option exists
    assert cli.model.algorithm.inner_steps == 1 and cli.model.algorithm.inner_lr == 1.0
    assert cli.datamodule.hparams.meta_batch_size == 1


def test_bare_command_lists_every_subcommand(capsys):
    main([])
    text = capsys.readouterr().out
    for subcommand in ("fit", "validate", "test", "adapt", "export", "report"):
        assert f"  {subcommand} " in text


@pytest.mark.parametrize("config", ["omniglot_5way_1shot_cpu.yaml", "maml_mini_imagenet_5way_1shot.yaml"])
def test_a_shipped_config_pointed_at_the_users_folders(config, tmp_path):
    """-c <config> --data.dataset folder --data.root DIR, with the original project's
    Train/Val/Test folders: the config's maml/ravi split gives way to the folders."""
    from PIL import Image

    for split in ("Train", "Val", "Test"):
        for c in range(5):
            (tmp_path / "mine" / split / f"{split}{c}").mkdir(parents=True)
            for i in range(16):
                Image.new("RGB", (30, 20), (c * 40, i * 10, 0)).save(
                    tmp_path / "mine" / split / f"{split}{c}" / f"{i}.png")
    cli = build_cli(["-c", str(Path(__file__).parents[2] / "configs" / config),
                     "--data.dataset=folder", f"--data.root={tmp_path / 'mine'}",
                     f"--data.cache_dir={tmp_path / 'cache'}"], run=False)
    assert cli.datamodule.hparams.class_split in ("maml", "ravi")
    cli.datamodule.setup("fit")
    assert cli.datamodule.train_set.dataset.classes == [f"Train{c}" for c in range(5)]
    assert cli.datamodule.val_set.dataset.classes == [f"Val{c}" for c in range(5)]


def test_the_cpu_config_meta_trains_from_a_zero_head_on_a_schedule(fake_omniglot, tmp_path):
    """The shipped CPU config's levers reach training: zero_head (the stored head weight gets
    no gradient and never moves while the body learns), 2 steps at test, cosine annealing."""
    from fewshot.training.schedules import CosineAnnealing

    root, cache = fake_omniglot
    config = Path(__file__).parents[2] / "configs" / "omniglot_5way_1shot_cpu.yaml"
    cli = build_cli(["-c", str(config), f"--data.root={root}", f"--data.cache_dir={cache}",
                     "--data.ways=3", "--data.meta_batch_size=2", "--data.val_episodes=2",
                     "--data.eval_queries=2", "--model.backbone.init_args.hidden_channels=4",
                     "--trainer.max_steps=3", "--trainer.val_check_interval=3",
                     f"--trainer.default_root_dir={tmp_path}",
                     f"--trainer.logger.init_args.save_dir={tmp_path}",
                     "--trainer.enable_progress_bar=false"], run=False)
    algorithm = cli.model.algorithm
    assert algorithm.zero_head and algorithm.evaluation_steps == 2 and algorithm.inner_steps == 1
    network = cli.model.network
    before = {n: p.detach().clone() for n, p in network.named_parameters()}
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 3
    assert isinstance(cli.trainer.lr_scheduler_configs[0].scheduler, CosineAnnealing)
    assert cli.trainer.optimizers[0].param_groups[0]["lr"] < 0.002
    after = dict(network.named_parameters())
    assert torch.equal(after["head.weight"], before["head.weight"])
    assert not torch.equal(after["features.blocks.0.weight"], before["features.blocks.0.weight"])


@pytest.mark.parametrize("own_save_dir", [False, True])
def test_default_root_dir_moves_logs_and_checkpoints(fake_omniglot, tmp_path, monkeypatch,
                                                    own_save_dir):
    root, cache = fake_omniglot
    monkeypatch.chdir(tmp_path)
    logger_dir = ["--trainer.logger.init_args.save_dir=elsewhere"] if own_save_dir else []
    main(["fit", f"--data.root={root}", f"--data.cache_dir={cache}", "--data.ways=3",
          "--data.queries=2", "--data.meta_batch_size=2", "--data.eval_queries=2",
          "--data.val_episodes=2", "--data.steps_per_epoch=2", "--model.backbone.hidden_channels=4",
          "--trainer.max_steps=2", "--trainer.default_root_dir=chosen", *logger_dir,
          "--trainer.enable_progress_bar=false"])
    run = tmp_path / ("elsewhere" if own_save_dir else "chosen") / "lightning_logs" / "version_0"
    assert (run / "metrics.csv").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    assert not (tmp_path / "runs").exists()  # the old behaviour: ./runs whatever was asked
