"""Ideas for a cheaper second-order meta-step, each measured per task on one thread.

    python benchmarks/second_order_ideas.py [--setting omniglot omniglot_q15 mini_imagenet]
                                            [--tasks 8] [--repeats 7]

fewshot's worker threads run whole tasks with one intra-op thread each, as the best-effort
learn2learn row of benchmarks/meta_step.py does, so the speed between them is the speed of one
task on one thread. Rows (the same conv4, weights and tasks; one thread):

- ``learn2learn``: its per-task loop (the baseline of every ratio);
- ``fewshot loop``: fewshot's per-task loop as shipped (reverse-over-reverse: the inner gradient
  is built with ``create_graph`` and differentiated again by the meta-backward);
- ``forward-over-reverse HVP``: the inner gradients without a graph, the query gradient ``v`` at
  the adapted weights, then ``v <- v - lr * H v`` back through the steps with ``H v`` from
  ``torch.func.jvp`` of ``torch.func.grad`` of the support loss (recomputes each support pass);
- ``channels_last``: fewshot's loop with the weights and images in oneDNN's preferred layout;
  ``learn2learn channels_last`` the same for the peer;
- ``vmap chunks of N``: fewshot's ``Vmap(chunk_size=N)`` (N tasks per batched call).

Every fewshot row's meta-gradient is checked against the loop in float64 on the first two tasks
(relative error < 1e-8) before timing. Rounds rotate the row order; ratios are medians of
per-round ratios against learn2learn. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from bench_deps import load_peers
from meta_step import SETTINGS, Setting, fewshot_step, first_tasks, make_episodes, relative_error
from peers import learn2learn_step, peer_model
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp

from fewshot.core.episode import Episodes
from fewshot.execution import Loop, Vmap
from fewshot.models import Conv4, FewShotClassifier


def hvp_meta_gradient(model: nn.Module, episodes: Episodes, steps: int, lr: float) -> list[Tensor]:
    """Second-order MAML's meta-gradient (plain SGD inner loop, mean query loss) with
    Hessian-vector products in forward-over-reverse mode."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for sx, sy, qx, qy in zip(*episodes, strict=True):
        def support_loss(p: dict[str, Tensor], sx=sx, sy=sy) -> Tensor:
            return F.cross_entropy(functional_call(model, p, (sx,)), sy)
        points, p = [], params
        for _ in range(steps):
            points.append(p)
            leaves = {n: t.detach().requires_grad_() for n, t in p.items()}
            g = torch.autograd.grad(support_loss(leaves), list(leaves.values()))
            p = {n: t.detach() - lr * gi for (n, t), gi in zip(p.items(), g, strict=True)}
        leaves = {n: t.detach().requires_grad_() for n, t in p.items()}
        query_loss = F.cross_entropy(functional_call(model, leaves, (qx,)), qy)
        v = dict(zip(leaves, torch.autograd.grad(query_loss, list(leaves.values())), strict=True))
        for point in reversed(points):
            _, hv = jvp(grad(support_loss), (point,), (v,))
            v = {n: v[n] - lr * hv[n] for n in v}
        for n in total:
            total[n] += v[n]
    return [total[n] / episodes.num_tasks for n in total]


def channels_last(x: Tensor) -> Tensor:
    """``[T, N, C, H, W]`` whose every task slice is channels_last."""
    return x.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)


def channels_last_episodes(e: Episodes) -> Episodes:
    return Episodes(channels_last(e.support_x), e.support_y, channels_last(e.query_x), e.query_y)


def rows_for(s: Setting, learn2learn) -> dict[str, tuple[Callable, bool]]:
    """name -> ((model, peer, episodes) -> meta-gradient, runs on the peer model)."""
    def fs(executor) -> Callable:
        return lambda m, p, e: fewshot_step(m, e, s.steps, s.inner_lr, False, executor)
    rows = {
        "fewshot loop": (fs(Loop()), False),
        "forward-over-reverse HVP": (lambda m, p, e: hvp_meta_gradient(m, e, s.steps, s.inner_lr), False),
        "channels_last": (lambda m, p, e: fewshot_step(
            m.to(memory_format=torch.channels_last), channels_last_episodes(e), s.steps,
            s.inner_lr, False, Loop()), False),
        "vmap chunks of 4": (fs(Vmap(chunk_size=4)), False),
        "vmap all tasks": (fs(Vmap()), False),
    }
    if learn2learn is not None:
        rows["learn2learn"] = (lambda m, p, e: learn2learn_step(learn2learn, p, e, s.steps, s.inner_lr, False), True)
        rows["learn2learn channels_last"] = (lambda m, p, e: learn2learn_step(
            learn2learn, p.to(memory_format=torch.channels_last), channels_last_episodes(e),
            s.steps, s.inner_lr, False), True)
    return rows


def measure(s: Setting, repeats: int, learn2learn) -> list[dict]:
    torch.manual_seed(0)
    model = FewShotClassifier(Conv4(s.channels, s.hidden, s.size), s.ways)
    peer = peer_model(model, s.channels, s.hidden, s.size)
    episodes = make_episodes(s, torch.device("cpu"))
    rows = rows_for(s, learn2learn)
    model64, peer64 = copy.deepcopy(model).double(), copy.deepcopy(peer).double()
    check = first_tasks(episodes, min(2, s.tasks), torch.float64)
    reference = fewshot_step(model64, check, s.steps, s.inner_lr, False, Loop())
    errors = {}
    for name, (run, _) in rows.items():
        errors[name] = relative_error(run(copy.deepcopy(model64), copy.deepcopy(peer64), check), reference)
        assert errors[name] < 1e-8, f"{name}: meta-gradient off by {errors[name]:.1e} in float64"
        run(copy.deepcopy(model), copy.deepcopy(peer), episodes)  # warm-up
    names = list(rows)
    seconds = {name: [] for name in names}
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            run, _ = rows[name]
            m, p = copy.deepcopy(model), copy.deepcopy(peer)  # each row changes its own copy
            start = time.perf_counter()
            run(m, p, episodes)
            seconds[name].append(time.perf_counter() - start)
    base = "learn2learn" if "learn2learn" in seconds else "fewshot loop"
    return [{"setting": s.name, "queries": s.queries, "tasks": s.tasks, "row": name,
             "seconds": statistics.median(seconds[name]),
             "ratio": statistics.median(b / t for b, t in zip(seconds[base], seconds[name], strict=True)),
             "baseline": base, "float64_relative_error": errors[name]} for name in names]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", nargs="+", choices=sorted(SETTINGS), default=["omniglot"])
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    peers, missing = load_peers()
    for reason in missing:
        print(f"note: {reason}: its rows are left out")
    results = []
    for key in args.setting:
        s = Setting(**{**SETTINGS[key].__dict__, "tasks": args.tasks})
        rows = measure(s, args.repeats, peers.get("learn2learn"))
        print(f"\n{s.name}, {s.queries} queries/class, {s.steps} step(s), {s.tasks} tasks, one thread, "
              f"median of {args.repeats} rotated rounds; ratio: median of paired ratios to {rows[0]['baseline']}")
        print(f"{'':<28}{'s/step':>8}{'ratio':>8}{'err f64':>10}")
        for r in rows:
            print(f"{r['row']:<28}{r['seconds']:>8.3f}{r['ratio']:>7.2f}x{r['float64_relative_error']:>10.1e}")
        results += rows
    print(json.dumps({"benchmark": "second_order_ideas", "torch": torch.__version__, "rows": results}))


if __name__ == "__main__":
    main()
