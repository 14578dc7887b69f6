"""``fewshot report RUN_A RUN_B``: runs read back from their folders and compared."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from fewshot.cli import main
from fewshot.training.compare import run_row
from fewshot.training.runs import find_runs, read_run, short_labels


def write_run(folder: Path, *, accuracy: float, validation: list[tuple[int, float]],
              seconds_per_step: float | None, steps: int = 10, seed: int = 0,
              norms: list[float] = (3.0, 1.0, 2.0)) -> Path:
    """A run folder in the format fewshot writes: metrics.csv (Lightning's CSV logger: one row
    per step and kind, empty cells elsewhere), config.yaml and test_results.json."""
    folder.mkdir(parents=True)
    columns = ["epoch", "step", "train/loss", "train/elapsed_s", "val/acc",
               "meta_grad/grad_2.0_norm_total"]
    with (folder / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for step in range(steps):
            row = {"epoch": 0, "step": step, "train/loss": 1.0 / (step + 1)}
            if seconds_per_step is not None:
                row["train/elapsed_s"] = seconds_per_step * (step + 1)
            if step < len(norms):
                row["meta_grad/grad_2.0_norm_total"] = norms[step]
            writer.writerow(row)
        for step, value in validation:
            writer.writerow({"epoch": 0, "step": step, "val/acc": value})
    (folder / "config.yaml").write_text(yaml.safe_dump({"seed_everything": seed}))
    (folder / "test_results.json").write_text(json.dumps({
        "accuracy": accuracy, "ci95": 0.01, "episodes": 600, "inner_steps": 1,
        "per_step": [{"inner_step": 0, "accuracy": 0.2, "ci95": 0.01},
                     {"inner_step": 1, "accuracy": accuracy, "ci95": 0.01}],
        "algorithm": {"algorithm": "MAML"}}))
    return folder


def test_a_run_reads_back_its_figures(tmp_path):
    folder = write_run(tmp_path / "a" / "lightning_logs" / "version_0", accuracy=0.9,
                       validation=[(4, 0.7), (9, 0.8)], seconds_per_step=6.0, seed=3)
    row = run_row(read_run(tmp_path / "a"))  # the parent finds the run
    assert row["test_accuracy"] == 0.9 and row["seed"] == 3
    assert row["meta_iterations"] == 10 and row["wall_minutes"] == pytest.approx(1.0)
    assert (row["best_val_accuracy"], row["best_val_iteration"]) == (0.8, 9)
    assert (row["max_grad_norm"], row["median_grad_norm"]) == (3.0, 2.0)
    # Validation against time: each validation at the time of its step.
    assert read_run(folder).at_time("val/acc") == [(30.0, 0.7), (60.0, 0.8)]


def test_runs_are_labelled_by_what_tells_them_apart(tmp_path):
    folders = [tmp_path / "seeds" / f"seed_{s}" / "lightning_logs" / "version_0" for s in (0, 1)]
    assert short_labels(folders) == ["seed_0", "seed_1"]
    assert short_labels([tmp_path / "x" / "version_0", tmp_path / "x" / "version_1"]) == [
        "version_0", "version_1"]
    with pytest.raises(FileNotFoundError, match="no metrics.csv"):
        (tmp_path / "empty").mkdir()
        find_runs([tmp_path / "empty"])


def test_report_with_two_runs_writes_the_comparison(tmp_path, capsys):
    write_run(tmp_path / "runs" / "fast" / "version_0", accuracy=0.9,
              validation=[(4, 0.7), (9, 0.85)], seconds_per_step=1.0)
    write_run(tmp_path / "runs" / "slow" / "version_0", accuracy=0.8,
              validation=[(4, 0.6), (9, 0.75)], seconds_per_step=2.0)
    output = tmp_path / "comparison"
    main(["report", str(tmp_path / "runs" / "fast"), str(tmp_path / "runs" / "slow"),
          "--output", str(output)])
    printed = capsys.readouterr().out
    assert "| fast | 10 | 0.2 min | 90.00 +- 1.00% (600 episodes) | 85.00% (9) | 3 | 2 | 0 |" in printed
    assert "| slow | 10 | 0.3 min | 80.00 +- 1.00% (600 episodes) | 75.00% (9) |" in printed
    for name in ("validation_vs_iterations.png", "validation_vs_time.png", "test_per_step.png"):
        with Image.open(output / name) as image:
            low, high = image.convert("L").getextrema()
            assert high - low > 50, name
    rows = list(csv.DictReader((output / "comparison.csv").open()))
    assert [r["run"] for r in rows] == ["fast", "slow"]
    assert "| fast |" in (output / "comparison.md").read_text()
    # --compare: every run below one folder.
    main(["report", "--compare", str(tmp_path / "runs"), "--output", str(tmp_path / "all")])
    assert len(list(csv.DictReader((tmp_path / "all" / "comparison.csv").open()))) == 2


def test_runs_that_logged_no_time_have_none(tmp_path):
    run = read_run(write_run(tmp_path / "old", accuracy=0.5, validation=[(2, 0.5)],
                             seconds_per_step=None, steps=3))
    assert run.wall_time_s is None and run.at_time("val/acc") == []
    assert run_row(run)["wall_minutes"] is None


def test_wall_time_is_the_logged_one_and_the_recorded_one_only_without_a_log(tmp_path):
    """A test that loaded an early best checkpoint once recorded that checkpoint's time (and
    earlier runs counted the test too): the log written while training is what counts."""
    for name, seconds_per_step in (("logged", 6.0), ("unlogged", None)):
        folder = write_run(tmp_path / name, accuracy=0.9, validation=[(4, 0.7)],
                           seconds_per_step=seconds_per_step)
        results = json.loads((folder / "test_results.json").read_text())
        results["training"] = {"meta_iterations": 10, "wall_time_s": 25.0}
        (folder / "test_results.json").write_text(json.dumps(results))
    assert read_run(tmp_path / "logged").wall_time_s == pytest.approx(60.0)
    assert read_run(tmp_path / "unlogged").wall_time_s == pytest.approx(25.0)
