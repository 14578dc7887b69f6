"""Meta-train MAML on real Omniglot for a fixed time, then test on 600 episodes.

    python benchmarks/omniglot_accuracy.py [--minutes 20] [--config configs/omniglot_5way_1shot_cpu.yaml]
                                           [--target 0.987]

The data root is ``--data_root``, else ``$FEWSHOT_OMNIGLOT_ROOT``, else ``../shared/data/omniglot``
beside the repository. Training stops at the time budget (Lightning's ``max_time``, counted from
the start of fitting, after the images are decoded); the checkpoint with the best validation
accuracy is then tested. Every validation is clocked, so the table also says when validation
accuracy first reached ``--target``, if given. The config's ``trainer.max_steps`` still
applies (2,200 for the CPU config, whose learning-rate schedule spans them): for a longer
budget raise it too, ``--trainer.max_steps=N``. Runs on whatever device Lightning picks (a GPU
if there is one; ``--trainer.accelerator=cpu`` forces the CPU). Extra ``--section.option=value``
arguments go to the fewshot CLI. ``benchmarks/time_to_accuracy.py`` is this script with
device-dependent defaults. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

from common import DEFAULT_OMNIGLOT, REPO, fit_then_test
from lightning.pytorch import Callback


class ValidationClock(Callback):
    """Records ``(seconds since fitting started, meta-iteration, val/acc)`` at every validation."""

    def __init__(self) -> None:
        self.points: list[dict] = []
        self._start = time.perf_counter()

    def on_fit_start(self, trainer, module) -> None:
        self._start = time.perf_counter()

    def on_validation_end(self, trainer, module) -> None:
        accuracy = trainer.callback_metrics.get("val/acc")
        if accuracy is not None and not trainer.sanity_checking:
            self.points.append({"seconds": round(time.perf_counter() - self._start, 1),
                                "meta_iteration": trainer.global_step,
                                "val_acc": float(accuracy)})


def main(defaults: dict | None = None) -> None:
    defaults = {"minutes": 20.0, "config": str(REPO / "configs" / "omniglot_5way_1shot_cpu.yaml"),
                "output_dir": str(REPO / "runs" / "benchmark_omniglot_accuracy"), **(defaults or {})}
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=defaults["minutes"])
    parser.add_argument("--config", default=defaults["config"])
    parser.add_argument("--data_root", default=DEFAULT_OMNIGLOT)
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--target", type=float, default=defaults.get("target"),
                        help="validation accuracy (0-1) whose first crossing is reported")
    parser.add_argument("--output_dir", default=defaults["output_dir"])
    args, overrides = parser.parse_known_args()

    clock = ValidationClock()
    result = fit_then_test(args.config, args.minutes, args.data_root, args.episodes,
                           args.output_dir, [*defaults.get("overrides", []), *overrides], [clock])
    reached = next((p for p in clock.points if args.target is not None and p["val_acc"] >= args.target), None)
    result = {**result, "minutes_budget": args.minutes, "validations": clock.points,
              "target": args.target, "target_reached_at": reached}
    print()
    print(f"Omniglot {result['ways']}-way {result['shots']}-shot MAML on {result['device']}, "
          f"{result['meta_batch_size']} tasks x {result['queries']} queries/class per meta-batch")
    print(f"{'meta-train time':<30}{result['train_seconds'] / 60:>9.1f} min")
    print(f"{'meta-iterations':<30}{result['meta_iterations']:>9d}")
    print(f"{'checkpoint tested':<30}{result['checkpoint'] or 'final weights':>9}")
    for point in clock.points:
        print(f"{'val acc at ' + format(point['seconds'] / 60, '.1f') + ' min':<30}"
              f"{100 * point['val_acc']:>8.2f}%  (iteration {point['meta_iteration']})")
    if args.target is not None:
        when = (f"{reached['seconds'] / 60:.1f} min (iteration {reached['meta_iteration']})"
                if reached else "not reached")
        print(f"{'val acc >= ' + format(100 * args.target, '.1f') + '%':<30}{when:>9}")
    for row in result["per_step"]:
        print(f"{'test acc after ' + str(row['inner_step']) + ' inner step(s)':<30}"
              f"{100 * row['accuracy']:>8.2f}% +- {100 * row['ci95']:.2f}")
    print(json.dumps({"benchmark": "omniglot_accuracy", **result}))


if __name__ == "__main__":
    main()
