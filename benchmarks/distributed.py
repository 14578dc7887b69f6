"""Meta-training throughput on Lightning DDP: 1 vs 2 CPU processes (gloo), real Omniglot.

    python benchmarks/distributed.py [--steps 30] [--tasks 32]

Omniglot 5-way 1-shot, second-order MAML, conv4-64, ``--tasks`` tasks per meta-batch (each of
2 processes takes half). One process uses both cores (2 threads); two processes use one
thread each. Tasks/s is timed between the end of a warm-up step and the end of the last step,
on rank 0. On a CUDA machine ``--gpu`` adds the single-GPU figure. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer

from fewshot.algorithms import MAML
from fewshot.models import Conv4
from fewshot.training.datamodule import FewShotDataModule
from fewshot.training.module import MetaLearner

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OMNIGLOT = REPO.parent / "shared" / "data" / "omniglot"


class Throughput(Callback):
    def __init__(self, path: Path, warmup: int, threads: int) -> None:
        self.path, self.warmup, self.threads = path, warmup, threads

    def setup(self, trainer, pl_module, stage) -> None:
        torch.set_num_threads(self.threads)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()
        if trainer.global_step == trainer.max_steps and trainer.is_global_zero:
            seconds = time.perf_counter() - self.start
            self.path.write_text(json.dumps({"seconds": seconds,
                                             "steps": trainer.max_steps - self.warmup}))


def measure(args, accelerator: str, devices: int, threads: int) -> dict:
    data = FewShotDataModule(root=args.data_root, ways=5, shots=1, queries=1,
                             meta_batch_size=args.tasks, val_episodes=1, steps_per_epoch=10_000)
    torch.manual_seed(0)
    model = MetaLearner(Conv4(1, 64, 28), ways=5, algorithm=MAML(inner_steps=1, inner_lr=0.4))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "throughput.json"
        trainer = Trainer(
            accelerator=accelerator, devices=devices,
            strategy="ddp_fork" if devices > 1 else "auto", max_steps=args.steps,
            limit_val_batches=0, num_sanity_val_steps=0, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            inference_mode=False, use_distributed_sampler=False, default_root_dir=folder,
            callbacks=[Throughput(path, warmup=3, threads=threads)])
        trainer.fit(model, datamodule=data)
        result = json.loads(path.read_text())
    tasks_per_s = args.tasks * result["steps"] / result["seconds"]
    return {"device": accelerator, "processes": devices, "threads_per_process": threads,
            "tasks_per_s": tasks_per_s, "seconds_per_step": result["seconds"] / result["steps"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--tasks", type=int, default=32)
    parser.add_argument("--data_root", default=str(DEFAULT_OMNIGLOT))
    parser.add_argument("--gpu", action="store_true")
    args = parser.parse_args()

    rows = [measure(args, "cpu", 1, 2), measure(args, "cpu", 2, 1)]
    if args.gpu and torch.cuda.is_available():
        rows.append(measure(args, "gpu", 1, 2))
    base = rows[0]["tasks_per_s"]
    print(f"Omniglot 5-way 1-shot, second-order MAML, {args.tasks} tasks per meta-batch, "
          f"{args.steps - 3} timed steps")
    print(f"{'device':<8}{'processes':>10}{'threads':>9}{'tasks/s':>10}{'s/step':>9}{'vs 1 CPU process':>18}")
    for r in rows:
        r["ratio_to_one_cpu_process"] = r["tasks_per_s"] / base
        print(f"{r['device']:<8}{r['processes']:>10}{r['threads_per_process']:>9}"
              f"{r['tasks_per_s']:>10.1f}{r['seconds_per_step']:>9.3f}"
              f"{r['ratio_to_one_cpu_process']:>18.2f}")
    print(json.dumps({"benchmark": "distributed", "tasks": args.tasks, "rows": rows}))


if __name__ == "__main__":
    main()
