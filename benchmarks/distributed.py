"""Meta-training throughput of the CLI's DDP path: 1 vs 2 CPU processes (gloo), real Omniglot.

    python benchmarks/distributed.py [--steps 40] [--tasks 32]

Runs what users launch, `fewshot fit -c configs/omniglot_5way_1shot_cpu.yaml` (second-order
MAML, conv4-64, 5-way 1-shot, ``--tasks`` tasks per meta-batch), with the default logger,
checkpointing, gradient monitor and a validation at the end, once as one process and once
with ``--trainer.strategy ddp --trainer.devices 2`` (each process takes half of every
meta-batch). Tasks/s is the median of the per-step rates the run logs (``train/tasks_per_s``,
the whole meta-batch over the wall time between two steps) after 5 warm-up steps; the wall
time of the whole command (start-up, validation, checkpoints included) is shown too. On a
CUDA machine ``--gpu`` adds a 1-GPU run. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OMNIGLOT = REPO.parent / "shared" / "data" / "omniglot"
WARMUP = 5


def measure(args, label: str, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        command = [
            sys.executable, "-m", "fewshot", "fit", "-c",
            str(REPO / "configs" / "omniglot_5way_1shot_cpu.yaml"), f"--data.root={args.data_root}",
            f"--data.meta_batch_size={args.tasks}", "--trainer.max_time=null",
            f"--trainer.max_steps={args.steps}", f"--trainer.val_check_interval={args.steps}",
            "--trainer.log_every_n_steps=1", "--data.val_episodes=20", "--test_after_fit=false",
            "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={folder}",
            f"--trainer.logger.init_args.save_dir={folder}", *extra]
        start = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, cwd=folder)
        wall = time.perf_counter() - start
        if result.returncode != 0:
            sys.exit(f"{label} failed:\n{result.stderr[-3000:]}")
        (metrics,) = Path(folder).glob("lightning_logs/*/metrics.csv")
        with open(metrics, newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get("train/tasks_per_s")]
    rates = [float(r["train/tasks_per_s"]) for r in rows if int(r["step"]) >= WARMUP]
    return {"run": label, "tasks_per_s": statistics.median(rates), "timed_steps": len(rates),
            "command_seconds": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--tasks", type=int, default=32)
    parser.add_argument("--data_root", default=str(DEFAULT_OMNIGLOT))
    parser.add_argument("--gpu", action="store_true")
    args = parser.parse_args()

    runs = [("1 CPU process", ["--trainer.accelerator=cpu", "--trainer.devices=1"]),
            ("2 CPU processes (DDP)", ["--trainer.accelerator=cpu", "--trainer.devices=2",
                                       "--trainer.strategy=ddp"])]
    if args.gpu:
        runs.append(("1 GPU", ["--trainer.accelerator=gpu", "--trainer.devices=1"]))
    rows = [measure(args, label, extra) for label, extra in runs]
    base = rows[0]["tasks_per_s"]
    print(f"fewshot fit (CLI), Omniglot 5-way 1-shot, second-order MAML, {args.tasks} tasks per "
          f"meta-batch, {args.steps} steps, median of steps {WARMUP}+")
    print(f"{'run':<24}{'tasks/s':>9}{'vs 1 process':>14}{'command s':>11}")
    for r in rows:
        r["ratio_to_one_cpu_process"] = r["tasks_per_s"] / base
        print(f"{r['run']:<24}{r['tasks_per_s']:>9.1f}{r['ratio_to_one_cpu_process']:>14.2f}"
              f"{r['command_seconds']:>11.1f}")
    print(json.dumps({"benchmark": "distributed", "path": "fewshot fit CLI", "tasks": args.tasks,
                      "steps": args.steps, "rows": rows}))


if __name__ == "__main__":
    main()
