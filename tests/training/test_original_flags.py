"""The original project's command line, verbatim, in both flag forms."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from fewshot.cli import main
from fewshot.training import original_flags
from fewshot.training.original_flags import translate_original_flags

REPO = Path(__file__).resolve().parents[2]
# Verbatim from the original project's README.
ORIGINAL_LINE = shlex.split("--gpus=-1 --wandb --data_class=MiniImagenet --model_class=ResNetClassifier "
                 "--num_workers=6 --accelerator=ddp --val_check_interval=5 --batch_size=3 "
                 "--inner_loop_steps=1 --support_samples=5 --track_grad_norm=2")


def test_the_original_readme_command_prints_the_translated_config(tmp_path):
    pytest.importorskip("wandb")  # the `wandb` extra (CI's dev environment has it)
    result = subprocess.run(
        [sys.executable, str(REPO / "training" / "run_experiment.py"), *ORIGINAL_LINE,
         "--print_config"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    config = yaml.safe_load(result.stdout)
    trainer, model, data = config["trainer"], config["model"], config["data"]
    assert trainer["accelerator"] == "gpu" and str(trainer["devices"]) == "-1"  # --gpus=-1
    assert trainer["strategy"] == "ddp"                                         # --accelerator=ddp
    assert trainer["val_check_interval"] == 5
    loggers = [logger["class_path"] for logger in trainer["logger"]]            # --wandb
    assert loggers == ["fewshot.training.loggers.RunLogger",
                       "lightning.pytorch.loggers.WandbLogger"]
    assert (data["dataset"], data["image_size"], data["channels"]) == ("mini_imagenet", 84, 3)
    assert model["backbone"]["class_path"] == "fewshot.models.ResNet12"         # --model_class
    assert data["num_workers"] == 6 and data["meta_batch_size"] == 3 and data["shots"] == 5
    assert model["algorithm"]["class_path"] == "fewshot.algorithms.MAML"
    assert model["algorithm"]["init_args"]["inner_steps"] == 1                  # --inner_loop_steps
    assert config["grad_monitor"]["norm_type"] == 2.0                          # --track_grad_norm
    assert config["test_after_fit"] is True  # run_experiment.py trains, then tests, as before


def test_space_and_equals_forms_translate_alike(monkeypatch):
    monkeypatch.setattr(original_flags, "wandb_options", lambda: ["--trainer.logger=W"])
    spaced = [part for flag in ORIGINAL_LINE for part in (flag.split("=", 1) if "=" in flag
                                                           else [flag])]
    assert spaced != ORIGINAL_LINE
    assert translate_original_flags(spaced) == translate_original_flags(ORIGINAL_LINE)


@pytest.mark.parametrize(("gpus", "expected"), [
    ("0", ["--trainer.accelerator=cpu"]),
    ("-1", ["--trainer.accelerator=gpu", "--trainer.devices=-1"]),
    ("2", ["--trainer.accelerator=gpu", "--trainer.devices=2"]),
    ("0,1", ["--trainer.accelerator=gpu", "--trainer.devices=[0, 1]"]),
    ("[1]", ["--trainer.accelerator=gpu", "--trainer.devices=[1]"]),
])
def test_gpus(gpus, expected):
    assert translate_original_flags([f"--gpus={gpus}"]) == expected
    assert translate_original_flags(["--gpus", gpus]) == expected


@pytest.mark.parametrize(("name", "dataset", "size", "channels"), [
    ("MiniImagenet", "mini_imagenet", 84, 3), ("mini_imagenet", "mini_imagenet", 84, 3),
    ("Omniglot", "omniglot", 28, 1), ("CIFAR_FS", "cifar_fs", 32, 3), ("folder", "folder", 84, 3),
])
def test_data_class_names_the_dataset_with_its_image_size(name, dataset, size, channels):
    assert translate_original_flags([f"--data_class={name}"]) == [
        f"--data.dataset={dataset}", f"--data.image_size={size}", f"--data.channels={channels}"]


@pytest.mark.parametrize(("name", "class_path"), [
    ("ResNetClassifier", "fewshot.models.ResNet12"), ("resnet12", "fewshot.models.ResNet12"),
    ("Conv4", "fewshot.models.Conv4"), ("fewshot.models.conv4.Conv4", "fewshot.models.conv4.Conv4"),
])
def test_model_class_names_the_backbone(name, class_path):
    assert translate_original_flags(["--model_class", name]) == [f"--model.backbone={class_path}"]


def test_accelerator_is_a_strategy_or_the_hardware():
    assert translate_original_flags(["--accelerator", "ddp"]) == ["--trainer.strategy=ddp"]
    assert translate_original_flags(["--accelerator=ddp_spawn"]) == ["--trainer.strategy=ddp_spawn"]
    assert translate_original_flags(["--accelerator=cpu"]) == ["--trainer.accelerator=cpu"]


def test_lightning_1_trainer_flags_and_fewshot_options_pass():
    assert translate_original_flags(
        ["fit", "--max_epochs", "3", "--fast_dev_run", "--data.ways=5", "-c", "x.yaml"]) == [
        "fit", "--trainer.max_epochs=3", "--trainer.fast_dev_run=true", "--data.ways=5", "-c",
        "x.yaml"]


@pytest.mark.parametrize(("argv", "message"), [
    (["--data_class=ImageNet1k"], "--data_class=ImageNet1k: unknown dataset; choose one of"),
    (["--model_class=VGG"], "--model_class=VGG: unknown model; choose one of"),
    (["--gpus=all"], "--gpus=all: give 0 (CPU), -1 (every GPU)"),
    (["--batch_size"], "--batch_size needs a value"),
])
def test_bad_original_flags_are_one_line_naming_them(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_wandb_without_wandb_installed_names_the_install_command(monkeypatch, capsys):
    found = original_flags.importlib.util.find_spec
    monkeypatch.setattr(original_flags.importlib.util, "find_spec",
                        lambda name: None if name == "wandb" else found(name))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--wandb", "--print_config"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install 'fewshot[wandb]'" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without GPU")
def test_gpus_on_a_machine_without_one_says_how_to_run_on_the_cpu(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--gpus=-1", f"--trainer.default_root_dir={tmp_path}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "PyTorch sees none on this machine" in err and "--gpus=0" in err
    assert "Traceback" not in err


def test_translation_table_is_in_the_readme():
    readme = (REPO / "README.md").read_text()
    for flag, option in original_flags.translation_table():
        shown = option.replace(".init_args", "").split(",")[0].split("=")[0]
        assert f"`{flag}`" in readme and f"`{shown}" in readme, flag
