"""``fewshot report RUN_A RUN_B ...``: several runs side by side, from their run folders.

Writes into ``--output`` (default ``comparison/``):

- ``comparison.md`` and ``comparison.csv``: one row per run: test accuracy with its 95%
  interval, the best validation accuracy and where it was reached, meta-iterations, wall
  time, and how the meta-gradient behaved (largest and median logged norm, skipped steps);
- ``validation_vs_iterations.png`` and ``validation_vs_time.png``: validation accuracy of
  every run against meta-iterations and against minutes of training;
- ``test_per_step.png``: test accuracy after each inner step, with 95% intervals.

The table is printed as well. Runs are labelled by the parts of their paths that differ.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402

from fewshot.training.runs import Run  # noqa: E402

GRADIENT_NORM = "meta_grad/grad_2.0_norm_total"
NOTES = ("Wall time: of meta-training from the start of fit, validation included (the last "
         "`train/elapsed_s` or `val/elapsed_s` logged, else `test_results.json`; -: a run made "
         "before fewshot recorded it). |g|: the logged total meta-gradient 2-norm (-: none logged). "
         "Non-finite steps: meta-steps skipped by `--nonfinite.policy skip`.")


def _percent(value: float | None) -> str:
    return "" if value is None or not math.isfinite(value) else f"{100 * value:.2f}"


def run_row(run: Run) -> dict[str, Any]:
    """The comparison table's figures of one run (None where the run has no such data)."""
    test = run.test or {}
    validation = run.series.get("val/acc", [])
    best_step, best = max(validation, key=lambda sv: sv[1]) if validation else (None, None)
    norms = [v for _, v in run.series.get(GRADIENT_NORM, [])]
    skipped = run.series.get("train/skipped_steps", [])
    wall = run.wall_time_s
    return {
        "run": run.label,
        "algorithm": (test.get("algorithm") or {}).get("algorithm"),
        "seed": run.seed,
        "test_accuracy": test.get("accuracy"),
        "test_ci95": test.get("ci95"),
        "test_episodes": test.get("episodes"),
        "best_val_accuracy": best,
        "best_val_iteration": best_step,
        "meta_iterations": run.meta_iterations,
        "wall_minutes": None if wall is None else wall / 60,
        "max_grad_norm": max(norms, key=lambda v: v if math.isfinite(v) else math.inf)
        if norms else None,
        "median_grad_norm": statistics.median(norms) if norms else None,
        "nonfinite_steps": int(max(v for _, v in skipped)) if skipped else 0,
    }


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a Markdown table (the README's tables are made by this)."""
    lines = ["| run | meta-iterations | wall time | test accuracy (95% CI) | best validation "
             "(at iteration) | max \\|g\\| | median \\|g\\| | non-finite steps |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        test = (f"{_percent(r['test_accuracy'])} +- {_percent(r['test_ci95'])}% "
                f"({r['test_episodes']} episodes)" if r["test_accuracy"] is not None else "not tested")
        validation = (f"{_percent(r['best_val_accuracy'])}% ({r['best_val_iteration']})"
                      if r["best_val_accuracy"] is not None else "")
        minutes = "-" if r["wall_minutes"] is None else f"{r['wall_minutes']:.1f} min"
        norm = "-" if r["max_grad_norm"] is None else f"{r['max_grad_norm']:.3g}"
        median = "-" if r["median_grad_norm"] is None else f"{r['median_grad_norm']:.3g}"
        lines.append(f"| {r['run']} | {r['meta_iterations']:,} | {minutes} | {test} | "
                     f"{validation} | {norm} | {median} | {r['nonfinite_steps']} |")
    return "\n".join(lines)


def _figure_validation(runs: Sequence[Run], out: Path, against_time: bool) -> bool:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    drawn = False
    for run in runs:
        points = (run.at_time("val/acc") if against_time
                  else run.series.get("val/acc", []))
        if points:
            xs = [x / 60 if against_time else x for x, _ in points]
            ax.plot(xs, [100 * y for _, y in points], marker="o", markersize=3, label=run.label)
            drawn = True
    ax.set(title="validation accuracy", ylabel="accuracy (%)",
           xlabel="minutes of training" if against_time else "meta-iteration")
    return _save(fig, ax, out, drawn)


def _figure_test_per_step(runs: Sequence[Run], out: Path) -> bool:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = False
    for run in runs:
        rows = (run.test or {}).get("per_step")
        if rows:
            ax.errorbar([r["inner_step"] for r in rows], [100 * r["accuracy"] for r in rows],
                        yerr=[100 * (r["ci95"] if math.isfinite(r["ci95"]) else 0) for r in rows],
                        marker="o", capsize=3, label=run.label)
            drawn = True
    ax.set(title="test accuracy after each inner step (95% CI)", xlabel="inner steps",
           ylabel="accuracy (%)")
    return _save(fig, ax, out, drawn)


def _save(fig, ax, out: Path, drawn: bool) -> bool:
    if drawn:
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out, dpi=110)
    plt.close(fig)
    return drawn


def write_comparison(runs: Sequence[Run], output: Path) -> list[Path]:
    """Write the comparison of ``runs`` into ``output``; returns the files written."""
    output.mkdir(parents=True, exist_ok=True)
    rows = [run_row(run) for run in runs]
    table = markdown_table(rows)
    written = []
    for name, draw in (("validation_vs_iterations.png", lambda p: _figure_validation(runs, p, False)),
                       ("validation_vs_time.png", lambda p: _figure_validation(runs, p, True)),
                       ("test_per_step.png", lambda p: _figure_test_per_step(runs, p))):
        if draw(output / name):
            written.append(output / name)
    with (output / "comparison.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    sources = "\n".join(f"- {run.label}: `{run.folder}`" for run in runs)
    figures = "\n".join(f"![{p.name}]({p.name})" for p in written)
    (output / "comparison.md").write_text(
        f"# Comparison of {len(runs)} runs\n\n{table}\n\n{NOTES}\n\n## Runs\n\n{sources}\n\n"
        f"## Figures\n\n{figures}\n")
    print(table)
    return [*written, output / "comparison.csv", output / "comparison.md"]
