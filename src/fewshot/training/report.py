"""``fewshot report RUN_DIR``: pictures of a run from its logs, no server needed.

With several run folders (``fewshot report RUN_A RUN_B ...``) it compares them instead
(:mod:`fewshot.training.compare`).

Reads what a run folder holds (``metrics.csv``, ``histograms.jsonl``, ``test_results.json``,
``config.yaml``) and writes PNG figures plus ``report.md`` into ``RUN_DIR/report/``:

- ``loss_accuracy.png``: meta-train vs validation loss and accuracy (overfitting at a glance);
- ``grad_norm.png``: meta-gradient norm over time, and the inner-loop gradient norm per step;
- ``grad_histograms.png``: a heatmap of log10 |meta-gradient| over time (collapse to zero
  shows as mass sliding to the left edge);
- ``test_per_step.png``: test accuracy after each inner step, with 95% intervals;
- ``inner_lrs.png``: MAML++'s learned inner learning rates per layer and step, over time.

Figures whose data the run does not have are skipped and listed as such in the summary.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402

from fewshot.training.compare import write_comparison  # noqa: E402
from fewshot.training.runs import find_run, read_metrics, read_runs  # noqa: E402
from fewshot.training.sine_figure import draw_run  # noqa: E402


def _plot(ax, series, name, label=None, **style) -> bool:
    if name not in series:
        return False
    steps, values = zip(*series[name], strict=True)
    ax.plot(steps, values, label=label or name, **style)
    return True


def figure_loss_accuracy(series, out: Path) -> bool:
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
    drawn = _plot(loss_ax, series, "train/loss", "meta-train", alpha=0.8)
    drawn |= _plot(loss_ax, series, "val/loss", "validation", marker="o")
    drawn |= _plot(acc_ax, series, "train/acc", "meta-train", alpha=0.8)
    drawn |= _plot(acc_ax, series, "val/acc", "validation", marker="o")
    for ax, title in ((loss_ax, "query loss"), (acc_ax, "query accuracy")):
        ax.set(title=title, xlabel="meta-iteration")
        ax.legend()
    return _save(fig, out, drawn)


def figure_grad_norm(series, out: Path) -> bool:
    total = [k for k in series if k.startswith("meta_grad/") and k.endswith("_norm_total")]
    inner = sorted(k for k in series if k.startswith("train/inner_grad_norm/"))
    fig, (meta_ax, inner_ax) = plt.subplots(1, 2, figsize=(11, 4))
    drawn = any([_plot(meta_ax, series, k, "total") for k in total])
    for k in inner:
        drawn |= _plot(inner_ax, series, k, k.rsplit("/", 1)[-1].replace("_", " "))
    meta_ax.set(title="meta-gradient norm", xlabel="meta-iteration", yscale="log")
    inner_ax.set(title="inner-loop gradient norm", xlabel="meta-iteration", yscale="log")
    for ax in (meta_ax, inner_ax):
        if ax.lines:
            ax.legend()
    return _save(fig, out, drawn)


def figure_grad_histograms(path: Path, out: Path) -> bool:
    if not path.exists():
        return False
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not records:
        return False
    records = sorted({r["step"]: r for r in records}.values(), key=lambda r: r["step"])
    counts = [[c / max(sum(r["meta_grad"]), 1) for c in r["meta_grad"]] for r in records]
    bins = records[0]["bins_log10"]
    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    image = ax.pcolormesh(column_edges(steps), bins, list(map(list, zip(*counts, strict=True))), cmap="magma")
    fig.colorbar(image, ax=ax, label="fraction of meta-gradient entries")
    ax.set(title=f"meta-gradient magnitudes over time ({len(steps)} snapshots)",
           xlabel="meta-iteration", ylabel="log10 |gradient|")
    return _save(fig, out, True)


def column_edges(steps: list[int]) -> list[float]:
    """Edges of one heatmap column per snapshot at its real meta-iteration: snapshots are
    unevenly spaced (every step at first, sparser later), so each column spans from half-way
    to the previous snapshot to half-way to the next."""
    middles = [(a + b) / 2 for a, b in zip(steps, steps[1:], strict=False)]
    return [steps[0] - 0.5, *middles, steps[-1] + 0.5]


def figure_test_per_step(result: dict | None, out: Path) -> bool:
    if not result:
        return False
    rows = result["per_step"]
    metric = result.get("metric", "accuracy")  # regression (sine waves): mse
    scale = 100 if metric == "accuracy" else 1
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.errorbar([r["inner_step"] for r in rows], [scale * r[metric] for r in rows],
                yerr=[scale * (r["ci95"] if math.isfinite(r["ci95"]) else 0) for r in rows],
                marker="o", capsize=4)
    ax.set(title=f"test {metric} over {result['episodes']} episodes (95% CI)",
           xlabel="inner steps", ylabel="accuracy (%)" if scale == 100 else "mean squared error")
    return _save(fig, out, True)


def figure_inner_lrs(series, out: Path) -> bool:
    names = sorted(k for k in series if k.startswith("inner_lr/"))
    if not names:
        return False
    fig, ax = plt.subplots(figsize=(9, 5))
    for name in names:
        _plot(ax, series, name, name.removeprefix("inner_lr/"), linewidth=1)
    ax.set(title="learned inner learning rates (per layer and step)", xlabel="meta-iteration")
    ax.legend(fontsize=5, ncol=2)
    return _save(fig, out, True)


def _save(fig, out: Path, drawn: bool) -> bool:
    if drawn:
        fig.tight_layout()
        fig.savefig(out, dpi=110)
    plt.close(fig)
    return drawn


def write_report(run: Path) -> list[Path]:
    """Write the figures and ``report.md`` for the run in ``run``; returns the files written."""
    run = find_run(run)
    out = run / "report"
    out.mkdir(exist_ok=True)
    series = read_metrics(run / "metrics.csv")
    test_path = run / "test_results.json"
    result = json.loads(test_path.read_text()) if test_path.exists() else None
    figures = {
        "loss_accuracy.png": figure_loss_accuracy(series, out / "loss_accuracy.png"),
        "grad_norm.png": figure_grad_norm(series, out / "grad_norm.png"),
        "grad_histograms.png": figure_grad_histograms(run / "histograms.jsonl",
                                                       out / "grad_histograms.png"),
        "test_per_step.png": figure_test_per_step(result, out / "test_per_step.png"),
        "inner_lrs.png": figure_inner_lrs(series, out / "inner_lrs.png"),
        "sinusoid.png": draw_run(run, out / "sinusoid.png"),  # sine-wave runs only
    }
    lines = [f"# Run report: {run}", ""]
    if result and result.get("metric") == "mse":
        lines += [f"**Test MSE**: {result['mse']:.4f} +- {result['ci95']:.4f} (95% CI, "
                  f"{result['episodes']} tasks, {result['inner_steps']} inner steps)", ""]
    elif result:
        lines += [f"**Test accuracy**: {100 * result['accuracy']:.2f}% +- {100 * result['ci95']:.2f}% "
                  f"(95% CI, {result['episodes']} episodes, {result['inner_steps']} inner steps)", ""]
    if "val/acc" in series:
        step, best = max(series["val/acc"], key=lambda sv: sv[1])
        lines += [f"**Best validation accuracy**: {100 * best:.2f}% at meta-iteration {step}", ""]
    lines += ["## Figures", ""]
    for name, drawn in figures.items():
        lines.append(f"![{name}]({name})" if drawn else f"- {name}: not drawn (no data in this run)")
    config = run / "config.yaml"
    if config.exists():
        lines += ["", "## Configuration", "", "```yaml", config.read_text().rstrip(), "```"]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return [out / n for n, drawn in figures.items() if drawn] + [out / "report.md"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fewshot report", description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", metavar="RUN",
                        help="a run folder (runs/lightning_logs/version_N) or its parent; with "
                             "several, or --compare, the runs are compared")
    parser.add_argument("--compare", action="store_true",
                        help="compare every run found below the folder(s) given")
    parser.add_argument("--output", type=Path, default=Path("comparison"),
                        help="where a comparison is written (default: ./comparison)")
    args = parser.parse_args(argv)
    for run in args.runs:
        if not run.exists():
            raise FileNotFoundError(f"run folder {run} does not exist")
    if len(args.runs) == 1 and not args.compare:
        written = write_report(args.runs[0])
    else:
        written = write_comparison(read_runs(args.runs), args.output)
    for path in written:
        print(path)
