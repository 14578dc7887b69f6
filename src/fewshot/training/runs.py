"""Finished runs as values: what ``fewshot report`` and ``fewshot summary`` read from a run folder.

A run folder (``runs/lightning_logs/version_N``) holds ``metrics.csv`` (one row per logged
step), ``config.yaml`` and, after testing, ``test_results.json``. :func:`read_run` gathers
what comparisons need: the logged series, the test result, the seed, the meta-iterations
trained and the wall time (``train/elapsed_s``, logged every step).
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

Series = dict[str, list[tuple[int, float]]]


def read_metrics(path: Path) -> Series:
    """``metrics.csv`` as ``{column: [(step, value), ...]}`` without the empty cells."""
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    with path.open() as f:
        for row in csv.DictReader(f):
            step = int(float(row.get("step") or 0))
            for name, value in row.items():
                if name not in ("step", "epoch") and value not in ("", None):
                    series[name].append((step, float(value)))
    return dict(series)


def find_run(folder: Path) -> Path:
    """The run folder itself, or the newest ``version_N`` below it."""
    if (folder / "metrics.csv").exists():
        return folder
    runs = sorted(folder.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise FileNotFoundError(f"no metrics.csv in {folder} or below it: is it a fewshot run folder?")
    return runs[-1].parent


def find_runs(folders: Sequence[Path]) -> list[Path]:
    """Every run folder (one holding ``metrics.csv``) in or below ``folders``, in order; a
    folder without any is an error naming it."""
    runs: list[Path] = []
    for folder in folders:
        if not folder.exists():
            raise FileNotFoundError(f"run folder {folder} does not exist")
        found = ([folder] if (folder / "metrics.csv").exists()
                 else sorted(p.parent for p in folder.rglob("metrics.csv")))
        if not found:
            raise FileNotFoundError(f"no metrics.csv in {folder} or below it: is it a fewshot run folder?")
        runs += [run for run in found if run not in runs]
    return runs


@dataclass
class Run:
    """What comparisons need of one finished (or stopped) run."""

    folder: Path
    label: str
    series: Series
    test: dict[str, Any] | None
    config: dict[str, Any] | None

    @property
    def seed(self) -> int | None:
        seed = (self.config or {}).get("seed_everything")
        return seed if isinstance(seed, int) and not isinstance(seed, bool) else None

    @property
    def training(self) -> dict[str, Any]:
        """What ``test_results.json`` recorded of the training (``meta_iterations``,
        ``wall_time_s``), if anything."""
        return (self.test or {}).get("training") or {}

    @property
    def meta_iterations(self) -> int:
        """Meta-iterations trained: as recorded at test time, else from the logged steps."""
        if self.training.get("meta_iterations"):
            return int(self.training["meta_iterations"])
        train = [s + 1 for name, values in self.series.items() if name.startswith("train/")
                 for s, _ in values]
        other = [s for values in self.series.values() for s, _ in values]
        return max(train + other, default=0)

    @property
    def wall_time_s(self) -> float | None:
        """Wall seconds of meta-training (validation included): the latest ``train/elapsed_s``
        or ``val/elapsed_s`` logged, else as recorded at test time; None without either.

        The log comes first: it is written while training, whereas ``test_results.json`` of
        runs made before the clock was fixed counted the test after fit, or turned back to the
        time of the best checkpoint that the test loaded."""
        elapsed = [v for name in ("train/elapsed_s", "val/elapsed_s")
                   for _, v in self.series.get(name, [])]
        if elapsed:
            return max(elapsed)
        if self.training.get("wall_time_s") is not None:
            return float(self.training["wall_time_s"])
        return None

    def at_time(self, name: str) -> list[tuple[float, float]]:
        """``(seconds, value)`` of a series: each step's time is that of the nearest step at or
        before it with a logged time."""
        times = sorted(self.series.get("train/elapsed_s", []) + self.series.get("val/elapsed_s", []))
        points = []
        for step, value in self.series.get(name, []):
            before = [t for s, t in times if s <= step]
            if before:
                points.append((before[-1], value))
        return points


def read_run(folder: Path, label: str | None = None) -> Run:
    folder = find_run(folder)
    test_path, config_path = folder / "test_results.json", folder / "config.yaml"
    return Run(folder=folder, label=label or folder.name,
               series=read_metrics(folder / "metrics.csv"),
               test=json.loads(test_path.read_text()) if test_path.exists() else None,
               config=yaml.safe_load(config_path.read_text()) if config_path.exists() else None)


def short_labels(folders: Sequence[Path]) -> list[str]:
    """Labels that tell runs apart: their paths without the parts all of them share
    (``runs/seeds/cfg/seed_0/lightning_logs/version_0`` -> ``seed_0``)."""
    parts = [Path(f).resolve().parts for f in folders]
    if len(parts) == 1:
        return [Path(folders[0]).name]
    prefix = 0
    while all(len(p) > prefix + 1 for p in parts) and len({p[prefix] for p in parts}) == 1:
        prefix += 1
    suffix = 0
    while (all(len(p) > prefix + suffix + 1 for p in parts)
           and len({p[-1 - suffix] for p in parts}) == 1):
        suffix += 1
    return ["/".join(p[prefix:len(p) - suffix]) for p in parts]


def read_runs(folders: Sequence[Path]) -> list[Run]:
    """The runs in or below ``folders``, labelled by what tells them apart."""
    runs = find_runs(folders)
    return [read_run(run, label) for run, label in zip(runs, short_labels(runs), strict=True)]
