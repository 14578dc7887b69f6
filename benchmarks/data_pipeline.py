"""Episodes per second of the data pipeline alone, against what a MAML meta-step consumes.

    python benchmarks/data_pipeline.py [--batches 30] [--workers 0 2] [--repeats 3]

Two datasets, each with the batch shapes of its shipped MAML config:
- Omniglot (real, ``--omniglot_root``, default ``../shared/data/omniglot``), 5-way 1-shot as in
  configs/omniglot_5way_1shot.yaml;
- a fake mini-ImageNet of the real size (64 training classes x 600 random 84x84 RGB images, as
  the pickled distribution), written once into the git-ignored ``.data/benchmarks/`` with its
  decoded cache, 5-way 1-shot as in configs/maml_mini_imagenet_5way_1shot.yaml.

For each, training meta-batches are drawn through ``FewShotDataModule.train_dataloader()``
with each number of DataLoader workers (after a few warm-up batches, so worker start-up is not
counted), and a second-order MAML meta-step (``fewshot.algorithms.MAML`` run by the ``Auto``
executor, plus the meta-gradient, on a batch from the pipeline) is timed on this CPU. ``headroom`` is pipeline
rate / meta-step rate: above 1 the sampler keeps up with training. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import pickle
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from common import DEFAULT_OMNIGLOT, REPO

from fewshot.algorithms import MAML
from fewshot.core.episode import Episodes
from fewshot.execution import Auto, run_meta_batch
from fewshot.models import Conv4, FewShotClassifier
from fewshot.training.datamodule import FewShotDataModule

FAKE_ROOT = REPO / ".data" / "benchmarks" / "fake-mini-imagenet"
FAKE_CACHE = REPO / ".data" / "benchmarks" / "cache"
FAKE_SPLITS = {"train": 64, "val": 16, "test": 20}


def write_fake_mini_imagenet(root: Path, per_class: int = 600, size: int = 84) -> bool:
    """The pickled distribution at full size, unless it is already there; True if written."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    wrote = False
    for split, classes in FAKE_SPLITS.items():
        path = root / f"mini-imagenet-cache-{split}.pkl"
        if path.is_file():
            continue
        wrote = True
        n = classes * per_class
        data = {"image_data": rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8),
                "class_dict": {f"n{split}{c:05d}": list(range(c * per_class, (c + 1) * per_class))
                               for c in range(classes)}}
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            pickle.dump(data, f, protocol=4)
        tmp.replace(path)
    return wrote


def config_settings(name: str) -> tuple[dict, dict]:
    config = yaml.safe_load((REPO / "configs" / name).read_text())
    return config["data"], config["model"]


def data_module(data_config: dict, root: Path, workers: int, steps: int,
                cache_dir: Path | None) -> FewShotDataModule:
    keep = ("dataset", "class_split", "image_size", "channels", "ways", "shots", "queries",
            "meta_batch_size", "random_crop_padding", "horizontal_flip", "color_jitter")
    options = {k: data_config[k] for k in keep if k in data_config}
    return FewShotDataModule(root=str(root), num_workers=workers, steps_per_epoch=steps,
                             val_episodes=1, cache_dir=str(cache_dir) if cache_dir else None,
                             **options)


def pipeline_rate(data: FewShotDataModule, batches: int, warmup: int) -> float:
    """Meta-batches per second drawn from the training DataLoader."""
    iterator = iter(data.train_dataloader())
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    seconds = time.perf_counter() - start
    del iterator  # shuts the workers down
    return batches / seconds


def meta_step_rate(episodes: Episodes, data_config: dict, model_config: dict,
                   repeats: int) -> tuple[float, str]:
    """Second-order MAML meta-steps per second on ``episodes`` (median of ``repeats``)."""
    torch.manual_seed(0)
    hidden = model_config["backbone"]["init_args"]["hidden_channels"]
    model = FewShotClassifier(
        Conv4(data_config["channels"], hidden, data_config["image_size"]), data_config["ways"])
    settings = model_config["algorithm"]["init_args"]  # both configs are MAML's
    algorithm = MAML(inner_steps=settings["inner_steps"], inner_lr=settings["inner_lr"],
                     first_order=False)
    algorithm.build(model)
    params = dict(model.named_parameters())
    images = episodes.support_x.shape[1] + episodes.query_x.shape[1]
    executor = Auto()
    batching = executor.describe(torch.device("cpu"), images)
    seconds = []
    for _ in range(repeats + 1):  # the first run warms up allocator and kernels
        start = time.perf_counter()
        results = run_meta_batch(algorithm, model, episodes, executor, params=params)
        torch.autograd.grad(algorithm.meta_loss(results, epoch=0), list(params.values()))
        seconds.append(time.perf_counter() - start)
    return 1.0 / statistics.median(seconds[1:]), batching


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--omniglot_root", default=DEFAULT_OMNIGLOT)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batches", type=int, default=30, help="timed meta-batches per run")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="timed meta-steps")
    args = parser.parse_args()

    start = time.perf_counter()
    generated = write_fake_mini_imagenet(FAKE_ROOT)
    generate_seconds = time.perf_counter() - start
    datasets = [("omniglot", "omniglot_5way_1shot.yaml", Path(args.omniglot_root), None),
                ("mini_imagenet (fake, 64x600)", "maml_mini_imagenet_5way_1shot.yaml",
                 FAKE_ROOT, FAKE_CACHE)]
    rows = []
    for label, config, root, cache_dir in datasets:
        data_config, model_config = config_settings(config)
        steps = args.warmup + args.batches
        start = time.perf_counter()
        first = data_module(data_config, root, 0, steps, cache_dir)
        first.setup("fit")  # decodes, or maps the existing cache
        setup_seconds = time.perf_counter() - start
        step_rate, batching = meta_step_rate(first.train_set[0], data_config, model_config,
                                             args.repeats)
        tasks = data_config["meta_batch_size"]
        for workers in args.workers:
            data = data_module(data_config, root, workers, steps, cache_dir)
            data.setup("fit")
            rate = pipeline_rate(data, args.batches, args.warmup)
            rows.append({
                "dataset": label, "config": config, "workers": workers,
                "meta_batch": f"{tasks} x {data_config['ways']}-way {data_config['shots']}-shot "
                              f"{data_config['queries']}q {data_config['channels']}x"
                              f"{data_config['image_size']}px",
                "meta_batches_per_s": rate, "tasks_per_s": rate * tasks,
                "meta_step_per_s": step_rate, "meta_step_tasks_per_s": step_rate * tasks,
                "meta_step_inner_steps": model_config["algorithm"]["init_args"]["inner_steps"], "meta_step_batching": batching,
                "headroom": rate / step_rate, "setup_seconds": setup_seconds,
            })

    fake = (f"written in {generate_seconds:.1f} s" if generated
            else f"reused from {FAKE_ROOT.relative_to(REPO)}")
    print(f"Data pipeline vs second-order MAML meta-step on CPU ({torch.get_num_threads()} "
          f"threads); fake mini-ImageNet {fake}; 'setup s' is decoding or mapping the cache")
    print(f"{'dataset':<30}{'meta-batch':<32}{'workers':>8}{'batches/s':>11}{'tasks/s':>10}"
          f"{'step tasks/s':>14}{'headroom':>10}{'setup s':>9}")
    for r in rows:
        print(f"{r['dataset']:<30}{r['meta_batch']:<32}{r['workers']:>8}"
              f"{r['meta_batches_per_s']:>11.1f}{r['tasks_per_s']:>10.1f}"
              f"{r['meta_step_tasks_per_s']:>14.1f}{r['headroom']:>10.1f}{r['setup_seconds']:>9.1f}")
    print(json.dumps({"benchmark": "data_pipeline", "device": "cpu",
                      "threads": torch.get_num_threads(), "batches": args.batches,
                      "warmup": args.warmup, "fake_generated": generated,
                      "fake_generate_seconds": generate_seconds,
                      "rows": rows}))


if __name__ == "__main__":
    main()
