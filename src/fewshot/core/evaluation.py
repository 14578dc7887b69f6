"""Accuracy over many test episodes, reported the way few-shot papers do."""

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


def summarise_per_step(accuracies: Tensor) -> list[dict[str, float]]:
    """``accuracies: [episodes, steps + 1]`` -> one ``{step, accuracy, ci95}`` row per step."""
    rows = []
    for step in range(accuracies.shape[1]):
        mean, ci95 = mean_and_ci95(accuracies[:, step])
        rows.append({"inner_step": step, "accuracy": mean, "ci95": ci95})
    return rows


def summarise_test(accuracies: Tensor, ways: int, shots: int | None, inner_steps: int,
                inner_lr: float | str) -> dict:
    """The record ``fewshot test`` prints and writes to ``test_results.json``."""
    rows = summarise_per_step(accuracies)
    return {
        "episodes": accuracies.shape[0], "ways": ways, "shots": shots,
        "inner_steps": inner_steps, "inner_lr": inner_lr,
        "accuracy": rows[-1]["accuracy"], "ci95": rows[-1]["ci95"], "per_step": rows,
    }


def format_test_result(result: dict) -> str:
    """``Test accuracy over 600 episodes (5-way 1-shot, mean +- 95% CI):`` and a row per step."""
    lines = [f"  after {r['inner_step']} step(s): {100 * r['accuracy']:.2f} +- {100 * r['ci95']:.2f}%"
             for r in result["per_step"]]
    return (f"Test accuracy over {result['episodes']} episodes ({result['ways']}-way "
            f"{result['shots'] or '?'}-shot, mean +- 95% CI):\n" + "\n".join(lines))
