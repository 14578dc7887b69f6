"""The shipped configs, by name: ``fewshot fit -c omniglot_5way_1shot_cpu`` from any folder.

The YAML files live in this package (the repository's ``configs/`` points here), so an
installed wheel has them. ``fewshot configs`` lists them with the first sentence of each
file's leading comment.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["CONFIG_FOLDER", "config_names", "config_path", "describe_config"]

CONFIG_FOLDER = Path(__file__).resolve().parent


def config_names() -> list[str]:
    """Names of the shipped configs (file names without ``.yaml``), sorted."""
    return sorted(p.stem for p in CONFIG_FOLDER.glob("*.yaml"))


def config_path(name: str) -> Path | None:
    """The shipped config called ``name`` (with or without ``.yaml``), or None."""
    stem = name[:-5] if name.endswith(".yaml") else name
    path = CONFIG_FOLDER / f"{stem}.yaml"
    return path if "/" not in stem and path.is_file() else None


def describe_config(name: str, width: int = 100) -> str:
    """The first clause of the config's leading comment block, at most ``width`` characters."""
    path = config_path(name)
    lines = []
    for line in (path.read_text().splitlines() if path else []):
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    text = _first_clause(" ".join(lines))
    if len(text) > width:
        text = text[:width - 3].rsplit(" ", 1)[0] + "..."
    return text


def _first_clause(text: str) -> str:
    """Up to the first ". " or ": " outside parentheses."""
    depth = 0
    for i, char in enumerate(text):
        depth += (char == "(") - (char == ")")
        if depth == 0 and char in ".:" and text[i + 1:i + 2] in (" ", ""):
            return text[:i]
    return text
