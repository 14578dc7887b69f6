"""Shared by the accuracy benchmarks: meta-train for a wall-clock budget, then test."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fewshot.training.cli import build_cli

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OMNIGLOT = os.environ.get(
    "FEWSHOT_OMNIGLOT_ROOT", str(REPO.parent / "shared" / "data" / "omniglot"))


def as_max_time(minutes: float) -> str:
    seconds = round(minutes * 60)
    return f"00:{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def fit_then_test(config: str, minutes: float, data_root: str, episodes: int, output_dir: str,
                  overrides: list[str] = (), callbacks: list = ()) -> dict:
    """Meta-train ``config`` for ``minutes`` (data decoding excluded), then test the checkpoint
    with the best validation accuracy on ``episodes`` test tasks. Returns the figures.
    ``callbacks`` are added to the Trainer's own."""
    cli = build_cli([
        "--config", config, f"--data.root={data_root}", f"--data.test_episodes={episodes}",
        f"--trainer.max_time={as_max_time(minutes)}", f"--trainer.default_root_dir={output_dir}",
        f"--trainer.logger.init_args.save_dir={output_dir}", "--test_after_fit=false",
        "--trainer.enable_progress_bar=false", *overrides,
    ], run=False)
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    trainer.callbacks.extend(callbacks)
    data.prepare_data()
    data.setup("fit")  # decode (or load the cache) before the clock starts
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    train_seconds = time.perf_counter() - start
    best = trainer.checkpoint_callback.best_model_path
    trainer.test(model, datamodule=data, ckpt_path=best or None)
    hp = data.hparams
    return {
        "config": Path(config).name, "ways": hp.ways, "shots": hp.shots,
        "meta_batch_size": hp.meta_batch_size, "queries": hp.queries,
        "test_acc": model.test_result["accuracy"], "ci95": model.test_result["ci95"],
        "episodes": model.test_result["episodes"], "train_seconds": round(train_seconds, 1),
        "meta_iterations": trainer.global_step, "checkpoint": Path(best).name if best else None,
        "per_step": model.test_result["per_step"], "log_dir": trainer.log_dir,
        "device": str(trainer.strategy.root_device),
    }


def run_in_parallel(script: str, arms: list[str], argv: list[str]) -> dict:
    """Each arm in a child process of ``script`` (``--arms=ARM --result_file=F``), one thread
    each, all started together, so every arm meets the same machine load."""
    kept, skip_value = [], False
    for a in argv:  # drop --parallel and --arms (either "--arms=X" or "--arms X")
        if skip_value or a == "--parallel" or a.startswith("--arms="):
            skip_value = False
        elif a == "--arms":
            skip_value = True
        else:
            kept.append(a)
    argv = kept
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as folder:
        children = {}
        for arm in arms:
            result_file = os.path.join(folder, f"{arm}.json")
            command = [sys.executable, script, f"--arms={arm}", f"--result_file={result_file}", *argv]
            log = open(os.path.join(folder, f"{arm}.log"), "w")  # noqa: SIM115
            children[arm] = (subprocess.Popen(command, env=environment, stdout=log, stderr=log),
                             result_file, log)
        results, failures = {}, []
        for arm, (child, result_file, log) in children.items():
            code = child.wait()
            log.close()
            if code != 0:  # keep the other arms' results; say which failed and why
                failures.append(f"arm {arm} failed:\n" + Path(log.name).read_text()[-3000:])
                continue
            with open(result_file) as f:
                results.update(json.load(f))
    for failure in failures:
        print(failure, file=sys.stderr)
    if not results:
        sys.exit("every arm failed")
    return results


def arms_parser(description: str, arms: dict, minutes: float, config: str,
                output_dir: str) -> argparse.ArgumentParser:
    """The options every arm-comparison benchmark shares (``--arms``, budget, data, parallel)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--minutes", type=float, default=minutes)
    parser.add_argument("--arms", default=",".join(arms))
    parser.add_argument("--config", default=str(REPO / "configs" / config))
    parser.add_argument("--data_root", default=DEFAULT_OMNIGLOT)
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--output_dir", default=str(REPO / "runs" / output_dir))
    parser.add_argument("--parallel", action="store_true")
    parser.add_argument("--result_file", help=argparse.SUPPRESS)  # used by --parallel
    return parser


def run_arms(script: str, parser: argparse.ArgumentParser, arms: dict,
             run_one) -> tuple[argparse.Namespace, dict | None]:
    """Parse the command line and run the chosen arms: ``run_one(args, arm, overrides)`` each,
    one after another, or every arm in its own process with ``--parallel``. Returns the
    arguments and the results by arm; ``None`` in a ``--parallel`` child, which writes its
    result file instead."""
    args, overrides = parser.parse_known_args()
    chosen = args.arms.split(",")
    unknown = set(chosen) - set(arms)
    if unknown:
        parser.error(f"unknown arms {sorted(unknown)}; choose from {list(arms)}")
    if args.parallel:
        return args, run_in_parallel(script, chosen, sys.argv[1:])
    results = {arm: run_one(args, arm, overrides) for arm in chosen}
    if args.result_file:
        with open(args.result_file, "w") as f:
            json.dump(results, f)
        return args, None
    return args, results

