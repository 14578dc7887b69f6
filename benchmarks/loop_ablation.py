"""What each CPU speed-up of the per-task loop is worth: the second-order meta-step with one
of them undone at a time, side by side in one run.

    python benchmarks/loop_ablation.py [--threads 1] [--repeats 7] [--tasks 32]

Omniglot 5-way 1-shot, 1 query per class, 1 inner step, conv4-64 (the meta_step.py setting),
the per-task loop (the ``Loop`` executor). Rows:

- ``fewshot``: as shipped (closed-form batch-norm second derivative, max-pool before ReLU,
  plain autograd for the inner gradient);
- ``autograd's batch-norm 2nd derivative``: the fused kernel differentiated by autograd;
- ``primitive batch norm``: ``var_mean`` and a scale and shift (the path used under vmap);
- ``ReLU before max-pool``: MAML's block order;
- ``torch.func.grad inner gradient``: the inner gradient through ``torch.func.grad``.

Every row is checked against the shipped one in float64 first (relative error < 1e-10).
Repetitions are interleaved; medians. Last line: one JSON object with every row's seconds and
its time relative to ``fewshot``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from unittest.mock import patch

import torch
from meta_step import SETTINGS, Setting, fewshot_step, first_tasks, make_episodes, relative_error
from torch import nn

import fewshot.core.inner_loop
import fewshot.models.batch_norm
from fewshot.execution import Loop
from fewshot.models import Conv4, FewShotClassifier


def relu_before_pool(model: FewShotClassifier) -> FewShotClassifier:
    """The same network with MAML's block order (conv, norm, ReLU, pool): same parameters."""
    other = copy.deepcopy(model)
    blocks = list(other.features.blocks)
    for start in range(0, 16, 4):
        assert isinstance(blocks[start + 2], nn.MaxPool2d) and isinstance(blocks[start + 3], nn.ReLU)
        blocks[start + 2], blocks[start + 3] = blocks[start + 3], blocks[start + 2]
    other.features.blocks = nn.Sequential(*blocks)
    return other


def variants() -> dict[str, Callable[[], AbstractContextManager]]:
    bn = fewshot.models.batch_norm
    return {
        "fewshot": nullcontext,
        "autograd's batch-norm 2nd derivative": lambda: patch.object(bn, "inside_functorch_transform",
                                                                lambda: True),
        "primitive batch norm": lambda: patch.object(bn, "inside_vmap", lambda: True),
        "ReLU before max-pool": nullcontext,  # the model differs, not the code
        "torch.func.grad inner gradient": lambda: patch.object(
            fewshot.core.inner_loop, "inside_functorch_transform", lambda: True),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--tasks", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    s = Setting(**{**SETTINGS["omniglot"].__dict__, "tasks": args.tasks})
    torch.manual_seed(0)
    model = FewShotClassifier(Conv4(s.channels, s.hidden, s.size), s.ways)
    models = {name: relu_before_pool(model) if name == "ReLU before max-pool" else model
              for name in variants()}
    episodes = make_episodes(s, torch.device("cpu"))

    def step(name: str, network: nn.Module, batch) -> list[torch.Tensor]:
        with variants()[name]():
            return fewshot_step(network, batch, s.steps, s.inner_lr, False, Loop())

    check = first_tasks(episodes, 4, torch.float64)
    reference = step("fewshot", copy.deepcopy(model).double(), check)
    for name, network in models.items():
        error = relative_error(step(name, copy.deepcopy(network).double(), check), reference)
        assert error < 1e-10, f"{name}: meta-gradient differs from fewshot's by {error:.1e}"
        step(name, network, episodes)  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.repeats):
        for name, network in models.items():
            start = time.perf_counter()
            step(name, network, episodes)
            seconds[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(times) for name, times in seconds.items()}
    print(f"\nsecond-order meta-step, per-task loop, {s.tasks} Omniglot 5w1s tasks, "
          f"{args.threads} thread(s), median of {args.repeats}")
    print(f"{'':<40}{'s/step':>8}{'time vs fewshot':>17}")
    for name, value in medians.items():
        print(f"{name:<40}{value:>8.3f}{value / medians['fewshot']:>16.2f}x")
    print(json.dumps({"benchmark": "loop_ablation", "threads": args.threads, "tasks": s.tasks,
                      "repeats": args.repeats, "torch": torch.__version__,
                      "rows": [{"row": name, "seconds": value,
                                "time_vs_fewshot": value / medians["fewshot"]}
                               for name, value in medians.items()]}))


if __name__ == "__main__":
    main()
