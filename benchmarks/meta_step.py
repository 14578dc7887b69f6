"""Tasks per second of one MAML meta-step: fewshot's strategies against learn2learn and higher.

    python benchmarks/meta_step.py [--setting omniglot omniglot_q15 mini_imagenet] [--repeats 5]
                                   [--device cpu] [--extra checkpoint budget bf16]
                                   [--rows "fewshot vmap" ...]

fewshot's rows (MAML from :mod:`fewshot.algorithms` run by an executor of
:mod:`fewshot.execution`): the per-task loop (``Loop``), ``Vmap``, worker threads (``Threads``,
CPU only), ``Auto`` (the executor fewshot picks by default), vmap in chunks
(``Vmap(chunk_size)``), and ``Auto`` first order. Two settings, both second
order: Omniglot 5-way 1-shot, 32 tasks, 1 inner step (28x28x1, conv4 with 64 filters, 1 query
image per class as in MAML's code, ``omniglot``; 15 per class, ``omniglot_q15``) and
mini-ImageNet 5-way 5-shot, 4 tasks, 5 inner steps (84x84x3, 32 filters, 15 queries per class).
The peers: learn2learn's own per-task loop (``learn2learn``) and, on the CPU, the best a
learn2learn user can do with the same cores (``learn2learn threads``: its loop with the tasks
split over one worker thread per intra-op thread, one intra-op thread each, fewshot's scheme).

Every row computes the gradient of the mean query loss for the same weights and images. fewshot
runs its conv4 (batch norm from :class:`~fewshot.models.TransductiveBatchNorm2d`), the peers the
same conv4 built with ``torch.nn.BatchNorm2d`` (checked to compute the same function). Before any
timing, every row's meta-gradient is checked against fewshot's per-task loop in float64 on the
first ``--check_tasks`` tasks (relative error < 1e-8); the float32 difference on the full batch is
reported too. Repetitions are interleaved (each row once per round, a different row first in
each round) so machine noise hits all rows alike; the table shows median times, and each ratio
is the median of the per-round ratios (row against peer in the same round): ``vs best`` against
the faster learn2learn row of the same order, ``vs l2l`` against learn2learn's plain loop.
FLOPs: matmuls and convolutions of one meta-step (``torch.utils.flop_counter``, counted on the
per-task loop of the row's library and order: the useful work every row of it does), achieved GFLOP/s and the fraction of the float32 peak
of a large matmul on the same intra-op threads (benchmarks/flops.py). Peak memory: CUDA's max_memory_allocated, or on the CPU the
growth of the resident set. The comparison libraries come from ``.bench-deps`` (fetch them with
``python benchmarks/bench_deps.py``); without them only fewshot's rows run. ``--extra`` adds
fewshot rows for checkpointed inner steps (``RecomputeInnerSteps``), a memory budget
(``MemoryBudget``, ``--budget_gib``: chunks recomputed in the backward pass) and bf16 autocast (not exact: compared in float32 only); ``--rows`` keeps
the rows whose names start with the given prefixes (and the learn2learn baselines). Last line:
one JSON object with every row: tasks/s, peak memory (MiB), paired ratios, FLOPs, GFLOP/s.
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
from flops import count_flops, matmul_peak_gflops
from peak_memory import peak_memory_mib
from peers import higher_step, learn2learn_step, learn2learn_threaded_step, peer_model

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
    "omniglot_q15": Setting("omniglot 5w1s", 5, 1, 15, 32, 1, 0.4, 1, 28, 64),
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
    # The same arithmetic in this thread, for the FLOP counter (whose mode worker threads
    # do not see); None: ``run`` itself (fewshot's threads give way to the loop under it).
    counted: Callable | None = None


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
        *([Row("fewshot threads", False, None, fs(False, Threads())),
           Row("fewshot threads channels_last", False, None, fs(False, Threads(channels_last=True)))]
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
        def l2l(first_order: bool) -> Callable:
            return lambda m, e, steps, lr: learn2learn_step(maml, m, e, steps, lr, first_order)
        def l2l_threads(first_order: bool) -> Callable:
            return lambda m, e, steps, lr: learn2learn_threaded_step(maml, m, e, steps, lr, first_order)
        rows += [Row("learn2learn", False, "learn2learn", l2l(False)),
                 Row("learn2learn first order", True, "learn2learn", l2l(True))]
        if device.type == "cpu":  # the best-effort peer: its loop on worker threads
            rows += [Row(LEARN2LEARN_THREADS, False, "learn2learn", l2l_threads(False),
                         counted=l2l(False)),
                     Row(f"{LEARN2LEARN_THREADS} first order", True, "learn2learn",
                         l2l_threads(True), counted=l2l(True))]
    if "higher" in peers:
        rows.append(Row("higher", False, "higher",
                        lambda m, e, steps, lr: higher_step(peers["higher"], m, e, steps, lr, False)))
    return rows


LEARN2LEARN_THREADS = "learn2learn threads"


def counted_run(row: Row) -> Callable:
    """What the FLOP counter runs for ``row``: the useful arithmetic of its library's per-task
    loop (worker threads escape the counter's mode; under it ``Auto`` would pick vmap, whose
    batched calls the counter does not count as the per-task work they are)."""
    if row.counted is not None or row.peer is not None:
        return row.counted or row.run
    return lambda m, e, steps, lr: fewshot_step(m, e, steps, lr, row.first_order, Loop())


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

    memory, flops = {}, {}
    for row in rows:
        _, memory[row.name] = peak_memory_mib(
            lambda row=row: row.run(peer if row.peer else model, episodes, s.steps, s.inner_lr), device)
        flops[row.name] = count_flops(lambda row=row: counted_run(row)(
            peer if row.peer else model, episodes, s.steps, s.inner_lr))
    seconds: dict[str, list[float]] = {row.name: [] for row in rows}
    for repeat in range(args.repeats):
        # A different row goes first in every round, so no row always follows the same one.
        shift = repeat % len(rows)
        for row in rows[shift:] + rows[:shift]:
            sync(device)
            start = time.perf_counter()
            row.run(peer if row.peer else model, episodes, s.steps, s.inner_lr)
            sync(device)
            seconds[row.name].append(time.perf_counter() - start)
    medians = {name: statistics.median(times) for name, times in seconds.items()}

    def paired(baseline: str | None, name: str) -> float | None:
        """Median over the rounds of the baseline's time over the row's, same round."""
        if baseline not in seconds:
            return None
        return statistics.median(b / t for b, t in zip(seconds[baseline], seconds[name], strict=True))

    def fastest_peer(first_order: bool) -> str | None:
        suffix = " first order" if first_order else ""
        candidates = [n + suffix for n in ("learn2learn", LEARN2LEARN_THREADS) if n + suffix in medians]
        return min(candidates, key=medians.get, default=None)

    results = []
    for row in rows:
        loop_peer = "learn2learn first order" if row.first_order else "learn2learn"
        best_peer = fastest_peer(row.first_order)
        gflops = flops[row.name] / medians[row.name] / 1e9
        results.append({
            "setting": s.name, "queries": s.queries, "row": row.name,
            "order": "first" if row.first_order else "second",
            "seconds": medians[row.name], "tasks_per_s": s.tasks / medians[row.name],
            "ratio_to_learn2learn": paired(loop_peer, row.name),
            "best_peer": best_peer, "ratio_to_best_peer": paired(best_peer, row.name),
            # A first-order row against the best *second-order* peer: what fewshot would reach
            # if its second-order term cost nothing, the ceiling of any cheaper mathematics
            # for that term.
            "ratio_to_best_second_order_peer": (paired(fastest_peer(False), row.name)
                                                if row.first_order else None),
            "peak_memory_mib": memory[row.name],
            "gflop": flops[row.name] / 1e9, "gflop_per_s": gflops,
            "fraction_of_peak": gflops / args.peak_gflops,
            "float64_relative_error": errors[row.name][0],
            "float32_relative_error": errors[row.name][1],
        })
    return results


def print_table(s: Setting, results: list[dict], device: torch.device, repeats: int,
                peak_gflops: float) -> None:
    memory = "peak MiB" if device.type == "cuda" else "RSS+ MiB"
    print(f"\n{s.name}: {s.tasks} tasks, {s.queries} queries/class, {s.steps} inner step(s), "
          f"{s.size}x{s.size}x{s.channels}, conv4-{s.hidden}, median of {repeats}, rotated order; "
          f"ratios: median of paired per-round ratios; float32 matmul peak {peak_gflops:.0f} GFLOP/s")
    print(f"{'':<40}{'s/step':>8}{'tasks/s':>9}{'vs best':>8}{'vs l2l':>8}{'GFLOP':>7}"
          f"{'GFLOP/s':>8}{'%peak':>6}{memory:>9}{'err f64':>9}{'err f32':>9}")
    for r in results:
        def ratio(value: float | None) -> str:
            return f"{value:.2f}x" if value else "n/a"
        mib = f"{r['peak_memory_mib']:.0f}" if r["peak_memory_mib"] is not None else "n/a"
        e64 = "n/a" if r["float64_relative_error"] is None else f"{r['float64_relative_error']:.1e}"
        print(f"{r['row']:<40}{r['seconds']:>8.3f}{r['tasks_per_s']:>9.1f}"
              f"{ratio(r['ratio_to_best_peer']):>8}{ratio(r['ratio_to_learn2learn']):>8}"
              f"{r['gflop']:>7.2f}{r['gflop_per_s']:>8.1f}{100 * r['fraction_of_peak']:>5.1f}%"
              f"{mib:>9}{e64:>9}{r['float32_relative_error']:>9.1e}")
    best = {r["best_peer"] for r in results if r["best_peer"]}
    if best:
        print(f"vs best: against the faster learn2learn row of the same order ({', '.join(sorted(best))})")
    for r in results:
        if r.get("ratio_to_best_second_order_peer") and r["row"].startswith("fewshot"):
            print(f"ceiling: {r['row']} against the best second-order peer "
                  f"{r['ratio_to_best_second_order_peer']:.2f}x (a second-order term costing "
                  "nothing could reach no more)")


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
    # The machine's float32 limit on the threads the rows use (a large matmul; CPU only).
    args.peak_gflops = matmul_peak_gflops() if device.type == "cpu" else float("nan")
    peers, missing = load_peers()
    for reason in missing:
        print(f"note: {reason}: its rows are left out")
    all_results = []
    for key in args.setting:
        s = SETTINGS[key]
        if args.queries is not None:
            s = Setting(**{**s.__dict__, "queries": args.queries})
        results = benchmark(s, args, device, peers)
        print_table(s, results, device, args.repeats, args.peak_gflops)
        all_results += results
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"cpu ({torch.get_num_threads()} threads)"
    print(json.dumps({"benchmark": "meta_step", "device": name, "torch": torch.__version__,
                      "repeats": args.repeats, "peak_gflop_per_s": args.peak_gflops,
                      "missing_peers": missing, "rows": all_results}))


if __name__ == "__main__":
    main()
