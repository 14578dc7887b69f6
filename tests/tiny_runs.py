"""A tiny meta-trained run made by the real ``fewshot fit``, shared by the adapt/export tests.

Training takes a few seconds, so it happens once per session however many test modules ask
(``trained_once`` caches the run folder). The run is 3-way, so 5-way tasks exercise the
re-initialised head.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest

from fewshot.cli import main
from fewshot.data.omniglot import Omniglot

TRAINED_WAYS = 3
_cache: dict[str, Path] = {}


# MAML++ with everything that adds tensors or changes prediction: learned per-step inner rates,
# per-step batch-norm weights and running statistics (derivative-order annealing off; one inner
# step of 0.4 as the MAML run). The class comes before any of its settings on the command line.
MAMLPP = ["--model.algorithm=fewshot.algorithms.MAMLPlusPlus",
          "--model.algorithm.init_args.inner_steps=1",
          "--model.algorithm.init_args.inner_lr=0.4",
          "--model.algorithm.init_args.learned_rates=per_tensor",
          "--model.algorithm.init_args.per_step_bn_weights=true",
          "--model.algorithm.init_args.batch_norm=per_step_running",
          "--model.algorithm.init_args.multi_step_loss=true",
          "--model.algorithm.init_args.derivative_order_annealing=false"]


def trained_once(fake: tuple[Path, dict[str, int]], tmp_path_factory: pytest.TempPathFactory,
                 mamlpp: bool = False) -> Path:
    """``lightning_logs/version_0`` of a 3-step run on the session's fake Omniglot."""
    key = "mamlpp" if mamlpp else "maml"
    if key not in _cache:
        root, counts = fake
        directory = tmp_path_factory.mktemp(f"tiny-{key}-run")
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(Omniglot, "expected_characters", counts)
            patch.setattr(Omniglot, "maml_split_sizes", (15, 5, 5))
            main(["fit", f"--data.root={root}", f"--data.cache_dir={directory / 'cache'}",
                  f"--data.ways={TRAINED_WAYS}", "--data.queries=2", "--data.meta_batch_size=2",
                  "--data.eval_queries=2", "--data.val_episodes=2", "--data.steps_per_epoch=3",
                  "--model.backbone.hidden_channels=8", *(MAMLPP if mamlpp else []),
                  "--model.algorithm.init_args.eval_inner_steps=2",
                  "--trainer.max_steps=3", f"--trainer.default_root_dir={directory}",
                  f"--trainer.logger.init_args.save_dir={directory}",
                  "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"])
        _cache[key] = directory / "lightning_logs" / "version_0"
    return _cache[key]


def write_task(fake_root: Path, directory: Path, ways: int, shots: list[int] | int,
               queries: int = 2) -> tuple[Path, Path]:
    """``directory/support/class_i/*.png`` and ``directory/query/*.png`` from fake evaluation
    characters (the raw PNGs: dark strokes on white, as a user would have them)."""
    shots = [shots] * ways if isinstance(shots, int) else shots
    with zipfile.ZipFile(fake_root / "images_evaluation.zip") as archive:
        members: dict[str, list[str]] = {}
        for name in sorted(archive.namelist()):
            if name.endswith(".png"):
                members.setdefault(name.rsplit("/", 1)[0], []).append(name)
        characters = list(members.values())[:ways]
        support, query = directory / "support", directory / "query"
        query.mkdir(parents=True)
        for index, (images, k) in enumerate(zip(characters, shots, strict=True)):
            (support / f"class_{index}").mkdir(parents=True)
            for name in images[:k]:
                (support / f"class_{index}" / Path(name).name).write_bytes(archive.read(name))
            for name in images[k:k + queries]:
                (query / Path(name).name).write_bytes(archive.read(name))
    return support, query


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
