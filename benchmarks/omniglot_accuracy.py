"""Meta-train MAML on real Omniglot on this CPU for a fixed time, then test on 600 episodes.

    python benchmarks/omniglot_accuracy.py [--minutes 20] [--config configs/omniglot_5way_1shot_cpu.yaml]

The data root is ``--data_root``, else ``$FEWSHOT_OMNIGLOT_ROOT``, else ``../shared/data/omniglot``
beside the repository. Training stops at the time budget (Lightning's ``max_time``); the
checkpoint with the best validation accuracy is then tested. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from fewshot.cli import build_cli

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--config", default=str(REPO / "configs" / "omniglot_5way_1shot_cpu.yaml"))
    parser.add_argument("--data_root", default=os.environ.get(
        "FEWSHOT_OMNIGLOT_ROOT", str(REPO.parent / "shared" / "data" / "omniglot")))
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--output_dir", default=str(REPO / "runs" / "benchmark_omniglot_accuracy"))
    args, overrides = parser.parse_known_args()

    seconds = round(args.minutes * 60)
    budget = f"00:{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
    cli = build_cli([
        "--config", args.config, f"--data.root={args.data_root}",
        f"--data.test_episodes={args.episodes}", f"--trainer.max_time={budget}",
        f"--trainer.default_root_dir={args.output_dir}",
        f"--trainer.logger.init_args.save_dir={args.output_dir}", "--test_after_fit=false",
        *overrides,
    ], run=False)
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    data.prepare_data()
    data.setup("fit")  # decode (or load the cache) before the clock starts
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    train_seconds = time.perf_counter() - start
    meta_iterations = trainer.global_step
    best = trainer.checkpoint_callback.best_model_path
    trainer.test(model, datamodule=data, ckpt_path=best or None)
    result = model.test_result

    hp = data.hparams
    print()
    print(f"Omniglot {hp.ways}-way {hp.shots}-shot, MAML {'first' if model.hparams.first_order else 'second'}"
          f" order, {hp.meta_batch_size} tasks x {hp.queries} queries/class per meta-batch, CPU")
    print(f"{'meta-train time':<28}{train_seconds / 60:>10.1f} min")
    print(f"{'meta-iterations':<28}{meta_iterations:>10d}")
    print(f"{'checkpoint tested':<28}{Path(best).name if best else 'final weights':>10}")
    for row in result["per_step"]:
        print(f"{'test acc after ' + str(row['inner_step']) + ' step(s)':<28}"
              f"{100 * row['accuracy']:>9.2f}% +- {100 * row['ci95']:.2f}")
    print(json.dumps({
        "benchmark": "omniglot_accuracy", "config": Path(args.config).name,
        "ways": hp.ways, "shots": hp.shots, "meta_batch_size": hp.meta_batch_size,
        "queries": hp.queries, "test_acc": result["accuracy"], "ci95": result["ci95"],
        "episodes": result["episodes"], "train_seconds": round(train_seconds, 1),
        "meta_iterations": meta_iterations, "checkpoint": Path(best).name if best else None,
        "per_step": result["per_step"],
    }))


if __name__ == "__main__":
    main()
