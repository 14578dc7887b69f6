"""The public mirror of the few-shot benchmarks' files: Zenodo record 7978538, which
learn2learn downloads from (mini-ImageNet, tiered-ImageNet and FC100 pickles).

``$FEWSHOT_MIRROR_URL`` replaces the base URL, for a copy of the record on a local server or
an institution's mirror (the file names stay the same).
"""

from __future__ import annotations

import os
from pathlib import Path

from fewshot.data.download import check_download, download_resumable

__all__ = ["MIRROR_ENV", "MIRROR_URL", "download_from_mirror", "mirror_url"]

MIRROR_URL = "https://zenodo.org/record/7978538/files"
MIRROR_ENV = "FEWSHOT_MIRROR_URL"


def mirror_url(filename: str) -> str:
    """The URL of ``filename`` on the mirror (``$FEWSHOT_MIRROR_URL`` if set)."""
    return f"{os.environ.get(MIRROR_ENV) or MIRROR_URL}".rstrip("/") + f"/{filename}"


def download_from_mirror(filenames: list[str], folder: Path) -> list[Path]:
    """Fetch each of ``filenames`` into ``folder`` unless already there (resuming ``.part``
    files), and check the ones already there against the SHA-256 recorded at download."""
    paths = []
    for name in filenames:
        path = folder / name
        if path.is_file():
            check_download(path)
        else:
            download_resumable(mirror_url(name), path)
        paths.append(path)
    return paths
