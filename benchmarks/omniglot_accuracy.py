"""Meta-train MAML on real Omniglot on this CPU for a fixed time, then test on 600 episodes.

    python benchmarks/omniglot_accuracy.py [--minutes 20] [--config configs/omniglot_5way_1shot_cpu.yaml]

The data root is ``--data_root``, else ``$FEWSHOT_OMNIGLOT_ROOT``, else ``../shared/data/omniglot``
beside the repository. Training stops at the time budget (Lightning's ``max_time``); the
checkpoint with the best validation accuracy is then tested. Extra ``--section.option=value``
arguments go to the fewshot CLI. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json

from common import DEFAULT_OMNIGLOT, REPO, fit_then_test


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--config", default=str(REPO / "configs" / "omniglot_5way_1shot_cpu.yaml"))
    parser.add_argument("--data_root", default=DEFAULT_OMNIGLOT)
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--output_dir", default=str(REPO / "runs" / "benchmark_omniglot_accuracy"))
    args, overrides = parser.parse_known_args()

    result = fit_then_test(args.config, args.minutes, args.data_root, args.episodes,
                           args.output_dir, overrides)
    print()
    print(f"Omniglot {result['ways']}-way {result['shots']}-shot MAML on CPU, "
          f"{result['meta_batch_size']} tasks x {result['queries']} queries/class per meta-batch")
    print(f"{'meta-train time':<30}{result['train_seconds'] / 60:>9.1f} min")
    print(f"{'meta-iterations':<30}{result['meta_iterations']:>9d}")
    print(f"{'checkpoint tested':<30}{result['checkpoint'] or 'final weights':>9}")
    for row in result["per_step"]:
        print(f"{'test acc after ' + str(row['inner_step']) + ' inner step(s)':<30}"
              f"{100 * row['accuracy']:>8.2f}% +- {100 * row['ci95']:.2f}")
    print(json.dumps({"benchmark": "omniglot_accuracy", **result}))


if __name__ == "__main__":
    main()
