"""Run here (with network) before the GPU run: everything the offline GPU machine lacks.

    python benchmarks/gpu/prepare.py

Fills ``.bench-deps/`` (git-ignored), the folder to name in the device tool's ``carry``:

- ``wheels/``: pure-Python wheels of fewshot's dependencies that the GPU image does not ship
  (jsonargparse and its ``signatures`` extras; torch, Lightning, NumPy, Pillow, rich,
  TensorBoard, safetensors and matplotlib are there), at the versions installed here;
- ``site/``: learn2learn's MAML (shim, from the source archive) and higher, for meta_step.py;
- ``omniglot/``: the two Omniglot archives (``../shared/data/omniglot``) for the accuracy run.

Then ``benchmarks/gpu/run.sh`` on the GPU machine installs the wheels offline and runs.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench_deps import DEPS, fetch, load_peers  # noqa: E402
from common import DEFAULT_OMNIGLOT  # noqa: E402

# Not in the GPU image (KINDS.md's package list); pure Python, one wheel each.
MISSING_ON_GPU = ("jsonargparse", "docstring_parser", "typeshed_client")


def download_wheels(into: Path) -> list[Path]:
    into.mkdir(parents=True, exist_ok=True)
    pins = [f"{name}=={version(name)}" for name in MISSING_ON_GPU]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                    "--only-binary", ":all:", "--python-version", "3.12", "--implementation", "py",
                    "--platform", "any", "-d", str(into), *pins], check=True)
    wheels = sorted(into.glob("*.whl"))
    names = {w.name.split("-")[0].lower() for w in wheels}
    missing = [n for n in MISSING_ON_GPU if n.lower() not in names]
    if missing:
        sys.exit(f"no wheel for {missing} in {into}")
    return wheels


def copy_omniglot(source: Path, into: Path) -> None:
    into.mkdir(parents=True, exist_ok=True)
    for name in ("images_background.zip", "images_evaluation.zip"):
        if not (into / name).exists():
            shutil.copy2(source / name, into / name)


def main() -> None:
    fetch()
    peers, missing = load_peers()
    if missing:
        sys.exit("; ".join(missing))
    wheels = download_wheels(DEPS / "wheels")
    copy_omniglot(Path(DEFAULT_OMNIGLOT), DEPS / "omniglot")
    size = sum(f.stat().st_size for f in DEPS.rglob("*") if f.is_file() and "dist" not in f.parts)
    print(f"{DEPS}: wheels {[w.name for w in wheels]}, peers {sorted(peers)}, Omniglot archives; "
          f"{size / 2**20:.1f} MiB to carry (dist/ is not needed there)")


if __name__ == "__main__":
    main()
