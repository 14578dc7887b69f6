"""``fewshot seeds -c CONFIG --seeds 0 1 2``: one config over several seeds, and their summary.

Papers report the mean over seeds (MAML++: three). Each seed is a complete ``fewshot fit``
with ``--test_after_fit true`` in a folder of its own, ``ROOT/CONFIG/seed_S`` (ROOT defaults
to ``runs/seeds``); the seed sets both the weight initialisation (``--seed_everything``) and
the training tasks (``--data.seed``). The seed's test episodes are drawn by the same seed,
so each run is scored on tasks of its own, as a paper's separate runs are.

The seeds run one after the other in this process's children, or, with ``--print``, are
printed as one command line each to launch anywhere (a SLURM array, several machines). A
seed whose folder already holds ``test_results.json`` is skipped, and an unfinished one
resumes from its ``last.ckpt``: running the command again after a kill loses nothing.

``fewshot summary FOLDER...`` then prints the mean and standard deviation over the finished
runs, with each run's 95% interval, meta-iterations and wall time.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fewshot.training.runs import Run, read_runs


def seed_folder(root: Path, config: str, seed: int) -> Path:
    return root / Path(config).stem / f"seed_{seed}"


def seed_command(config: str, seed: int, root: Path, extra: Sequence[str] = ()) -> list[str]:
    """The ``fewshot fit`` command line of one seed."""
    folder = seed_folder(root, config, seed)
    return [sys.executable, "-m", "fewshot", "fit", "-c", config, f"--seed_everything={seed}",
            f"--data.seed={seed}", f"--trainer.default_root_dir={folder}",
            "--test_after_fit=true", "--ckpt_path=last", *extra]


def launch(command: Sequence[str]) -> int:
    """Run one seed's command in a process of its own; its exit code."""
    return subprocess.run(command, check=False).returncode


def finished(folder: Path) -> bool:
    return any(folder.rglob("test_results.json"))


def run_seeds(config: str, seeds: Sequence[int], root: Path, extra: Sequence[str] = (),
              print_only: bool = False) -> list[Path]:
    """Run (or print) every seed's command; returns the seeds' folders."""
    folders = []
    for seed in seeds:
        folder = seed_folder(root, config, seed)
        folders.append(folder)
        command = seed_command(config, seed, root, extra)
        if print_only:
            print(shlex.join(["fewshot", *command[3:]]))
            continue
        if finished(folder):
            print(f"seed {seed}: finished already ({folder}), skipped")
            continue
        print(f"seed {seed}: {shlex.join(['fewshot', *command[3:]])}", flush=True)
        code = launch(command)
        if code != 0:
            raise RuntimeError(f"seed {seed} failed (exit code {code}); its run "
                               f"is in {folder}: run the same command again to resume it")
    return folders


def summarise(runs: Sequence[Run]) -> dict[str, Any]:
    """Mean and standard deviation of the test accuracy over ``runs`` (tested ones only),
    with each run's figures."""
    tested = [run for run in runs if run.test is not None]
    if not tested:
        raise ValueError("none of these runs has a test_results.json: nothing to summarise "
                         "(test them with --test_after_fit true or fewshot test)")
    accuracies = [run.test["accuracy"] for run in tested]
    rows = [{"run": run.label, "seed": run.seed, "accuracy": run.test["accuracy"],
             "ci95": run.test["ci95"], "episodes": run.test["episodes"],
             "meta_iterations": run.meta_iterations, "wall_time_s": run.wall_time_s}
            for run in tested]
    return {"runs": rows, "count": len(tested),
            "mean_accuracy": statistics.fmean(accuracies),
            "std_accuracy": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            "untested": [run.label for run in runs if run.test is None]}


def format_summary(summary: dict[str, Any]) -> str:
    lines = ["| run | seed | test accuracy (95% CI) | meta-iterations | wall time |",
             "|---|---|---|---|---|"]
    for r in summary["runs"]:
        wall = "-" if r["wall_time_s"] is None else f"{r['wall_time_s'] / 60:.1f} min"
        lines.append(f"| {r['run']} | {r['seed'] if r['seed'] is not None else '-'} | "
                     f"{100 * r['accuracy']:.2f} +- {100 * r['ci95']:.2f}% ({r['episodes']} "
                     f"episodes) | {r['meta_iterations']:,} | {wall} |")
    lines += ["", f"Mean over {summary['count']} runs: {100 * summary['mean_accuracy']:.2f}% "
                  f"+- {100 * summary['std_accuracy']:.2f}% (standard deviation over runs)"]
    if summary["untested"]:
        lines.append("Not tested, left out: " + ", ".join(summary["untested"]))
    return "\n".join(lines)


def seeds_main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="fewshot seeds", description="Run a config over several seeds (fewshot fit each).",
        epilog="Options after -- go to every fewshot fit, e.g. -- --data.root /data/omniglot")
    parser.add_argument("-c", "--config", required=True, help="a YAML config or a shipped one's name")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--root", type=Path, default=Path("runs/seeds"),
                        help="the seeds' runs go to ROOT/CONFIG/seed_S (default runs/seeds)")
    parser.add_argument("--print", action="store_true", dest="print_only",
                        help="print one command line per seed instead of running them")
    argv = list(argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    folders = run_seeds(args.config, args.seeds, args.root, extra, args.print_only)
    if not args.print_only:
        print(format_summary(summarise(read_runs(folders))))


def summary_main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="fewshot summary",
        description="Mean and standard deviation of the test accuracy over finished runs.")
    parser.add_argument("runs", type=Path, nargs="+", metavar="FOLDER",
                        help="run folders, or folders with runs below them (runs/seeds/CONFIG)")
    parser.add_argument("--json", type=Path, help="also write the summary to this JSON file")
    args = parser.parse_args(argv)
    summary = summarise(read_runs(args.runs))
    print(format_summary(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
