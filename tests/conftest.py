"""Shared fixtures: a small fake Omniglot in the exact on-disk format of the official archives."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fewshot.data.omniglot import Omniglot


def _png(rng: np.random.Generator) -> bytes:
    # Sparse black strokes on white, like the real scans; random so no image has symmetries.
    pixels = rng.random((105, 105)) > 0.15
    buf = io.BytesIO()
    Image.fromarray(pixels).convert("1").save(buf, format="PNG")
    return buf.getvalue()


def make_fake_omniglot(
    root: str | Path,
    n_background_alphabets: int = 2,
    n_evaluation_alphabets: int = 1,
    characters_per_alphabet: int = 3,
    images_per_character: int = 20,
    as_zip: bool = True,
    seed: int = 0,
) -> dict[str, int]:
    """Write images_background/evaluation (zips or folders) under ``root``.

    Returns the number of characters per part, to monkeypatch ``Omniglot.expected_characters``.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    counts = {}
    alphabets = {"images_background": n_background_alphabets,
                 "images_evaluation": n_evaluation_alphabets}
    for part, n_alphabets in alphabets.items():
        entries: list[tuple[str, bytes | None]] = [(f"{part}/", None)]
        for a in range(n_alphabets):
            alphabet = f"{part[7:].capitalize()}_Script_{a}"
            entries.append((f"{part}/{alphabet}/", None))
            for c in range(1, characters_per_alphabet + 1):
                folder = f"{part}/{alphabet}/character{c:02d}/"
                entries.append((folder, None))
                drawing = 100 * a + c
                entries += [(f"{folder}{drawing:04d}_{i:02d}.png", _png(rng))
                            for i in range(1, images_per_character + 1)]
        counts[part] = n_alphabets * characters_per_alphabet
        if as_zip:
            with zipfile.ZipFile(root / f"{part}.zip", "w") as zf:
                for name, data in entries:
                    zf.writestr(name, data if data is not None else b"")
        else:
            for name, data in entries:
                if data is None:
                    (root / name).mkdir(parents=True, exist_ok=True)
                else:
                    (root / name).write_bytes(data)
    return counts


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory,
                    monkeypatch: pytest.MonkeyPatch) -> None:
    # Never let a test read or write the user's real ~/.cache/fewshot.
    monkeypatch.setenv("FEWSHOT_CACHE_DIR", str(tmp_path_factory.mktemp("default-cache")))


@pytest.fixture
def fake_counts(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Make Omniglot accept the default-sized fake (6 background + 3 evaluation characters)."""
    counts = {"images_background": 6, "images_evaluation": 3}
    monkeypatch.setattr(Omniglot, "expected_characters", counts)
    monkeypatch.setattr(Omniglot, "maml_split_sizes", (5, 2, 2))
    return counts


@pytest.fixture
def fake_root(tmp_path: Path, fake_counts: dict[str, int]) -> Path:
    root = tmp_path / "omniglot"
    assert make_fake_omniglot(root) == fake_counts
    return root


@pytest.fixture
def fake_omniglot_maker() -> Callable[..., dict[str, int]]:
    """``make_fake_omniglot`` for test modules (conftest modules are not importable by name)."""
    return make_fake_omniglot


# Large enough for 5-way tasks on every maml split (rotations are off for val/test).
SHARED_FAKE = {"n_background_alphabets": 3, "n_evaluation_alphabets": 2,
               "characters_per_alphabet": 5}


@pytest.fixture(scope="session")
def _shared_fake_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    root = tmp_path_factory.mktemp("fake-omniglot")
    return root, make_fake_omniglot(root, **SHARED_FAKE)


@pytest.fixture
def fake_omniglot(_shared_fake_root: tuple[Path, dict[str, int]], monkeypatch: pytest.MonkeyPatch,
                  tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(root, cache_dir) of a 15 + 10 character fake that Omniglot accepts (maml 15/5/5).

    The root is shared by the session and must not be modified; the cache dir is fresh.
    """
    root, counts = _shared_fake_root
    monkeypatch.setattr(Omniglot, "expected_characters", counts)
    monkeypatch.setattr(Omniglot, "maml_split_sizes", (15, 5, 5))
    return root, tmp_path_factory.mktemp("fake-omniglot-cache")
