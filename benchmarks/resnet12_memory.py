"""Peak memory of one MAML meta-step with the ResNet-12 backbone, on CPU.

    python benchmarks/resnet12_memory.py [--shots 1 5] [--steps 1 5] [--queries 15]
                                         [--max_gib 18]

One task (5-way, ``--queries`` per class, 84x84 RGB, float32, default ResNet-12 channels) is
adapted with ``--steps`` inner steps and its query loss backpropagated to the
meta-parameters, first and second order: MAML (``fewshot.algorithms.MAML``) run by the
``Vmap`` executor through ``fewshot.execution.run_meta_batch`` (what ``Auto`` picks on a GPU). Each measurement runs in a fresh
subprocess, which reads its peak resident memory (``VmHWM`` in ``/proc/self/status``) before
and after the meta-step; ``step`` is the difference, the memory the meta-step itself needs,
about what it would take on a GPU too. A subprocess may not exceed ``--max_gib`` of address
space (``RLIMIT_AS``), so a step that does not fit is reported as such instead of exhausting
the machine; its step is then extrapolated from the second-order steps that fit (linear in
support images x inner steps). Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from fewshot.algorithms import MAML
from fewshot.core.episode import Episodes
from fewshot.execution import Vmap, run_meta_batch
from fewshot.models import FewShotClassifier, ResNet12

WAYS, IMAGE_SIZE = 5, 84


def peak_gib() -> float:
    """Peak resident memory of this process so far (``VmHWM``), in GiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def one_meta_step(shots: int, steps: int, queries: int, first_order: bool) -> dict:
    torch.manual_seed(0)
    model = FewShotClassifier(ResNet12(in_channels=3, image_size=IMAGE_SIZE), WAYS)
    maml = MAML(inner_steps=steps, inner_lr=0.01, first_order=first_order)
    maml.build(model)
    labels = torch.arange(WAYS)
    episodes = Episodes(torch.rand(1, WAYS * shots, 3, IMAGE_SIZE, IMAGE_SIZE),
                        labels.repeat_interleave(shots)[None],
                        torch.rand(1, WAYS * queries, 3, IMAGE_SIZE, IMAGE_SIZE),
                        labels.repeat_interleave(queries)[None])
    before = peak_gib()
    start = time.perf_counter()
    results = run_meta_batch(maml, model, episodes, Vmap())
    maml.meta_loss(results, epoch=0).backward()
    seconds = time.perf_counter() - start
    peak = peak_gib()
    return {"shots": shots, "steps": steps, "first_order": first_order,
            "peak_gib": round(peak, 2), "step_gib": round(peak - before, 2),
            "seconds": round(seconds, 1)}


def measure(shots: int, steps: int, queries: int, first_order: bool, max_gib: float) -> dict:
    """:func:`one_meta_step` in a fresh, memory-capped subprocess."""
    command = [sys.executable, __file__, "--child", str(shots), str(steps), str(queries),
               str(int(first_order)), str(max_gib)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode == 0:
        return json.loads(done.stdout.strip().splitlines()[-1])
    return {"shots": shots, "steps": steps, "first_order": first_order, "peak_gib": None,
            "step_gib": None, "seconds": None,
            "error": f"does not fit in {max_gib:g} GiB: " + done.stderr.strip().splitlines()[-1][:80]}


def estimate_missing(rows: list[dict]) -> None:
    """Fill ``estimate_gib`` of second-order rows that did not fit, extrapolating the ones that
    did linearly in support images x inner steps (the graph kept per inner step)."""
    fitted = [r for r in rows if not r["first_order"] and r["step_gib"] is not None]
    if len({r["shots"] * r["steps"] for r in fitted}) < 2:
        return
    x = torch.tensor([float(WAYS * r["shots"] * r["steps"]) for r in fitted])
    y = torch.tensor([r["step_gib"] for r in fitted])
    slope = ((x - x.mean()) * (y - y.mean())).sum() / (x - x.mean()).square().sum()
    for row in rows:
        if not row["first_order"] and row["step_gib"] is None:
            images_x_steps = WAYS * row["shots"] * row["steps"]
            row["estimate_gib"] = round(float(y.mean() + slope * (images_x_steps - x.mean())), 1)


def child(shots: str, steps: str, queries: str, first_order: str, max_gib: str) -> None:
    limit = int(float(max_gib) * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    print(json.dumps(one_meta_step(int(shots), int(steps), int(queries), bool(int(first_order)))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--queries", type=int, default=15, help="query images per class")
    parser.add_argument("--max_gib", type=float, default=18.0,
                        help="address-space cap of each measurement, GiB")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    rows = []
    print(f"{'shots':>5} {'steps':>5} {'order':>6} {'peak GiB':>9} {'step GiB':>9} {'seconds':>8}")
    for shots in args.shots:
        for steps in args.steps:
            for first_order in (True, False):
                row = measure(shots, steps, args.queries, first_order, args.max_gib)
                rows.append(row)
                order = "first" if first_order else "second"
                if row["peak_gib"] is None:
                    print(f"{shots:>5} {steps:>5} {order:>6}  {row['error']}", flush=True)
                else:
                    print(f"{shots:>5} {steps:>5} {order:>6} {row['peak_gib']:>9.2f} "
                          f"{row['step_gib']:>9.2f} {row['seconds']:>8.1f}", flush=True)
    estimate_missing(rows)
    for row in rows:
        if "estimate_gib" in row:
            print(f"estimate for {row['shots']}-shot {row['steps']} steps, second order: "
                  f"{row['estimate_gib']} GiB (linear in support images x steps)")
    print(json.dumps({"benchmark": "resnet12_memory", "device": "cpu", "torch": torch.__version__,
                      "ways": WAYS, "queries": args.queries, "image_size": IMAGE_SIZE,
                      "tasks": 1, "batching": "vmap", "rows": rows}))


if __name__ == "__main__":
    main()
