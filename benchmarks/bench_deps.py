"""The libraries fewshot is compared with, kept out of fewshot's own environment.

    python benchmarks/bench_deps.py          # fetch them into .bench-deps/ (git-ignored)

learn2learn 0.2.0 ships Cython extensions and a package ``__init__`` that imports all of them
(and gym, torchvision datasets, ...); its MAML needs none of that. From the source archive only
``algorithms/maml.py``, ``algorithms/base_learner.py`` and ``utils/__init__.py`` are copied into
a shim package whose other ``__init__`` files are empty. higher 0.2.1 is pure Python: its wheel
is unpacked as is. Both land under ``.bench-deps/site``, which :func:`load_peers` puts on
``sys.path``. Neither is a fewshot dependency: benchmarks that find them missing run without them.
"""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]
DEPS = REPO / ".bench-deps"
SITE = DEPS / "site"
LEARN2LEARN = "learn2learn==0.2.0"
HIGHER = "higher==0.2.1"
# The pieces of learn2learn's source that its MAML imports.
L2L_FILES = ("algorithms/maml.py", "algorithms/base_learner.py", "utils/__init__.py")


def download(requirement: str, into: Path, source: bool) -> Path:
    """``pip download`` one distribution without its dependencies; returns the file."""
    into.mkdir(parents=True, exist_ok=True)
    kind = ["--no-binary", ":all:"] if source else ["--only-binary", ":all:"]
    name = requirement.split("==")[0]
    found = sorted(into.glob(f"{name}-*"))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", *kind,
                        "-d", str(into), requirement], check=True)
        found = sorted(into.glob(f"{name}-*"))
    return found[0]


def install_learn2learn_shim(archive: Path, site: Path = SITE) -> None:
    """Copy learn2learn's MAML and what it imports into ``site/learn2learn`` (empty inits)."""
    package = site / "learn2learn"
    if package.exists():
        shutil.rmtree(package)
    with tarfile.open(archive) as tar:
        for relative in L2L_FILES:
            member = next(m for m in tar.getmembers() if m.name.endswith("learn2learn/" + relative))
            target = package / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(member).read())
    for init in (package / "__init__.py", package / "algorithms" / "__init__.py"):
        if not init.exists():
            init.write_text('"""Shim: only learn2learn.algorithms.maml (see benchmarks/bench_deps.py)."""\n')


def install_higher(wheel: Path, site: Path = SITE) -> None:
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)


def fetch(deps: Path = DEPS) -> None:
    """Download learn2learn's source archive and higher's wheel and lay them out under ``site``."""
    site = deps / "site"
    site.mkdir(parents=True, exist_ok=True)
    install_learn2learn_shim(download(LEARN2LEARN, deps / "dist", source=True), site)
    install_higher(download(HIGHER, deps / "dist", source=False), site)


def load_peers(site: Path = SITE) -> tuple[dict[str, ModuleType], list[str]]:
    """Import the comparison libraries from ``site``: ``({"learn2learn": maml module,
    "higher": higher}, [why each missing one is missing])``."""
    if site.is_dir() and str(site) not in sys.path:
        sys.path.insert(0, str(site))
    peers, missing = {}, []
    for name, module in (("learn2learn", "learn2learn.algorithms.maml"), ("higher", "higher")):
        try:
            peers[name] = importlib.import_module(module)
        except ImportError as error:
            missing.append(f"{name} not found ({error}); run python benchmarks/bench_deps.py")
    return peers, missing


if __name__ == "__main__":
    fetch()
    found, absent = load_peers()
    print(f"comparison libraries in {SITE}: {sorted(found)}" + (f"; missing: {absent}" if absent else ""))
