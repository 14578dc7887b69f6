"""Latency of adapting to a new task and predicting its queries, with the model already loaded.

    python benchmarks/adapt_latency.py [--checkpoint RUN_OR_EXPORT] [--steps 3 10] [--repeats 20]

5-way 5-shot, 100 query images, Omniglot-sized (28x28 grayscale), conv4 with 64 filters. One
measurement is ``learner.adapt(support, labels)`` followed by ``predictor.predict(queries)``:
from tensors already prepared, and from PNG files on disk (decoding and preprocessing
included), with the queries in one batch and one at a time. Without ``--checkpoint`` the
weights are random, which changes nothing about the time. The table shows medians over the
repeats (after a warm-up); the last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import fewshot
from fewshot.algorithms import MAML
from fewshot.inference.export import ModelFiles, make_metadata
from fewshot.inference.images import Preprocessing
from fewshot.inference.learner import Learner
from fewshot.models import Conv4
from fewshot.training.module import MetaLearner

WAYS, SHOTS, QUERIES = 5, 5, 100


def random_learner() -> Learner:
    """A 5-way conv4-64 Omniglot model with random weights, as :func:`fewshot.load` builds it."""
    torch.manual_seed(0)
    model = MetaLearner(Conv4(1, 64, 28), ways=WAYS,
                        algorithm=MAML(inner_steps=1, inner_lr=0.4, eval_inner_steps=3))
    hparams = model.hparams  # every part by its settings, as a checkpoint records them
    metadata = make_metadata(hparams["backbone"], hparams["ways"], hparams["algorithm"],
                             hparams["inner_optimizer"], Preprocessing.for_dataset("omniglot", 28, 1),
                             {"checkpoint": "random"})
    return Learner(ModelFiles(metadata, model.state_dict(), Path("random weights")))


def write_pngs(directory: Path, count: int, rng: np.random.Generator) -> list[Path]:
    """Omniglot-like files: 105x105, sparse dark strokes on white."""
    paths = []
    for index in range(count):
        pixels = np.where(rng.random((105, 105)) > 0.15, 255, 0).astype(np.uint8)
        paths.append(directory / f"{index:03d}.png")
        Image.fromarray(pixels).convert("1").save(paths[-1])
    return paths


def time_task(learner: Learner, support, labels, queries, steps: int, one_at_a_time: bool,
              repeats: int) -> list[float]:
    seconds = []
    for repeat in range(repeats + 2):  # two warm-up runs
        start = time.perf_counter()
        predictor = learner.adapt(support, labels, steps=steps)
        predictions = predictor.predict(queries, one_at_a_time=one_at_a_time)
        elapsed = time.perf_counter() - start
        assert predictions.probabilities.shape == (QUERIES, WAYS)
        if repeat >= 2:
            seconds.append(elapsed)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="a run, .ckpt or export (default: random conv4-64)")
    parser.add_argument("--steps", type=int, nargs="+", default=[3, 10])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    learner = fewshot.load(args.checkpoint) if args.checkpoint else random_learner()
    side, channels = learner.preprocessing.image_size, learner.preprocessing.channels
    generator = torch.Generator().manual_seed(0)
    labels = [f"class {i}" for i in range(WAYS) for _ in range(SHOTS)]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        files = write_pngs(Path(folder), WAYS * SHOTS + QUERIES, np.random.default_rng(0))
        inputs = {
            "tensors": (torch.rand(WAYS * SHOTS, channels, side, side, generator=generator),
                        torch.rand(QUERIES, channels, side, side, generator=generator)),
            "png files": (files[:WAYS * SHOTS], files[WAYS * SHOTS:]),
        }
        for input_name, (support, queries) in inputs.items():
            for steps in args.steps:
                for one_at_a_time in (False, True):
                    seconds = time_task(learner, support, labels, queries, steps, one_at_a_time, args.repeats)
                    rows.append({
                        "input": input_name, "steps": steps,
                        "queries": "one at a time" if one_at_a_time else "one batch",
                        "median_ms": 1000 * statistics.median(seconds),
                        "min_ms": 1000 * min(seconds), "max_ms": 1000 * max(seconds),
                    })

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"Adapt + predict, {WAYS}-way {SHOTS}-shot, {QUERIES} queries, conv4-64 28x28, CPU "
          f"({torch.get_num_threads()} threads, {os.cpu_count()} cores, load average {load:.1f}), "
          f"median of {args.repeats}")
    print(f"{'input':>10} {'steps':>5} {'queries':>14} {'median ms':>10} {'min ms':>8} {'max ms':>8}")
    for r in rows:
        print(f"{r['input']:>10} {r['steps']:>5} {r['queries']:>14} {r['median_ms']:>10.1f} "
              f"{r['min_ms']:>8.1f} {r['max_ms']:>8.1f}")
    print(json.dumps({"benchmark": "adapt_latency", "device": "cpu", "threads": torch.get_num_threads(),
                      "cores": os.cpu_count(), "load_average": load, "ways": WAYS, "shots": SHOTS,
                      "queries": QUERIES, "model": "conv4-64 28x28", "repeats": args.repeats,
                      "checkpoint": args.checkpoint, "rows": rows}))


if __name__ == "__main__":
    main()
