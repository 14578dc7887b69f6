"""Backbones by name: what a command line may choose and what a file may ask to rebuild.

A plain dict, so a name read from an untrusted file is looked up, never imported. A backbone
of the user's own is one :func:`register_backbone` call away from being exported, loaded and
adapted like the built-in ones.
"""

from __future__ import annotations

import inspect
from functools import partial
from typing import Any

from torch import nn

from fewshot.models.batch_norm import TransductiveBatchNorm2d
from fewshot.models.conv4 import Conv4
from fewshot.models.mlp import MLP
from fewshot.models.resnet12 import ResNet12

BACKBONES: dict[str, type[nn.Module]] = {}
NORM_LAYERS: dict[str, type[nn.Module]] = {
    "fewshot.models.TransductiveBatchNorm2d": TransductiveBatchNorm2d,
    "fewshot.models.batch_norm.TransductiveBatchNorm2d": TransductiveBatchNorm2d,
    "torch.nn.BatchNorm2d": nn.BatchNorm2d,
    "torch.nn.modules.batchnorm.BatchNorm2d": nn.BatchNorm2d,
}


class BackboneError(ValueError):
    """A backbone description that fewshot cannot or will not rebuild."""


def register_backbone(cls: type[nn.Module], *aliases: str) -> type[nn.Module]:
    """Let files name ``cls`` (by its import path and any ``aliases``).

    ``cls`` must keep each constructor argument as an attribute of the same name (numbers,
    strings, lists of numbers, or a norm layer from :data:`NORM_LAYERS`), so that a trained
    model can say how to build it again, and have an ``out_features`` attribute.
    """
    for name in (f"{cls.__module__}.{cls.__qualname__}", *aliases):
        BACKBONES[name] = cls
    return cls


register_backbone(Conv4, "fewshot.models.Conv4")
register_backbone(ResNet12, "fewshot.models.ResNet12")
register_backbone(MLP, "fewshot.models.MLP")


def _norm_settings(norm_layer: Any) -> dict[str, Any]:
    init_args: dict[str, Any] = {}
    if isinstance(norm_layer, partial):
        init_args = dict(norm_layer.keywords)
        # LightningCLI (jsonargparse) hands over
        # partial(call_without_instantiate_context, instantiator, cls, **init_args).
        classes = [a for a in norm_layer.args if isinstance(a, type)]
        norm_layer = (norm_layer.func if isinstance(norm_layer.func, type) or not classes
                      else classes[-1])
    name = f"{norm_layer.__module__}.{norm_layer.__qualname__}"
    if NORM_LAYERS.get(name) is not norm_layer:
        raise BackboneError(f"norm layer {name} is not one fewshot rebuilds from a file; "
                            f"known: {sorted(NORM_LAYERS)}")
    return {"class_path": name, "init_args": init_args} if init_args else {"class_path": name}


def backbone_settings(backbone: nn.Module) -> dict[str, Any]:
    """``{"class_path", "init_args"}`` that :func:`build_backbone` turns back into ``backbone``.

    Raises:
        BackboneError: the class is not registered, or does not keep its arguments.
    """
    cls = type(backbone)
    name = f"{cls.__module__}.{cls.__qualname__}"
    if BACKBONES.get(name) is not cls:
        raise BackboneError(
            f"backbone {name} is not registered: call fewshot.models.register_backbone({cls.__name__}) "
            "so that a trained model can name it")
    init_args = {}
    for arg, parameter in inspect.signature(cls.__init__).parameters.items():
        if arg == "self" or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        if not hasattr(backbone, arg):
            raise BackboneError(f"backbone {name} does not keep its argument {arg!r} as an "
                                "attribute, so it cannot be described for rebuilding")
        value = getattr(backbone, arg)
        init_args[arg] = _norm_settings(value) if arg == "norm_layer" else (
            list(value) if isinstance(value, tuple) else value)
    _check_plain(init_args, "backbone")
    return {"class_path": name, "init_args": init_args}


def build_backbone(spec: Any) -> nn.Module:
    """``{"class_path": one of BACKBONES, "init_args": {...}}`` -> the backbone module."""
    cls, init_args = _lookup(spec, BACKBONES, "backbone")
    args = {}
    for name, value in init_args.items():
        if name == "norm_layer":
            norm_cls, norm_args = _lookup(value, NORM_LAYERS, "norm_layer")
            _check_plain(norm_args, "norm_layer")
            args[name] = partial(norm_cls, **norm_args) if norm_args else norm_cls
        else:
            _check_plain({name: value}, "backbone")
            args[name] = value
    try:
        return cls(**args)
    except TypeError as error:
        raise BackboneError(f"cannot build backbone {spec.get('class_path')}: {error}") from error


def _lookup(spec: Any, allowed: dict[str, type[nn.Module]], what: str) -> tuple[type, dict]:
    if isinstance(spec, str):
        spec = {"class_path": spec}
    if not isinstance(spec, dict) or not isinstance(spec.get("init_args", {}), dict):
        raise BackboneError(f"{what} must be {{\"class_path\": ..., \"init_args\": {{...}}}}, got {spec!r}")
    class_path = spec.get("class_path")
    if class_path not in allowed:
        raise BackboneError(
            f"{what} {class_path!r} is not one fewshot rebuilds from a file (it never imports a "
            f"class a file names; register your own with fewshot.models.register_backbone); "
            f"known: {sorted(allowed)}")
    return allowed[class_path], dict(spec.get("init_args") or {})


def _check_plain(values: dict[str, Any], what: str) -> None:
    scalar = (bool, int, float, str, type(None))
    for name, value in values.items():
        if name == "norm_layer" and isinstance(value, dict):
            continue
        # Lists of numbers (ResNet-12's channel widths) come back from JSON as lists.
        if isinstance(value, list) and all(isinstance(v, scalar) for v in value):
            continue
        if not isinstance(value, scalar):
            raise BackboneError(f"{what} setting {name!r} must be a number, string, list of "
                                f"numbers or null, got {value!r}")
