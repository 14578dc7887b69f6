"""MAML's sine-wave regression (Finn et al., 2017, section 5.1) against the paper's baseline.

    flock /tmp/fewshot-bench.lock python benchmarks/sinusoid.py [--steps 2000] [--shots 5,10]

For each K, two runs of the shipped config ``configs/maml_sinusoid_<K>shot.yaml`` through the
fewshot CLI, each for ``--steps`` meta-iterations with 25 tasks per meta-batch:

- **MAML**: the config as it is (one second-order inner step of 0.01, Adam 1e-3);
- **pretrained**, the paper's baseline: the same network regressing all tasks jointly (MAML
  with no inner step in training: the meta-gradient is the gradient of the joint mean squared
  error), then fine-tuned on the K support points with plain SGD. The paper tunes its step
  size; here it is chosen from ``--baseline_lrs`` by the validation MSE after 10 steps.

Both are tested on the same 600 fixed test tasks (the config's data seed), MSE after 0 to 10
inner steps with 95% intervals. The paper's finding is checked: MAML after one step is better
(lower MSE, intervals not overlapping) than the baseline after ten. The paper meta-trains for
70,000 iterations; the finding holds long before. Writes the paper's picture (true sine, the K
points, predictions before and after 1 and 10 steps, both methods) to
``docs/images/sinusoid.png`` (K = 10) and ``docs/images/sinusoid_5shot.png``. The per-task loop
executor is used (the fastest for this 1-40-40-1 network on a CPU: ``fewshot.execution.Loop``).
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from common import REPO

from fewshot.training.cli import build_cli
from fewshot.training.sine_figure import draw_sine_figure, figure_tasks, predictions


def run(shots: int, steps: int, baseline: bool, baseline_lrs: list[float], output_dir: Path,
        episodes: int) -> dict:
    """Meta-train one arm, pick the best checkpoint by validation MSE, test it."""
    arm = "pretrained" if baseline else "MAML"
    overrides = ["--model.algorithm.init_args.inner_steps=0"] if baseline else []
    cli = build_cli([
        "--config", str(REPO / "configs" / f"maml_sinusoid_{shots}shot.yaml"), *overrides,
        f"--trainer.max_steps={steps}", f"--trainer.val_check_interval={max(steps // 5, 1)}",
        f"--data.test_episodes={episodes}", "--model.executor=fewshot.execution.Loop",
        f"--trainer.default_root_dir={output_dir / f'{arm}_{shots}shot'}",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--test_after_fit=false"], run=False)
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    seconds = time.perf_counter() - start
    best = trainer.checkpoint_callback.best_model_path
    model = type(model).load_from_checkpoint(best)
    chosen_lr, scores = model.algorithm.evaluation_lr, {}
    if baseline:  # the paper's tuned fine-tuning step size: the best on the validation tasks
        for lr in baseline_lrs:
            model.algorithm.eval_inner_lr = lr
            mse = trainer.validate(model, datamodule=data, verbose=False)[0]["val/mse"]
            scores[lr] = round(mse, 4) if math.isfinite(mse) else None  # None: it diverged
        chosen_lr = min(scores, key=lambda lr: math.inf if scores[lr] is None else scores[lr])
        model.algorithm.eval_inner_lr = chosen_lr
    trainer.test(model, datamodule=data, verbose=False)
    rows = model.test_result["per_step"]
    return {"method": arm, "shots": shots, "meta_iterations": trainer.global_step,
            "train_seconds": round(seconds, 1), "fine_tune_lr": chosen_lr,
            "validation_mse_by_fine_tune_lr": scores,
            "episodes": model.test_result["episodes"], "checkpoint": Path(best).name,
            "data_seed": data.hparams.seed,
            "per_step": [{"inner_step": r["inner_step"], "mse": round(r["mse"], 4),
                          "ci95": round(r["ci95"], 4)} for r in rows],
            "model": model}


def at(result: dict, step: int) -> tuple[float, float]:
    row = result["per_step"][step]
    return row["mse"], row["ci95"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000, help="meta-iterations of each run")
    parser.add_argument("--shots", default="5,10", help="values of K, comma-separated")
    parser.add_argument("--episodes", type=int, default=600, help="fixed test tasks")
    parser.add_argument("--baseline_lrs", default="0.002,0.005,0.01,0.02,0.03,0.05",
                        help="fine-tuning step sizes the baseline chooses from (validation)")
    parser.add_argument("--output_dir", default=str(REPO / "runs" / "benchmark_sinusoid"))
    parser.add_argument("--figure", default=str(REPO / "docs" / "images" / "sinusoid.png"))
    args = parser.parse_args()
    lrs = [float(v) for v in args.baseline_lrs.split(",")]
    results = []
    for shots in (int(k) for k in args.shots.split(",")):
        pair = [run(shots, args.steps, baseline, lrs, Path(args.output_dir), args.episodes)
                for baseline in (False, True)]
        results += pair
        figure = Path(args.figure)
        if shots != 10:
            figure = figure.with_name(f"{figure.stem}_{shots}shot{figure.suffix}")
        tasks = figure_tasks(seed=pair[0]["data_seed"], shots=shots)
        draw_sine_figure(figure, tasks, {
            f"{r['method']}": {row: predictions(r["model"], sx, sy, [0, 1, 10])
                               for row, (_, sx, sy) in enumerate(tasks)} for r in pair})
        print(f"wrote {figure}")

    print(f"\nSine-wave regression, MSE on {args.episodes} fixed test tasks (mean +- 95% CI), "
          f"{args.steps} meta-iterations of 25 tasks each")
    print(f"{'K':>3}  {'method':<11} {'0 steps':>16} {'1 step':>16} {'10 steps':>16}  "
          f"{'fine-tune lr':>12} {'train s':>8}")
    for r in results:
        cells = [f"{m:.3f} +- {c:.3f}" for m, c in (at(r, 0), at(r, 1), at(r, 10))]
        print(f"{r['shots']:>3}  {r['method']:<11} {cells[0]:>16} {cells[1]:>16} {cells[2]:>16}  "
              f"{r['fine_tune_lr']:>12} {r['train_seconds']:>8}")
    findings = {}
    for shots in sorted({r["shots"] for r in results}):
        maml, pretrained = (next(r for r in results if r["shots"] == shots and r["method"] == m)
                            for m in ("MAML", "pretrained"))
        (m1, c1), (p10, c10) = at(maml, 1), at(pretrained, 10)
        findings[f"{shots}shot"] = holds = m1 + c1 < p10 - c10
        print(f"K={shots}: MAML after 1 step {m1:.3f} +- {c1:.3f} vs pretrained after 10 steps "
              f"{p10:.3f} +- {c10:.3f}: the paper's finding {'holds' if holds else 'DOES NOT hold'}")
    for r in results:
        del r["model"]
    print(json.dumps({"steps": args.steps, "episodes": args.episodes, "results": results,
                      "maml_1_step_beats_pretrained_10_steps": findings}))


if __name__ == "__main__":
    main()
