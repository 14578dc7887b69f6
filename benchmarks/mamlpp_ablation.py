"""MAML vs MAML++ and MAML++ without each of its parts, at an equal wall-clock budget.

    python benchmarks/mamlpp_ablation.py [--minutes 15] [--arms maml,mamlpp,...]

Omniglot 5-way 1-shot on this CPU (configs/mamlpp_omniglot_5way_1shot_cpu.yaml), every arm
meta-trained for the same minutes, then tested on 600 episodes with its best validation
checkpoint. Arms:
    maml           every MAML++ switch off (plain second-order MAML, 3 inner steps; still the
                   MAMLPlusPlus algorithm of the config, whose switches are its init_args)
    mamlpp         MSL + DA + LSLR + per-step BN weights + per-step running statistics
    no_msl         MAML++ without the multi-step loss
    no_lslr        MAML++ without learned inner rates
    no_per_step_bn MAML++ with shared batch-norm weights and transductive batch statistics
With ``--parallel`` every arm runs at the same time in its own process with one thread, so
on a shared machine all arms meet the same load (an equal budget in wall-clock terms, and a
fair one); without it the arms run one after another with all cores.
Last line: one JSON object with every arm's accuracy and CI.
"""

from __future__ import annotations

import json

from common import arms_parser, fit_then_test, run_arms

SETTING = "--model.algorithm.init_args"
ARMS = {
    "maml": [f"{SETTING}.multi_step_loss=false", f"{SETTING}.derivative_order_annealing=false",
             f"{SETTING}.learned_rates=none", f"{SETTING}.per_step_bn_weights=false",
             f"{SETTING}.batch_norm=transductive"],
    "mamlpp": [],
    "no_msl": [f"{SETTING}.multi_step_loss=false"],
    "no_lslr": [f"{SETTING}.learned_rates=none"],
    "no_per_step_bn": [f"{SETTING}.per_step_bn_weights=false", f"{SETTING}.batch_norm=transductive"],
}


def main() -> None:
    parser = arms_parser(__doc__.splitlines()[0], ARMS, 15.0,
                         "mamlpp_omniglot_5way_1shot_cpu.yaml", "benchmark_mamlpp_ablation")

    def run_one(args, arm: str, overrides: list[str]) -> dict:
        return fit_then_test(args.config, args.minutes, args.data_root, args.episodes,
                             f"{args.output_dir}/{arm}", [*ARMS[arm], *overrides])

    args, results = run_arms(__file__, parser, ARMS, run_one)
    if results is None:
        return
    print()
    how = "all arms at once, 1 thread each" if args.parallel else "one arm after another"
    print(f"Omniglot 5-way 1-shot, {args.minutes:g} minutes of meta-training per arm on this CPU "
          f"({how}), {args.episodes} test episodes (mean +- 95% CI)")
    print(f"{'arm':<16}{'meta-iterations':>16}{'test accuracy':>20}")
    for arm, r in results.items():
        print(f"{arm:<16}{r['meta_iterations']:>16d}{100 * r['test_acc']:>13.2f}% +- {100 * r['ci95']:.2f}")
    print(json.dumps({"benchmark": "mamlpp_ablation", "minutes_per_arm": args.minutes,
                      "parallel": args.parallel,
                      "arms": {arm: {k: r[k] for k in ("test_acc", "ci95", "episodes",
                                                        "meta_iterations", "train_seconds")}
                               for arm, r in results.items()}}))


if __name__ == "__main__":
    main()
