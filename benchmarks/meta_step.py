"""Tasks per second of one MAML meta-training iteration, vmap vs per-task loop, side by side.

    python benchmarks/meta_step.py [--tasks 32] [--queries 1] [--repeats 5]

Omniglot-sized inputs (28x28, 1 channel), conv4 with 64 filters, 5-way 1-shot, second order,
one inner step. Before timing, the two strategies' meta-gradients are checked to agree. The
repetitions are interleaved (loop, vmap, loop, vmap, ...) so machine noise hits both alike;
the table shows medians. Last line: one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from fewshot.episode import Episodes
from fewshot.maml import meta_batch_metrics, resolve_batching
from fewshot.models import Conv4, FewShotClassifier


def make_episodes(tasks: int, ways: int, shots: int, queries: int, size: int) -> Episodes:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(ways)
    return Episodes(
        torch.rand(tasks, ways * shots, 1, size, size, generator=g),
        labels.repeat_interleave(shots).repeat(tasks, 1),
        torch.rand(tasks, ways * queries, 1, size, size, generator=g),
        labels.repeat_interleave(queries).repeat(tasks, 1),
    )


def meta_step(model, episodes, batching, steps, first_order) -> list[torch.Tensor]:
    params = dict(model.named_parameters())
    losses, _, _ = meta_batch_metrics(model, params, episodes, steps=steps, lr=0.4,
                                   first_order=first_order, batching=batching)
    return torch.autograd.grad(losses[:, -1].mean(), list(params.values()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=32)
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--queries", type=int, nargs="+", default=[1, 5, 15])
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--first_order", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = FewShotClassifier(Conv4(1, 64, 28), args.ways)
    rows = []
    for queries in args.queries:
        episodes = make_episodes(args.tasks, args.ways, args.shots, queries, 28)
        reference = meta_step(model, episodes, "loop", args.steps, args.first_order)
        vmapped = meta_step(model, episodes, "vmap", args.steps, args.first_order)
        # One relative error over the whole meta-gradient: per tensor it would be dominated by
        # the conv biases, whose true gradient is zero (batch norm removes them).
        flat_v, flat_r = (torch.cat([g.flatten() for g in gs]) for gs in (vmapped, reference))
        error = ((flat_v - flat_r).norm() / flat_r.norm()).item()
        assert error < 1e-4, f"vmap and loop meta-gradients disagree (relative error {error:.2e})"
        seconds: dict[str, list[float]] = {"loop": [], "vmap": []}
        for _ in range(args.repeats):
            for batching in seconds:
                start = time.perf_counter()
                meta_step(model, episodes, batching, args.steps, args.first_order)
                seconds[batching].append(time.perf_counter() - start)
        medians = {b: statistics.median(s) for b, s in seconds.items()}
        images = args.ways * (args.shots + queries)
        rows.append({
            "queries_per_class": queries,
            "images_per_task": images,
            "loop_tasks_per_s": args.tasks / medians["loop"],
            "vmap_tasks_per_s": args.tasks / medians["vmap"],
            "vmap_over_loop": medians["loop"] / medians["vmap"],
            "auto_picks": resolve_batching("auto", torch.device("cpu"), images),
            "relative_gradient_difference": error,
        })

    order = "first" if args.first_order else "second"
    print(f"MAML meta-step on CPU ({torch.get_num_threads()} threads): {args.tasks} tasks, "
          f"{args.ways}-way {args.shots}-shot, {args.steps} inner step(s), {order} order, "
          f"median of {args.repeats}")
    print(f"{'queries/class':>13} {'loop tasks/s':>13} {'vmap tasks/s':>13} {'vmap/loop':>10} {'auto':>6}")
    for r in rows:
        print(f"{r['queries_per_class']:>13} {r['loop_tasks_per_s']:>13.1f} "
              f"{r['vmap_tasks_per_s']:>13.1f} {r['vmap_over_loop']:>10.2f} {r['auto_picks']:>6}")
    print(json.dumps({"benchmark": "meta_step", "device": "cpu", "tasks": args.tasks,
                      "ways": args.ways, "shots": args.shots, "inner_steps": args.steps,
                      "order": order, "rows": rows}))


if __name__ == "__main__":
    main()
