"""The algorithm family at an equal wall-clock budget: MAML with SGD, momentum or Adam in the
inner loop, Meta-SGD, ANIL, Reptile and Prototypical Networks, on Omniglot 5-way 1-shot.

    python benchmarks/algorithms.py [--minutes 4] [--arms maml,adam,...] [--parallel]

Every arm starts from configs/omniglot_5way_1shot_cpu.yaml (MAML, Adam 2e-3 as meta-optimizer)
with the same number of inner steps (``--inner_steps``, default 2, so momentum and Adam differ
from SGD) and 3 at test, meta-trains for the same minutes, and is tested on 600 episodes with
its best validation checkpoint; Reptile keeps its own inner loop and ProtoNets has none. Besides
accuracy it reports how the meta-gradient behaved: the largest and the median total norm logged
(every 25 meta-iterations) and how many meta-steps had a NaN or Inf meta-gradient (every arm
runs with ``--nonfinite.policy skip``, so such steps are skipped and counted instead of stopping
the run). Arms:
    maml        SGD, inner_lr 0.4 (MAML)
    momentum    SGD with momentum 0.9, inner_lr 0.2 (two steps then move about as far as SGD's)
    adam_torch  Adam as torch.optim.Adam computes it (eps 1e-8 outside the square root), lr 0.02
    adam        Adam with eps 1e-3 inside the square root (fewshot's default), lr 0.02
    adam_lslr   the same with learned per-layer, per-step rates (LSLR)
    meta_sgd    SGD with a learned rate per parameter entry and step (Meta-SGD)
    anil        SGD on the head only (ANIL)
    reptile     Reptile: 5 first-order SGD steps at inner_lr 0.1 in training (the Reptile
                paper's 5 steps on Omniglot), 10 at test; the meta-optimizer follows the mean
                of params - adapted params
    protonet    Prototypical Networks: no inner loop, distances to class means of the support
                embeddings
``--parallel`` runs every arm at once, one thread each, so all meet the same machine load.
Last line: one JSON object with every arm's figures.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

from common import arms_parser, fit_then_test, run_arms

# Adam's first step moves every entry by about lr whatever its gradient; SGD at 0.4 moves the
# median entry by 0.016 on Omniglot at initialisation (median |support gradient| 0.04), so
# 0.02 gives Adam SGD's typical step size.
ADAM_LR = "0.02"
ALGORITHM = "--model.algorithm"
SETTING = "--model.algorithm.init_args"
INNER_OPTIMIZER = "--model.inner_optimizer"
ADAM = [f"{INNER_OPTIMIZER}=fewshot.core.inner_optimizers.Adam", f"{SETTING}.inner_lr={ADAM_LR}"]
# Each arm: the algorithm it switches to (None: the config's MAML), then its own settings,
# applied after the shared ones (--inner_steps, 3 steps at test).
ARMS: dict[str, tuple[str | None, list[str]]] = {
    "maml": (None, [f"{SETTING}.inner_lr=0.4"]),
    "momentum": (None, [f"{INNER_OPTIMIZER}=fewshot.core.inner_optimizers.Momentum",
                        f"{INNER_OPTIMIZER}.init_args.momentum=0.9", f"{SETTING}.inner_lr=0.2"]),
    "adam_torch": (None, [*ADAM, f"{INNER_OPTIMIZER}.init_args.eps=1e-8",
                          f"{INNER_OPTIMIZER}.init_args.eps_inside_sqrt=false"]),
    "adam": (None, ADAM),
    "adam_lslr": (None, [*ADAM, f"{SETTING}.learned_rates=per_tensor"]),
    # learned_rates spelled out: switching the class keeps the MAML config's settings that
    # MetaSGD also takes, its learned_rates "none" included.
    "meta_sgd": ("fewshot.algorithms.MetaSGD", [f"{SETTING}.inner_lr=0.4",
                                                 f"{SETTING}.learned_rates=per_entry"]),
    "anil": ("fewshot.algorithms.ANIL", [f"{SETTING}.inner_lr=0.4"]),
    "reptile": ("fewshot.algorithms.Reptile", [f"{SETTING}.inner_steps=5",
                                               f"{SETTING}.inner_lr=0.1",
                                               f"{SETTING}.eval_inner_steps=10"]),
    "protonet": ("fewshot.algorithms.ProtoNet", []),
}
# Algorithms without an inner loop take no inner-loop settings.
NO_INNER_LOOP = {"fewshot.algorithms.ProtoNet"}
# The CPU config starts every task from a zero head (MAML's zero_head); this benchmark compares
# the algorithms as published, so the arms that take the switch turn it off (the others drop
# it with the rest of MAML's settings they do not take).
TAKES_ZERO_HEAD = {None, "fewshot.algorithms.ANIL"}


def arm_overrides(arm: str, inner_steps: int) -> list[str]:
    """The fewshot CLI flags of ``arm``: the algorithm first (its settings must follow it),
    then the settings shared by every arm, then the arm's own."""
    algorithm, own = ARMS[arm]
    switch = [] if algorithm is None else [f"{ALGORITHM}={algorithm}"]
    shared = [] if algorithm in NO_INNER_LOOP else [f"{SETTING}.inner_steps={inner_steps}",
                                                     f"{SETTING}.eval_inner_steps=3"]
    if algorithm in TAKES_ZERO_HEAD:
        shared.append(f"{SETTING}.zero_head=false")
    return [*switch, *shared, "--nonfinite.policy=skip", *own]


GRAD_NORM = "meta_grad/grad_2.0_norm_total"


def meta_gradient_summary(log_dir: str) -> dict:
    """Largest and median logged meta-gradient norm, and the meta-steps skipped as non-finite."""
    with open(Path(log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    norms = [float(r[GRAD_NORM]) for r in rows if r.get(GRAD_NORM)]
    finite = [n for n in norms if math.isfinite(n)]
    skipped = [float(r["train/skipped_steps"]) for r in rows if r.get("train/skipped_steps")]
    return {"max_meta_grad_norm": max(finite) if finite else None,
            "median_meta_grad_norm": statistics.median(finite) if finite else None,
            "nonfinite_logged_norms": len(norms) - len(finite),
            "skipped_steps": int(max(skipped)) if skipped else 0}


def main() -> None:
    parser = arms_parser(__doc__.splitlines()[0], ARMS, 4.0, "omniglot_5way_1shot_cpu.yaml",
                         "benchmark_algorithms")
    parser.add_argument("--inner_steps", type=int, default=2)

    def run_one(args, arm: str, overrides: list[str]) -> dict:
        result = fit_then_test(args.config, args.minutes, args.data_root, args.episodes,
                               f"{args.output_dir}/{arm}",
                               [*arm_overrides(arm, args.inner_steps), *overrides])
        return {**result, **meta_gradient_summary(result["log_dir"])}

    args, results = run_arms(__file__, parser, ARMS, run_one)
    if results is None:
        return
    print()
    how = "all arms at once, 1 thread each" if args.parallel else "one arm after another"
    print(f"Omniglot 5-way 1-shot, {args.minutes:g} minutes of meta-training per arm on this CPU "
          f"({how}), {args.inner_steps} inner steps in training, 3 at test (Reptile 5 and 10, "
          f"ProtoNets none), "
          f"{args.episodes} test episodes (mean +- 95% CI)")
    print(f"{'arm':<11}{'meta-iters':>11}{'test accuracy':>19}{'max |g|':>10}"
          f"{'median |g|':>11}{'skipped':>8}")
    for arm, r in results.items():
        def norm(value):
            return f"{value:.3g}" if value is not None else "n/a"
        print(f"{arm:<11}{r['meta_iterations']:>11d}{100 * r['test_acc']:>12.2f}% +- "
              f"{100 * r['ci95']:.2f}{norm(r['max_meta_grad_norm']):>10}"
              f"{norm(r['median_meta_grad_norm']):>11}{r['skipped_steps']:>8d}")
    keys = ("test_acc", "ci95", "episodes", "meta_iterations", "train_seconds",
            "max_meta_grad_norm", "median_meta_grad_norm", "nonfinite_logged_norms", "skipped_steps")
    print(json.dumps({"benchmark": "algorithms", "minutes_per_arm": args.minutes,
                      "inner_steps": args.inner_steps, "parallel": args.parallel,
                      "arms": {arm: {k: r[k] for k in keys} for arm, r in results.items()}}))


if __name__ == "__main__":
    main()
