"""Weights & Biases for real: a tiny ``--wandb`` fit in offline mode, read back from disk; the
sweep file expanded by wandb's own agent code and parsed by the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from test_cli_distributed import write_split_folders
from wandb_offline import read_offline_run

from fewshot.cli import main

wandb = pytest.importorskip("wandb")
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_wandb_offline_run_holds_scalars_config_and_histograms_and_keeps_the_csv(
        tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")  # never the network
    monkeypatch.setenv("WANDB_SILENT", "true")
    root = write_split_folders(tmp_path / "data")
    main(["fit", "--wandb", "--data.dataset=folder", f"--data.root={root}", "--data.channels=1",
          "--data.image_size=28", "--data.ways=3", "--data.queries=2", "--data.meta_batch_size=2",
          "--data.eval_queries=2", "--data.val_episodes=2", "--data.test_episodes=2",
          "--data.steps_per_epoch=4", "--model.backbone.hidden_channels=8",
          "--trainer.max_steps=4", "--trainer.val_check_interval=2", "--trainer.log_every_n_steps=1",
          "--grad_monitor.histogram_every_n_steps=2", "--grad_monitor.log_every_n_steps=1",
          "--test_after_fit=true", "--trainer.enable_progress_bar=false"])
    wandb.finish()  # what the end of the `fewshot` process does (atexit)
    (offline,) = (tmp_path / "runs" / "wandb").glob("offline-run-*")
    run = read_offline_run(offline)
    logged = {key for row in run["history"] for key in row}
    # Scalars: training, validation, test, the meta-gradient norm.
    for key in ("train/loss", "train/acc", "val/acc", "val/acc_ci95", "test/acc",
                "meta_grad/grad_2.0_norm_total"):
        assert key in logged, key
    # The config: the model's parts and the data settings.
    assert run["config"]["ways"] == 3 and run["config"]["meta_batch_size"] == 2
    assert run["config"]["algorithm"]["class_path"] == "fewshot.algorithms.maml.MAML"
    # Gradient and weight histograms at steps 0 and 2, each step's in one row.
    histograms = [row for row in run["history"]
                  if row.get("meta_grad/network.head.weight/_type") == "histogram"]
    assert {0, 2} <= {row["trainer/global_step"] for row in histograms}
    assert all(row.get("weight/network.head.weight/_type") == "histogram" for row in histograms)
    assert len(histograms[0]["meta_grad/network.head.weight/bins"]) == (
        len(histograms[0]["meta_grad/network.head.weight/values"]) + 1)
    # --wandb keeps fewshot's own run folder, so `fewshot report` works on a W&B run.
    folder = tmp_path / "runs" / "lightning_logs" / "version_0"
    assert (folder / "metrics.csv").is_file() and (folder / "test_results.json").is_file()
    main(["report", str(folder)])
    assert (folder / "report" / "loss_accuracy.png").is_file()


def agent_command(sweep_file: Path, values: dict) -> list[str]:
    """The command wandb's agent runs for one set of parameter values (wandb_agent.Agent:
    create_sweep_command, create_sweep_command_args, then the ${...} macros)."""
    from wandb.sdk.launch.sweeps import utils as sweep_utils

    sweep = sweep_utils.load_sweep_config(str(sweep_file))
    assert sweep is not None, "wandb could not load the sweep file"
    command = sweep_utils.create_sweep_command(list(sweep["command"]))
    variables = sweep_utils.create_sweep_command_args(
        {"args": {name: {"value": value} for name, value in values.items()}})
    variables.update(program=[sweep["program"]], interpreter=["python"], env=["/usr/bin/env"])
    expanded = []
    for chunk in map(str, command):
        is_macro = chunk.startswith("${") and chunk.endswith("}")
        expanded += (variables.get(chunk[2:-1]) or []) if is_macro else [chunk]
    return expanded


def test_sweep_file_runs_through_wandbs_agent_expansion_and_the_cli(monkeypatch, capsys):
    sweep_file = REPO / "configs" / "sweeps" / "wandb_sweep.yaml"
    sweep = yaml.safe_load(sweep_file.read_text())
    assert sweep["metric"]["name"] == "val/acc"  # a metric the run logs
    # One value per parameter, from its values list or its range.
    values = {name: spec["values"][-1] if "values" in spec else spec["min"]
              for name, spec in sweep["parameters"].items()}
    command = agent_command(sweep_file, values)
    assert command[:2] == ["fewshot", "fit"]
    monkeypatch.chdir(REPO)  # the agent runs from the project folder; the config path is relative
    with pytest.raises(SystemExit) as exit_info:
        main([*command[1:], "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    for name, value in values.items():
        node = printed
        for part in name.split("."):
            node = node[part]
        assert node == pytest.approx(value), name
    assert [logger["class_path"] for logger in printed["trainer"]["logger"]][-1] == (
        "lightning.pytorch.loggers.WandbLogger")
