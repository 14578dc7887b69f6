"""Tasks per second of one MAML meta-step: fewshot's strategies against learn2learn and higher.

    python benchmarks/meta_step.py [--setting omniglot mini_imagenet] [--repeats 5] [--device cpu]
                                   [--extra checkpoint budget bf16] [--rows "fewshot vmap" ...]

fewshot's rows (MAML from :mod:`fewshot.algorithms` run by an executor of
:mod:`fewshot.execution`): the per-task loop (``Loop``), ``Vmap``, worker threads (``Threads``,
CPU only), ``Auto`` (the executor fewshot picks by default), vmap in chunks
(``Vmap(chunk_size)``), and ``Auto`` first order. Two settings, both second
order: Omniglot 5-way 1-shot, 32 tasks, 1 inner step (28x28x1, conv4 with 64 filters, 1 query
image per class as in MAML's code, ``--queries`` for more) and mini-ImageNet 5-way 5-shot,
4 tasks, 5 inner steps (84x84x3, 32 filters, 15 queries per class).

Every row computes the gradient of the mean query loss for the same weights and images. fewshot
runs its conv4 (batch norm from :class:`~fewshot.models.TransductiveBatchNorm2d`), the peers the
same conv4 built with ``torch.nn.BatchNorm2d`` (checked to compute the same function). Before any
timing, every row's meta-gradient is checked against fewshot's per-task loop in float64 on the
first ``--check_tasks`` tasks (relative error < 1e-8); the float32 difference on the full batch is
reported too. Repetitions are interleaved (each row once per round) so machine noise hits all
rows alike; the table shows medians. Peak memory: CUDA's max_memory_allocated, or on the CPU the
growth of the resident set. The comparison libraries come from ``.bench-deps`` (fetch them with
``python benchmarks/bench_deps.py``); without them only fewshot's rows run. ``--extra`` adds
fewshot rows for checkpointed inner steps (``RecomputeInnerSteps``), a memory budget
(``MemoryBudget``, ``--budget_gib``: chunks recomputed in the backward pass) and bf16 autocast (not exact: compared in float32 only); ``--rows`` keeps
the rows whose names start with the given prefixes (and the learn2learn baselines). Last line:
one JSON object with every row: tasks/s, peak memory (MiB), ratio to learn2learn (same order).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from bench_deps import load_peers
from peak_memory import peak_memory_mib
from peers import higher_step, learn2learn_step, peer_model

from fewshot.algorithms import MAML
from fewshot.core.episode import Episodes
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


@dataclass(frozen=True)
class Setting:
    name: str
    ways: int
    shots: int
    queries: int
    tasks: int
    steps: int
    inner_lr: float
    channels: int
    size: int
    hidden: int


SETTINGS = {
    "omniglot": Setting("omniglot 5w1s", 5, 1, 1, 32, 1, 0.4, 1, 28, 64),
    "mini_imagenet": Setting("mini-ImageNet 5w5s", 5, 5, 15, 4, 5, 0.01, 3, 84, 32),
}


def make_episodes(s: Setting, device: torch.device) -> Episodes:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(s.ways)
    def images(n: int) -> torch.Tensor:
        return torch.rand(s.tasks, n, s.channels, s.size, s.size, generator=g).to(device)
    return Episodes(images(s.ways * s.shots), labels.repeat_interleave(s.shots).repeat(s.tasks, 1).to(device),
                    images(s.ways * s.queries), labels.repeat_interleave(s.queries).repeat(s.tasks, 1).to(device))


def first_tasks(episodes: Episodes, n: int, dtype: torch.dtype) -> Episodes:
    return Episodes(episodes.support_x[:n].to(dtype), episodes.support_y[:n],
                    episodes.query_x[:n].to(dtype), episodes.query_y[:n])


def fewshot_step(model, episodes, steps, lr, first_order,
                 executor: Executor | None = None) -> list[torch.Tensor]:
    """The meta-gradient of (first-order) MAML's mean query loss, the tasks run by
    ``executor`` (default: the per-task loop)."""
    maml = MAML(inner_steps=steps, inner_lr=lr, first_order=first_order)
    maml.build(model)  # plain MAML: no learned rates, no change to the model
    params = dict(model.named_parameters())
    results = run_meta_batch(maml, model, episodes, Loop() if executor is None else executor,
                             params=params)
    return list(torch.autograd.grad(maml.meta_loss(results, epoch=0), list(params.values())))


@dataclass(frozen=True)
class Row:
    name: str
    first_order: bool
    peer: str | None  # which library's model the row runs on (None: fewshot's)
    run: Callable  # (model, episodes, steps, lr) -> meta-gradient
    exact: bool = True  # float64-checked; bf16 rows are only compared in float32


def rows_for(s: Setting, device: torch.device, peers: dict, chunk_size: int,
             extra: list[str] = (), budget_gib: float = 1.25) -> list[Row]:
    images = s.ways * (s.shots + s.queries)
    auto = Auto().describe(device, images)
    def fs(first_order: bool, executor: Executor) -> Callable:
        return lambda m, e, steps, lr: fewshot_step(m, e, steps, lr, first_order, executor)
    def chunked(size: int) -> Callable:  # at least two chunks, also on the few checked tasks
        return lambda m, e, steps, lr: fewshot_step(
            m, e, steps, lr, False, Vmap(chunk_size=min(size, max(1, e.num_tasks // 2))))
    rows = [
        Row("fewshot loop", False, None, fs(False, Loop())),
        Row("fewshot vmap", False, None, fs(False, Vmap())),
        *([Row("fewshot threads", False, None, fs(False, Threads()))]
          if device.type == "cpu" else []),  # elsewhere threads fall back to the loop
        Row(f"fewshot auto ({auto})", False, None, fs(False, Auto())),
        Row(f"fewshot vmap chunk={min(chunk_size, max(1, s.tasks // 2))}", False, None,
            chunked(chunk_size)),
        Row(f"fewshot auto ({auto}) first order", True, None, fs(True, Auto())),
    ]
    if "checkpoint" in extra:
        rows.append(Row(f"fewshot auto ({auto}) checkpointed", False, None,
                        fs(False, RecomputeInnerSteps(Auto()))))
    if "budget" in extra:
        rows.append(Row(f"fewshot auto ({auto}) budget {budget_gib:g} GiB", False, None,
                        fs(False, MemoryBudget(budget_gib, executor=Auto()))))
    if "bf16" in extra:
        def bf16(m, e, steps, lr):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                return fewshot_step(m, e, steps, lr, False, Auto())
        rows.append(Row(f"fewshot auto ({auto}) bf16 autocast", False, None, bf16, exact=False))
    if "learn2learn" in peers:
        maml = peers["learn2learn"]
        rows += [Row("learn2learn", False, "learn2learn",
                     lambda m, e, steps, lr: learn2learn_step(maml, m, e, steps, lr, False)),
                 Row("learn2learn first order", True, "learn2learn",
                     lambda m, e, steps, lr: learn2learn_step(maml, m, e, steps, lr, True))]
    if "higher" in peers:
        rows.append(Row("higher", False, "higher",
                        lambda m, e, steps, lr: higher_step(peers["higher"], m, e, steps, lr, False)))
    return rows


def relative_error(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    # One relative error over the whole meta-gradient: per tensor it would be dominated by the
    # conv biases, whose true gradient is zero (batch norm removes them).
    a, e = (torch.cat([g.detach().flatten().double() for g in gs]) for gs in (actual, expected))
    return ((a - e).norm() / e.norm()).item()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def benchmark(s: Setting, args, device: torch.device, peers: dict) -> list[dict]:
    torch.manual_seed(0)
    model = FewShotClassifier(Conv4(s.channels, s.hidden, s.size), s.ways).to(device)
    peer = peer_model(model, s.channels, s.hidden, s.size)
    episodes = make_episodes(s, device)
    with torch.no_grad():  # the peers' conv4 computes the same function as fewshot's
        x = episodes.query_x[0]
        difference = (peer(x) - model(x)).abs().max().item()
    assert difference < 1e-4, f"peer model differs from fewshot's by {difference:.2e}"
    rows = rows_for(s, device, peers, min(args.chunk_size, s.tasks), args.extra, args.budget_gib)
    if args.rows:  # keep the rows named (by prefix), and their learn2learn baselines
        rows = [r for r in rows if r.name.startswith(("learn2learn", *args.rows))]

    # Correctness gate in float64 on the first few tasks.
    model64, peer64 = copy.deepcopy(model).double(), copy.deepcopy(peer).double()
    check = first_tasks(episodes, min(args.check_tasks, s.tasks), torch.float64)
    reference64 = fewshot_step(model64, check, s.steps, s.inner_lr, False, Loop())
    first_order64 = fewshot_step(model64, check, s.steps, s.inner_lr, True, Loop())
    reference = fewshot_step(model, episodes, s.steps, s.inner_lr, False, Loop())
    first_order_reference = fewshot_step(model, episodes, s.steps, s.inner_lr, True, Loop())
    errors = {}
    for row in rows:
        m64 = peer64 if row.peer else model64
        e64 = relative_error(row.run(m64, check, s.steps, s.inner_lr),
                             first_order64 if row.first_order else reference64) if row.exact else None
        assert e64 is None or e64 < 1e-8, f"{s.name}: {row.name} meta-gradient is wrong (float64 error {e64:.2e})"
        grads = row.run(peer if row.peer else model, episodes, s.steps, s.inner_lr)  # warm-up too
        e32 = relative_error(grads, first_order_reference if row.first_order else reference)
        assert row.exact or e32 < 0.5, f"{s.name}: {row.name} is far off (float32 error {e32:.2e})"
        errors[row.name] = (e64, e32)
    del model64, peer64, reference64, first_order64

    memory = {}
    for row in rows:
        _, memory[row.name] = peak_memory_mib(
            lambda row=row: row.run(peer if row.peer else model, episodes, s.steps, s.inner_lr), device)
    seconds: dict[str, list[float]] = {row.name: [] for row in rows}
    for _ in range(args.repeats):
        for row in rows:
            sync(device)
            start = time.perf_counter()
            row.run(peer if row.peer else model, episodes, s.steps, s.inner_lr)
            sync(device)
            seconds[row.name].append(time.perf_counter() - start)
    medians = {name: statistics.median(times) for name, times in seconds.items()}
    results = []
    for row in rows:
        baseline = "learn2learn first order" if row.first_order else "learn2learn"
        results.append({
            "setting": s.name, "row": row.name, "order": "first" if row.first_order else "second",
            "seconds": medians[row.name], "tasks_per_s": s.tasks / medians[row.name],
            "ratio_to_learn2learn": medians[baseline] / medians[row.name] if baseline in medians else None,
            "peak_memory_mib": memory[row.name],
            "float64_relative_error": errors[row.name][0],
            "float32_relative_error": errors[row.name][1],
        })
    return results


def print_table(s: Setting, results: list[dict], device: torch.device, repeats: int) -> None:
    memory = "peak MiB" if device.type == "cuda" else "RSS+ MiB"
    print(f"\n{s.name}: {s.tasks} tasks, {s.queries} queries/class, {s.steps} inner step(s), "
          f"{s.size}x{s.size}x{s.channels}, conv4-{s.hidden}, median of {repeats}")
    print(f"{'':<40}{'s/step':>8}{'tasks/s':>9}{'vs l2l':>8}{memory:>10}{'err f64':>10}{'err f32':>10}")
    for r in results:
        ratio = f"{r['ratio_to_learn2learn']:.2f}x" if r["ratio_to_learn2learn"] else "n/a"
        mib = f"{r['peak_memory_mib']:.0f}" if r["peak_memory_mib"] is not None else "n/a"
        e64 = "n/a" if r["float64_relative_error"] is None else f"{r['float64_relative_error']:.1e}"
        print(f"{r['row']:<40}{r['seconds']:>8.3f}{r['tasks_per_s']:>9.1f}{ratio:>8}{mib:>10}"
              f"{e64:>10}{r['float32_relative_error']:>10.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", nargs="+", choices=sorted(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--queries", type=int, default=None,
                        help="query images per class (default: 1 Omniglot, 15 mini-ImageNet)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunk_size", type=int, default=8, help="tasks per chunk in the chunked row")
    parser.add_argument("--check_tasks", type=int, default=4, help="tasks in the float64 check")
    parser.add_argument("--extra", nargs="*", default=[], choices=["checkpoint", "budget", "bf16"],
                        help="more fewshot rows: checkpointed inner steps, a memory budget "
                             "(--budget_gib), bf16 autocast (not exact: compared in float32)")
    parser.add_argument("--budget_gib", type=float, default=1.25)
    parser.add_argument("--rows", nargs="*", default=[],
                        help="only rows whose name starts with one of these (learn2learn stays)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    peers, missing = load_peers()
    for reason in missing:
        print(f"note: {reason}: its rows are left out")
    all_results = []
    for key in args.setting:
        s = SETTINGS[key]
        if args.queries is not None:
            s = Setting(**{**s.__dict__, "queries": args.queries})
        results = benchmark(s, args, device, peers)
        print_table(s, results, device, args.repeats)
        all_results += results
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"cpu ({torch.get_num_threads()} threads)"
    print(json.dumps({"benchmark": "meta_step", "device": name, "torch": torch.__version__,
                      "repeats": args.repeats, "missing_peers": missing, "rows": all_results}))


if __name__ == "__main__":
    main()
