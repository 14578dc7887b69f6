"""Models shipped inside the package, loadable by name and offline right after installation:

    fewshot adapt --checkpoint omniglot-5way-1shot --support my_task/ --query new/
    learner = fewshot.load("omniglot-5way-1shot")

Each is an export folder (``model.safetensors``, ``fewshot.json`` and its model card
``README.md``) made by a script in the repository (``tools/pretrain_omniglot.py``).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["PRETRAINED_FOLDER", "pretrained_names", "pretrained_path"]

PRETRAINED_FOLDER = Path(__file__).resolve().parent


def pretrained_names() -> list[str]:
    """Names of the shipped models."""
    return sorted(p.name for p in PRETRAINED_FOLDER.iterdir()
                  if p.is_dir() and (p / "fewshot.json").is_file())


def pretrained_path(name: str) -> Path | None:
    """The export folder of the shipped model ``name``, or None."""
    folder = PRETRAINED_FOLDER / name
    return folder if "/" not in name and (folder / "fewshot.json").is_file() else None
