"""A task of real Omniglot characters the shipped model never saw (the test part of MAML's class
split), written as ``support/<character>/*.png`` and ``query/<character>/*.png``, the folder
layout ``fewshot adapt`` reads. Used by the browser tests and ``benchmarks/app_latency.py``."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np

OMNIGLOT = Path(os.environ.get("FEWSHOT_OMNIGLOT_ROOT",
                               Path(__file__).resolve().parents[3] / "shared" / "data" / "omniglot"))


def have_omniglot(root: Path = OMNIGLOT) -> bool:
    return all((root / f"{part}.zip").is_file() for part in ("images_background", "images_evaluation"))


def write_omniglot_task(folder: Path, ways: int = 5, shots: int = 1, queries: int = 5,
                        seed: int = 0, root: Path = OMNIGLOT) -> tuple[Path, Path]:
    """Write one ``ways``-way task of test-split characters under ``folder``: ``shots`` drawings
    per character in ``support/``, ``queries`` other drawings of it in ``query/``. Returns the
    two folders. Characters are named ``<alphabet>_<character>``."""
    from fewshot.data.omniglot import Omniglot

    members: dict[str, list[tuple[zipfile.ZipFile, str]]] = {}
    names: list[str] = []
    n_background = 0
    for part in ("images_background", "images_evaluation"):
        archive = zipfile.ZipFile(root / f"{part}.zip")
        characters = set()
        for name in archive.namelist():
            if name.endswith(".png"):
                character = "/".join(name.split("/")[1:3])
                characters.add(character)
                members.setdefault(character, []).append((archive, name))
        names += sorted(characters)
        n_background = n_background or len(names)
    # The test characters as the data module chooses them (without decoding every image).
    chosen = Omniglot._select(SimpleNamespace(split="test", maml_split_sizes=Omniglot.maml_split_sizes),
                              names, n_background, "maml", 0)
    test_characters = [names[i] for i in chosen]
    rng = np.random.default_rng(seed)
    support, query = folder / "support", folder / "query"
    for index in rng.choice(len(test_characters), size=ways, replace=False):
        character = test_characters[index]
        drawings = sorted(members[character], key=lambda member: member[1])
        picks = rng.choice(len(drawings), size=shots + queries, replace=False)
        label = character.replace("/", "_")
        for k, pick in enumerate(picks):
            archive, name = drawings[pick]
            target = (support if k < shots else query) / label / Path(name).name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.read(name))
    return support, query
