"""The pinned requirements (pip-tools) say what pyproject.toml says, and pin every package."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11, as the pinned files
REPO = Path(__file__).resolve().parents[1]
FOLDER = REPO / "requirements"


def requirements_in(name: str) -> list[Requirement]:
    lines = (FOLDER / name).read_text().splitlines()
    return [Requirement(line.split("#")[0].strip()) for line in lines
            if line.split("#")[0].strip() and not line.startswith("-")]


def pins(name: str) -> dict[str, tuple[str, int]]:
    """``{package: (version, number of hashes)}`` of a compiled file."""
    text = (FOLDER / name).read_text()
    found = {}
    for block in re.split(r"\n(?=[a-z0-9])", text):
        match = re.match(r"([A-Za-z0-9_.\-]+)==([^\s\\;]+)", block)
        if match:
            found[canonicalize_name(match[1])] = (match[2], block.count("--hash=sha256:"))
    return found


def test_prod_in_is_pyprojects_dependencies():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    declared = {str(Requirement(r)) for r in pyproject["project"]["dependencies"]}
    assert {str(r) for r in requirements_in("prod.in")} == declared


def test_dev_in_holds_the_dev_and_wandb_extras():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    wanted = {canonicalize_name(Requirement(r).name) for r in extras["dev"] + extras["wandb"]}
    assert wanted <= {canonicalize_name(r.name) for r in requirements_in("dev.in")}


@pytest.mark.parametrize("name", ["prod", "dev"])
def test_every_requirement_is_pinned_with_hashes_and_torch_is_left_out(name):
    pinned = pins(f"{name}.txt")
    assert "torch" not in pinned and not any(p.startswith("nvidia-") for p in pinned)
    for requirement in requirements_in(f"{name}.in"):
        key = canonicalize_name(requirement.name)
        if key == "torch":
            continue
        version, hashes = pinned[key]
        assert requirement.specifier.contains(version, prereleases=True), (key, version)
    assert all(hashes >= 1 for _, hashes in pinned.values())


def test_dev_pins_agree_with_prod_pins():
    prod, dev = pins("prod.txt"), pins("dev.txt")
    assert {k: v[0] for k, v in dev.items() if k in prod} == {k: prod[k][0] for k in dev if k in prod}
