"""Peak memory of one second-order meta-step against inner steps: plain vs checkpointed steps.

    python benchmarks/memory.py [--setting omniglot] [--steps 1 5 10 20] [--tasks 8]
                                [--budget_mib 200] [--device cpu]

Each point (inner steps x mode) builds the model and the episodes, runs one warm-up meta-step
and then measures one more: forward, meta-backward; on the CPU in a fresh Python process. CPU:
the growth of the resident set during the measured step (``VmHWM`` reset through
``/proc/self/clear_refs``, freed heap returned first with ``malloc_trim``); CUDA:
``torch.cuda.max_memory_allocated``. Modes: ``plain`` (the ``--batching`` executor),
``checkpoint`` (``RecomputeInnerSteps``: each inner step recomputed in the backward pass) and,
with ``--budget_mib``, ``budget`` (``MemoryBudget``: tasks in recomputed chunks sized from the
budget, inner steps recomputed too). With ``--peers``, learn2learn's loop (``learn2learn``)
and the same loop on worker threads (``learn2learn_threads``, benchmarks/peers.py) run the same
meta-step in the same way, for comparison. Last line: one JSON object.

    python benchmarks/memory.py --setting omniglot --tasks 32 --steps 1 --peers   # the issue's
    python benchmarks/memory.py --setting mini_imagenet --tasks 4 --steps 5 --peers
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
from bench_deps import load_peers
from meta_step import SETTINGS, Setting, make_episodes
from peak_memory import peak_memory_mib
from peers import learn2learn_step, learn2learn_threaded_step, peer_model

from fewshot.algorithms import MAML
from fewshot.execution import (
    Auto,
    Executor,
    Loop,
    MemoryBudget,
    RecomputeInnerSteps,
    Threads,
    Vmap,
    run_meta_batch,
)
from fewshot.models import Conv4, FewShotClassifier

BATCHING = {"auto": Auto, "vmap": Vmap, "loop": Loop, "threads": Threads}
MODES = ("plain", "checkpoint", "budget")
PEER_MODES = {"learn2learn": learn2learn_step, "learn2learn_threads": learn2learn_threaded_step}


def executor_for(mode: str, batching: str, budget_mib: float | None) -> Executor:
    """The executor of a mode: ``batching``'s, with recomputed inner steps, within a budget."""
    executor = BATCHING[batching]()
    if mode == "plain":
        return executor
    if mode == "checkpoint":
        return RecomputeInnerSteps(executor)
    if mode == "budget":  # chunk size measured from the budget, inner steps recomputed too
        return MemoryBudget(budget_mib / 1024, executor=RecomputeInnerSteps(executor))
    raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")


def one_point(s: Setting, mode: str, batching: str, device: torch.device, budget_mib: float | None) -> dict:
    torch.manual_seed(0)
    model = FewShotClassifier(Conv4(s.channels, s.hidden, s.size), s.ways).to(device)
    episodes = make_episodes(s, device)
    if mode in PEER_MODES:  # the same meta-step written with learn2learn
        peers, missing = load_peers()
        if "learn2learn" not in peers:
            raise SystemExit(f"{mode}: {missing[0]}")
        peer = peer_model(model, s.channels, s.hidden, s.size)
        del model

        def step() -> None:
            PEER_MODES[mode](peers["learn2learn"], peer, episodes, s.steps, s.inner_lr, False)
    else:
        maml = MAML(inner_steps=s.steps, inner_lr=s.inner_lr)
        maml.build(model)
        executor = executor_for(mode, batching, budget_mib)

        def step() -> None:
            params = dict(model.named_parameters())
            results = run_meta_batch(maml, model, episodes, executor, params=params)
            torch.autograd.grad(maml.meta_loss(results, epoch=0), list(params.values()))

    step()  # warm-up (and, in budget mode, the one-task measurement)
    start = time.perf_counter()
    _, peak = peak_memory_mib(step, device)
    return {"steps": s.steps, "mode": mode, "peak_mib": peak, "seconds": time.perf_counter() - start}


def mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="omniglot")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 5, 10, 20])
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--queries", type=int, default=None)
    parser.add_argument("--batching", default="auto", choices=list(BATCHING),
                        help="the executor of every mode: Auto, Vmap or Loop")
    parser.add_argument("--budget_mib", type=float, default=None, help="also run the budget mode")
    parser.add_argument("--peers", action="store_true",
                        help="also run learn2learn's loop, alone and on worker threads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--point", nargs=2, metavar=("STEPS", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    base = SETTINGS[args.setting]
    base = Setting(**{**base.__dict__, "tasks": args.tasks,
                      "queries": args.queries if args.queries is not None else base.queries})

    if args.point:  # child process: one measurement, printed as JSON
        steps, mode = int(args.point[0]), args.point[1]
        s = Setting(**{**base.__dict__, "steps": steps})
        print(json.dumps(one_point(s, mode, args.batching, device, args.budget_mib)))
        return

    modes = ["plain", "checkpoint"] + (["budget"] if args.budget_mib else []) \
        + (list(PEER_MODES) if args.peers else [])
    points = []
    for steps in args.steps:
        for mode in modes:
            if device.type == "cuda":  # the allocator's own peak: no fresh process needed
                s = Setting(**{**base.__dict__, "steps": steps})
                points.append(one_point(s, mode, args.batching, device, args.budget_mib))
                continue
            child = [sys.executable, __file__, "--point", str(steps), mode, *sys.argv[1:]]
            done = subprocess.run(child, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"{steps} steps, {mode}: failed\n{done.stderr[-3000:]}")
            points.append(json.loads(done.stdout.strip().splitlines()[-1]))
    unit = "peak MiB" if device.type == "cuda" else "RSS growth MiB"
    print(f"{base.name}, {base.tasks} tasks, {base.queries} queries/class, second order, "
          f"batching {args.batching}, {device.type} ({torch.get_num_threads()} threads): {unit} "
          f"(seconds) of one meta-step")
    print(f"{'inner steps':>11}" + "".join(f"{m:>22}" for m in modes))
    for steps in args.steps:
        row = {p["mode"]: p for p in points if p["steps"] == steps}
        cells = "".join(f"{mib(row[m]['peak_mib']):>14} ({row[m]['seconds']:5.1f}s)" for m in modes)
        print(f"{steps:>11}{cells}")
    print(json.dumps({"benchmark": "memory", "setting": base.name, "tasks": base.tasks,
                      "queries": base.queries, "device": device.type, "batching": args.batching,
                      "budget_mib": args.budget_mib, "points": points}))


if __name__ == "__main__":
    main()
