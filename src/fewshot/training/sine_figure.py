"""The picture of MAML's sine-wave experiment (Finn et al., 2017, figure 2).

For a few fixed test tasks: the true sine wave, its K support points, and a model's predictions
before adapting and after a number of inner steps, one column per model (MAML and the
pretrained baseline, side by side). ``fewshot report`` draws it for a sinusoid run
(:func:`draw_run`); ``benchmarks/sinusoid.py`` for the README.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from torch import Tensor  # noqa: E402

from fewshot.data.episodes import TEST_STREAM  # noqa: E402
from fewshot.data.registry import REGRESSION_DATASETS  # noqa: E402
from fewshot.data.sinusoid import SineWave, SinusoidEpisodes  # noqa: E402

if TYPE_CHECKING:
    from fewshot.training.module import MetaLearner

# Inputs the curves are drawn at: the task distribution's range.
GRID = torch.linspace(-5.0, 5.0, 200)[:, None]


def predictions(model: MetaLearner, support_x: Tensor, support_y: Tensor,
                steps: Sequence[int], x: Tensor = GRID) -> dict[int, Tensor]:
    """``model``'s outputs at ``x [n, 1]`` after adapting to the support points with each number
    of inner steps in ``steps`` (0: the meta-learned initialisation), as ``{steps: [n]}``."""
    curves = {}
    for count in steps:
        adapted = model.adapt(support_x, support_y, steps=count)
        curves[count] = model.predict_logits(adapted, x).detach().flatten()
    return curves


def draw_sine_figure(path: Path, tasks: Sequence[tuple[SineWave, Tensor, Tensor]],
                     models: dict[str, dict[int, dict[int, Tensor]]], x: Tensor = GRID) -> Path:
    """Write the figure to ``path`` (PNG): one row per task, one column per model.

    Args:
        tasks: ``(wave, support_x, support_y)`` of each task drawn.
        models: per model name, per task (row) index, the curves of :func:`predictions`.
        x: the inputs the curves were computed at.
    """
    rows, columns = len(tasks), len(models)
    fig, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 3.2 * rows), squeeze=False,
                             sharey="row")
    colours = plt.get_cmap("viridis")
    for row, (wave, support_x, support_y) in enumerate(tasks):
        for column, (name, curves) in enumerate(models.items()):
            ax = axes[row][column]
            ax.plot(x.flatten(), wave(x).flatten(), color="red", linewidth=2, label="ground truth")
            ordered = sorted(curves[row])
            for i, steps in enumerate(ordered):
                style = {"linestyle": ":"} if steps == 0 else {"linestyle": "--"}
                ax.plot(x.flatten(), curves[row][steps], color=colours(i / max(len(ordered), 2)),
                        label="pre-update" if steps == 0 else f"{steps} grad step{'s' * (steps > 1)}",
                        **style)
            ax.scatter(support_x.flatten(), support_y.flatten(), marker="^", color="purple",
                       zorder=3, label=f"{len(support_x)} points used for gradient")
            ax.set_xlim(-5, 5)
            ax.set_title(f"{name}, K={len(support_x)}" if row == 0 else "")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def figure_tasks(seed: int, shots: int, count: int = 2) -> list[tuple[SineWave, Tensor, Tensor]]:
    """The first ``count`` test tasks of a sinusoid run with data ``seed`` and ``shots``."""
    episodes = SinusoidEpisodes(shots, 1, count, 1, seed, TEST_STREAM, "test")
    tasks = []
    for index in range(count):
        wave, (support_x, support_y, _, _) = episodes.wave_and_task(index)
        tasks.append((wave, support_x, support_y))
    return tasks


def draw_run(run: Path, out: Path) -> bool:
    """Draw the picture for the sinusoid run in folder ``run`` (its best checkpoint, else its
    last) to ``out``; False, drawing nothing, for any other run or one without checkpoints."""
    config_file = run / "config.yaml"
    config = yaml.safe_load(config_file.read_text()) if config_file.exists() else {}
    data = (config or {}).get("data") or {}
    checkpoints = sorted((run / "checkpoints").glob("best*.ckpt")) or sorted(
        (run / "checkpoints").glob("last*.ckpt"))
    if data.get("dataset") not in REGRESSION_DATASETS or not checkpoints:
        return False
    # Lightning only here, where a checkpoint is read: `fewshot report` stays light otherwise.
    from fewshot.training.module import MetaLearner

    model = MetaLearner.load_from_checkpoint(checkpoints[-1], map_location="cpu")
    tasks = figure_tasks(int(data.get("seed", 0)), int(data["shots"]))
    steps = sorted({0, 1, model.algorithm.evaluation_steps})
    curves = {row: predictions(model, sx, sy, steps) for row, (_, sx, sy) in enumerate(tasks)}
    # MAML without an inner loop in training is the paper's pretrained baseline.
    name = ("pretrained" if getattr(model.algorithm, "inner_steps", None) == 0
            else type(model.algorithm).__name__)
    draw_sine_figure(out, tasks, {name: curves})
    return True
