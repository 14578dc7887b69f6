"""What a result came from: seeds, data, checkpoint, test episodes, code and versions.

Recorded in ``test_results.json`` so that a number in a table can be traced back to the run,
the weights and the exact tasks that produced it, and checked by running it again.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import lightning
import torch

import fewshot
from fewshot.data.download import sha256sum
from fewshot.data.registry import class_split_for

PACKAGE = Path(fewshot.__file__).resolve().parent


def git_commit(folder: Path = PACKAGE) -> dict[str, Any] | None:
    """The commit of the checkout fewshot runs from (and whether it has uncommitted changes),
    or None for an installed package."""
    try:
        commit = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"],
                                capture_output=True, text=True, timeout=10, check=True)
        status = subprocess.run(["git", "-C", str(folder), "status", "--porcelain"],
                                capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit.stdout.strip(), "uncommitted_changes": bool(status.stdout.strip())}


def versions() -> dict[str, str]:
    return {"fewshot": fewshot.__version__, "torch": torch.__version__,
            "lightning": lightning.__version__, "python": platform.python_version()}


def provenance(trainer: Any) -> dict[str, Any]:
    """The provenance of the test a ``trainer`` just ran (see the module docstring)."""
    datamodule = getattr(trainer, "datamodule", None)
    data = dict(getattr(datamodule, "hparams", {}) or {})
    checkpoint = getattr(trainer, "ckpt_path", None)
    test_set = getattr(datamodule, "test_set", None)
    seed = os.environ.get("PL_GLOBAL_SEED")  # set by seed_everything (--seed_everything)
    dataset = data.get("dataset")
    # The split the test data actually used (Omniglot's None is "maml"), else the one asked.
    used_split = getattr(getattr(test_set, "dataset", None), "class_split", None)
    asked_split = class_split_for(dataset, data.get("class_split")) if dataset else None
    return {
        "seed_everything": int(seed) if seed is not None else None,
        "data_seed": data.get("seed"),
        "dataset": dataset,
        "class_split": str(used_split or asked_split or "the dataset's standard split"),
        "split_seed": data.get("split_seed"),
        "checkpoint": str(checkpoint) if checkpoint else None,
        "checkpoint_sha256": sha256sum(checkpoint) if checkpoint and Path(checkpoint).is_file()
        else None,
        "test_episodes_sha256": test_set.fingerprint() if hasattr(test_set, "fingerprint") else None,
        "git": git_commit(),
        "versions": versions(),
    }
