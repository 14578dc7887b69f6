"""Accuracy (classification) or mean squared error (regression) over many test episodes,
reported the way few-shot papers do: the mean with its 95% interval, after every inner step."""

from __future__ import annotations

import math

from torch import Tensor


def mean_and_ci95(values: Tensor) -> tuple[float, float]:
    """Mean and half-width of its 95% confidence interval, ``1.96 * std / sqrt(n)``.

    ``std`` is the sample standard deviation (n - 1 in the denominator); with one value the
    interval is undefined and reported as ``nan``.

    Example:
        >>> import torch
        >>> mean_and_ci95(torch.tensor([0.8, 1.0, 0.9, 0.7]))[0]
        0.85
    """
    values = values.double().flatten()
    n = values.numel()
    if n == 0:
        raise ValueError("no episodes to summarise")
    mean = values.mean().item()
    if n == 1:
        return mean, math.nan
    return mean, 1.96 * values.std(correction=1).item() / math.sqrt(n)


def summarise_per_step(values: Tensor, metric: str = "accuracy") -> list[dict[str, float]]:
    """``values: [episodes, steps + 1]`` -> one ``{inner_step, <metric>, ci95}`` row per step
    (``metric``: ``accuracy`` or ``mse``)."""
    rows = []
    for step in range(values.shape[1]):
        mean, ci95 = mean_and_ci95(values[:, step])
        rows.append({"inner_step": step, metric: mean, "ci95": ci95})
    return rows


def summarise_test(values: Tensor, ways: int, shots: int | None, inner_steps: int,
                   inner_lr: float | str, metric: str = "accuracy") -> dict:
    """The record ``fewshot test`` prints and writes to ``test_results.json``: ``values
    [episodes, steps + 1]`` are accuracies, or with ``metric="mse"`` mean squared errors
    (regression; the record then says ``"metric": "mse"``)."""
    rows = summarise_per_step(values, metric)
    return {
        "episodes": values.shape[0], "ways": ways, "shots": shots,
        "inner_steps": inner_steps, "inner_lr": inner_lr,
        **({} if metric == "accuracy" else {"metric": metric}),
        metric: rows[-1][metric], "ci95": rows[-1]["ci95"], "per_step": rows,
    }


def format_test_result(result: dict) -> str:
    """``Test accuracy over 600 episodes (5-way 1-shot, mean +- 95% CI):`` and a row per step
    (``Test MSE over 600 tasks (10-shot, ...)`` for regression)."""
    if result.get("metric") == "mse":
        lines = [f"  after {r['inner_step']} step(s): {r['mse']:.4f} +- {r['ci95']:.4f}"
                 for r in result["per_step"]]
        return (f"Test MSE over {result['episodes']} tasks ({result['shots'] or '?'}-shot, "
                "mean +- 95% CI):\n" + "\n".join(lines))
    lines = [f"  after {r['inner_step']} step(s): {100 * r['accuracy']:.2f} +- {100 * r['ci95']:.2f}%"
             for r in result["per_step"]]
    return (f"Test accuracy over {result['episodes']} episodes ({result['ways']}-way "
            f"{result['shots'] or '?'}-shot, mean +- 95% CI):\n" + "\n".join(lines))
