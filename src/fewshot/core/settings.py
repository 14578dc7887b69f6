"""Value objects that the command line injects by ``class_path`` and files record.

An algorithm, an inner optimizer, an executor or a backbone is built from its constructor
arguments and nothing else, so ``settings_of(obj)`` (its class path and those arguments) is
enough to build it again: checkpoints and exports store that, never a pickle.
"""

from __future__ import annotations

import inspect
from typing import Any


def class_path_of(obj: object) -> str:
    """``module.Class`` of ``obj``'s class, as ``--model.x`` and the registries spell it."""
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def settings_of(obj: object) -> dict[str, Any]:
    """``{"class_path": ..., "init_args": {...}}`` of an object whose constructor arguments
    are kept as attributes of the same names (every fewshot value object)."""
    init_args = {}
    for name, parameter in inspect.signature(type(obj).__init__).parameters.items():
        if name == "self" or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        value = getattr(obj, name)
        init_args[name] = settings_of(value) if hasattr(value, "settings") else _plain(value)
    return {"class_path": class_path_of(obj), "init_args": init_args}


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


class Settings:
    """Mixin: ``settings()``, equality and ``repr`` from the constructor arguments."""

    def settings(self) -> dict[str, Any]:
        return settings_of(self)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.settings() == self.settings()

    def __hash__(self) -> int:
        return hash(repr(self))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.settings()["init_args"].items())
        return f"{type(self).__name__}({args})"


def build_from_settings(spec: Any, known: dict[str, type], what: str) -> Any:
    """The object ``{"class_path", "init_args"}`` describes, its class looked up in ``known``
    (never imported: the settings may come from an untrusted file). Nested settings of known
    classes are built too; lists become tuples (JSON has no tuples)."""
    if isinstance(spec, str):
        spec = {"class_path": spec}
    if not isinstance(spec, dict) or not isinstance(spec.get("init_args") or {}, dict):
        raise ValueError(f"{what} must be {{\"class_path\": ..., \"init_args\": {{...}}}}, got {spec!r}")
    class_path = spec.get("class_path")
    # The package spelling configs use (fewshot.algorithms.MAML for fewshot.algorithms.maml.MAML).
    known = {**{f"{p.rsplit('.', 2)[0]}.{p.rsplit('.', 1)[1]}": c for p, c in known.items()
                if p.count(".") >= 2}, **known}
    if class_path not in known:
        raise ValueError(f"{what} {class_path!r} is not one fewshot knows; known: {sorted(known)}")
    init_args = {}
    for name, value in (spec.get("init_args") or {}).items():
        if isinstance(value, dict) and value.get("class_path") in known:
            value = build_from_settings(value, known, what)
        elif isinstance(value, list):
            value = tuple(value)
        init_args[name] = value
    try:
        return known[class_path](**init_args)
    except TypeError as error:
        raise ValueError(f"cannot build {what} {class_path}: {error}") from error
