"""``fewshot seeds`` runs a config over seeds; ``fewshot summary`` summarises finished runs."""

from __future__ import annotations

import json
import statistics
import sys

import pytest
from test_compare import write_run

from fewshot.cli import main
from fewshot.training import seeds


def test_each_seed_is_a_fit_of_its_own_with_both_seeds_set(tmp_path, capsys):
    command = seeds.seed_command("configs/omniglot_5way_1shot_cpu.yaml", 2, tmp_path / "root",
                                 ["--data.root=/data"])
    assert command[:4] == [sys.executable, "-m", "fewshot", "fit"]
    for expected in ("--seed_everything=2", "--data.seed=2", "--test_after_fit=true",
                     "--ckpt_path=last", "--data.root=/data",
                     f"--trainer.default_root_dir={tmp_path / 'root' / 'omniglot_5way_1shot_cpu' / 'seed_2'}"):
        assert expected in command
    main(["seeds", "-c", "omniglot_5way_1shot_cpu", "--seeds", "0", "1", "--print",
          "--root", str(tmp_path), "--", "--data.root=/data"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(line.startswith("fewshot fit -c omniglot_5way_1shot_cpu ")
                                   for line in lines)
    assert "--seed_everything=1" in lines[1] and lines[1].endswith("--data.root=/data")


def test_seeds_run_test_and_summarise_and_a_second_call_skips_finished_ones(
        fake_omniglot, tmp_path, monkeypatch, capsys):
    root, cache = fake_omniglot
    launched = []

    def fit_in_this_process(command):  # the real fewshot fit, minus the new process
        launched.append(command)
        main(command[3:])
        return 0

    monkeypatch.setattr(seeds, "launch", fit_in_this_process)
    tiny = ["--", f"--data.root={root}", f"--data.cache_dir={cache}", "--data.ways=3",
            "--data.queries=2", "--data.meta_batch_size=2", "--data.eval_queries=2",
            "--data.val_episodes=2", "--data.test_episodes=4", "--data.steps_per_epoch=2",
            "--model.backbone.hidden_channels=4", "--trainer.max_steps=2",
            "--trainer.enable_progress_bar=false"]
    main(["seeds", "-c", "omniglot_5way_1shot_cpu", "--seeds", "0", "1", "--root", str(tmp_path),
          *tiny])
    out = capsys.readouterr().out
    assert len(launched) == 2 and "Mean over 2 runs" in out
    results = {s: json.loads(next((tmp_path / "omniglot_5way_1shot_cpu" / f"seed_{s}").rglob(
        "test_results.json")).read_text()) for s in (0, 1)}
    assert [results[s]["provenance"]["seed_everything"] for s in (0, 1)] == [0, 1]
    main(["seeds", "-c", "omniglot_5way_1shot_cpu", "--seeds", "0", "1", "--root", str(tmp_path),
          *tiny])
    assert len(launched) == 2 and "finished already" in capsys.readouterr().out
    main(["summary", str(tmp_path / "omniglot_5way_1shot_cpu"), "--json", str(tmp_path / "s.json")])
    summary = json.loads((tmp_path / "s.json").read_text())
    accuracies = [results[s]["accuracy"] for s in (0, 1)]
    assert summary["mean_accuracy"] == pytest.approx(statistics.fmean(accuracies))
    assert summary["std_accuracy"] == pytest.approx(statistics.stdev(accuracies))
    assert [r["run"] for r in summary["runs"]] == ["seed_0", "seed_1"]
    assert all(r["meta_iterations"] == 2 and r["wall_time_s"] > 0 for r in summary["runs"])


def test_summary_gives_mean_and_standard_deviation_and_names_untested_runs(tmp_path, capsys):
    for seed, accuracy in ((0, 0.90), (1, 0.94), (2, 0.92)):
        write_run(tmp_path / f"seed_{seed}" / "version_0", accuracy=accuracy,
                  validation=[(9, accuracy)], seconds_per_step=6.0, seed=seed)
    untested = write_run(tmp_path / "seed_3" / "version_0", accuracy=0.5, validation=[],
                         seconds_per_step=1.0, seed=3)
    (untested / "test_results.json").unlink()
    main(["summary", str(tmp_path)])
    out = capsys.readouterr().out
    assert "| seed_0/version_0 | 0 | 90.00 +- 1.00% (600 episodes) | 10 | 1.0 min |" in out \
        or "| seed_0 | 0 | 90.00 +- 1.00% (600 episodes) | 10 | 1.0 min |" in out
    assert "Mean over 3 runs: 92.00% +- 2.00%" in out and "Not tested, left out: seed_3" in out
    with pytest.raises(SystemExit) as exit_info:
        main(["summary", str(untested)])
    assert exit_info.value.code == 2
    assert "nothing to summarise" in capsys.readouterr().err


def test_a_failed_seed_says_how_to_resume(tmp_path, monkeypatch):
    monkeypatch.setattr(seeds, "launch", lambda command: 3)
    with pytest.raises(RuntimeError, match="exit code 3.*run the same command again"):
        seeds.run_seeds("x.yaml", [0], tmp_path)
