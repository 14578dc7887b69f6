"""The fewshot command line: shipped configs, legacy flags, linked settings, user errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from fewshot.training.cli import build_cli, main, translate_legacy_flags

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


def test_configs_are_shipped():
    names = {c.stem for c in CONFIGS}
    for ways in (5, 20):
        for shots in (1, 5):
            assert f"omniglot_{ways}way_{shots}shot" in names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_print_config_round_trips(config, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    source = yaml.safe_load(config.read_text())
    parsed = yaml.safe_load(printed)
    for section in ("model", "data"):
        for key, value in source[section].items():
            if key != "backbone":
                assert parsed[section][key] == value, (section, key)
    assert "ways" not in parsed["model"]  # linked from data.ways, so it cannot be repeated
    (tmp_path / "printed.yaml").write_text(printed)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(tmp_path / "printed.yaml"), "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out) == parsed


def test_legacy_flags_map_to_options():
    argv = ["--episode_classes=20", "--support_samples", "5", "--query_samples=3",
            "--batch_size=8", "--inner_loop_steps=2", "--trainer.max_steps=1"]
    assert translate_legacy_flags(argv) == [
        "--data.ways=20", "--data.shots", "5", "--data.queries=3",
        "--data.meta_batch_size=8", "--model.inner_steps=2", "--trainer.max_steps=1"]
    cli = build_cli(argv, run=False)
    assert cli.datamodule.hparams.ways == 20 and cli.model.hparams.ways == 20
    assert cli.model.network.head.out_features == 20
    assert cli.model.hparams.inner_steps == 2 and cli.datamodule.hparams.meta_batch_size == 8


def test_linked_settings_cannot_disagree(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["--data.ways=5", "--model.ways=3"], run=False)
    assert exit_info.value.code != 0
    cli = build_cli(["--data.image_size=84", "--data.ways=5"], run=False)
    assert cli.model.network.features.out_features == 64 * 5 * 5


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
    checkpoint = next(tmp_path.rglob("last.ckpt"))
    main(["test", *common, f"--ckpt_path={checkpoint}"])
    assert "Test accuracy over 6 episodes (3-way 1-shot" in capsys.readouterr().out


def test_early_stopping_on_validation_accuracy_is_configurable():
    cli = build_cli(["--trainer.callbacks+=EarlyStopping", "--trainer.callbacks.monitor=val/acc",
                     "--trainer.callbacks.mode=max", "--trainer.callbacks.patience=5",
                     "--model.weight_decay=0.0001"], run=False)
    stoppers = [c for c in cli.trainer.callbacks if type(c).__name__ == "EarlyStopping"]
    assert len(stoppers) == 1 and stoppers[0].monitor == "val/acc" and stoppers[0].patience == 5
    assert cli.model.configure_optimizers().param_groups[0]["weight_decay"] == 0.0001


def test_wandb_sweep_names_real_options():
    sweep = yaml.safe_load((CONFIGS[0].parent / "sweeps" / "wandb_sweep.yaml").read_text())
    options = [f"--{name}=1" for name in sweep["parameters"]]
    cli = build_cli(options, run=False)  # parses: every swept option exists
    assert cli.model.hparams.inner_steps == 1 and cli.datamodule.hparams.meta_batch_size == 1


def test_bare_command_lists_every_subcommand(capsys):
    main([])
    text = capsys.readouterr().out
    for subcommand in ("fit", "validate", "test", "adapt", "export", "report"):
        assert f"  {subcommand} " in text
