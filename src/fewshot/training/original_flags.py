"""The original Lightning MAML project's command line, translated to fewshot's options.

Its README ran ``python training/run_experiment.py --gpus=-1 --wandb --data_class=MiniImagenet
--model_class=ResNetClassifier --num_workers=6 --accelerator=ddp --val_check_interval=5
--batch_size=3 --inner_loop_steps=1 --support_samples=5 --track_grad_norm=2``: flat flags, in
the ``--flag=value`` or ``--flag value`` form, Lightning 1.x Trainer flags among them. Each is
rewritten here into the LightningCLI option it means (README, "The original project's command
line"); everything else passes through untouched.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
from collections.abc import Sequence
from pathlib import Path

import yaml
from lightning.pytorch import Trainer

from fewshot.data.registry import DATASETS
from fewshot.models.registry import BACKBONES

# Flags that take a value and have a fixed fewshot option.
RENAMED = {
    "--episode_classes": "--data.ways",
    "--support_samples": "--data.shots",
    "--query_samples": "--data.queries",
    "--batch_size": "--data.meta_batch_size",
    "--num_workers": "--data.num_workers",
    "--inner_loop_steps": "--model.algorithm.init_args.inner_steps",
    "--track_grad_norm": "--grad_monitor.norm_type",
}
# Flags whose value is translated too (see the functions below).
TRANSLATED = ("--gpus", "--data_class", "--model_class", "--accelerator")
# Lightning 1.x's ``Trainer.add_argparse_args`` made every Trainer argument a top-level flag
# (``--val_check_interval=5``, ``--max_epochs``, ...); they are ``--trainer.<name>`` now.
TRAINER_FLAGS = frozenset(
    f"--{name}" for name in inspect.signature(Trainer.__init__).parameters if name != "self")
SWITCHES = ("--wandb",)  # flags of the original project that took no value

# Lightning 1.x's --accelerator named the distributed mode; Lightning 2's names the hardware.
_STRATEGIES = ("ddp", "ddp_spawn", "ddp_fork", "ddp_notebook", "ddp2", "dp", "deepspeed",
               "fsdp", "horovod")
# The original project's model classes, and names people use for the two backbones.
_BACKBONE_NAMES = {
    "resnetclassifier": "fewshot.models.ResNet12", "resnet12": "fewshot.models.ResNet12",
    "resnet": "fewshot.models.ResNet12",
    "convclassifier": "fewshot.models.Conv4", "conv4": "fewshot.models.Conv4",
    "convnet": "fewshot.models.Conv4", "cnn": "fewshot.models.Conv4",
}
WANDB_INSTALL = "pip install 'fewshot[wandb]' (or: pip install wandb)"


def _squashed(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "")


def dataset_options(value: str) -> list[str]:
    """``--data_class=MiniImagenet`` -> the dataset and its native image size and channels."""
    by_name = {_squashed(name): name for name in DATASETS}
    name = by_name.get(_squashed(value))
    if name is None:
        raise ValueError(f"--data_class={value}: unknown dataset; choose one of "
                         f"{', '.join(sorted(DATASETS))} (any case, MiniImagenet works)")
    defaults = inspect.signature(DATASETS[name].__init__).parameters
    return [f"--data.dataset={name}", f"--data.image_size={defaults['image_size'].default}",
            f"--data.channels={defaults['channels'].default}"]


def backbone_option(value: str) -> str:
    """``--model_class=ResNetClassifier`` -> ``--model.backbone=fewshot.models.ResNet12``."""
    if value in BACKBONES:
        return f"--model.backbone={value}"
    class_path = _BACKBONE_NAMES.get(_squashed(value))
    if class_path is None:
        known = sorted({*_BACKBONE_NAMES, *BACKBONES})
        raise ValueError(f"--model_class={value}: unknown model; choose one of {', '.join(known)}")
    return f"--model.backbone={class_path}"


def gpu_options(value: str) -> list[str]:
    """``--gpus``: 0 is the CPU, -1 every GPU, N the first N GPUs, ``0,1`` or ``[0,1]`` those."""
    text = value.strip()
    try:
        devices = json.loads(text if not text or text[0] == "[" else f"[{text}]")
    except json.JSONDecodeError:
        devices = None
    if not isinstance(devices, list) or not all(isinstance(d, int) for d in devices) or not devices:
        raise ValueError(f"--gpus={value}: give 0 (CPU), -1 (every GPU), a number of GPUs, or a "
                         "list of GPU indices such as 0,1")
    if text.startswith("[") or "," in text:  # a list of GPU indices
        return ["--trainer.accelerator=gpu", f"--trainer.devices={json.dumps(devices)}"]
    if devices[0] == 0:
        return ["--trainer.accelerator=cpu"]
    return ["--trainer.accelerator=gpu", f"--trainer.devices={devices[0]}"]


def accelerator_option(value: str) -> str:
    """Lightning 1.x's ``--accelerator=ddp`` is a strategy; ``cpu``/``gpu`` are hardware."""
    if value.split("_find_unused")[0] in _STRATEGIES:
        return f"--trainer.strategy={value}"
    return f"--trainer.accelerator={value}"


def wandb_options() -> list[str]:
    """``--wandb``: log to Weights & Biases and keep fewshot's CSV + TensorBoard run folder
    (first, so the run folder and ``fewshot report`` stay where they are)."""
    if importlib.util.find_spec("wandb") is None:
        raise ValueError(f"--wandb needs the wandb package: {WANDB_INSTALL}")
    # Both write under --trainer.default_root_dir (runs/ by default).
    loggers = [{"class_path": "fewshot.training.loggers.RunLogger"},
               {"class_path": "lightning.pytorch.loggers.WandbLogger",
                "init_args": {"project": "fewshot"}}]
    return [f"--trainer.logger={json.dumps(loggers)}"]


def translate(flag: str, value: str) -> list[str]:
    if flag == "--gpus":
        return gpu_options(value)
    if flag == "--data_class":
        return dataset_options(value)
    if flag == "--model_class":
        return [backbone_option(value)]
    if flag == "--accelerator":
        return [accelerator_option(value)]
    if flag in RENAMED:
        return [f"{RENAMED[flag]}={value}"]
    return [f"--trainer.{flag[2:]}={value}"]  # a Lightning 1.x Trainer flag


def _configs_name_an_algorithm(argv: Sequence[str]) -> bool:
    for flag, value in zip(argv, [*argv[1:], None], strict=True):
        if flag.startswith("--config="):
            flag, value = "--config", flag.partition("=")[2]
        if flag in ("-c", "--config") and value is not None and Path(value).is_file():
            try:
                config = yaml.safe_load(Path(value).read_text()) or {}
            except (OSError, UnicodeDecodeError, yaml.YAMLError):
                return True  # check_config_files names the file; do not guess here
            model = config.get("model") if isinstance(config, dict) else None
            if isinstance(model, dict) and model.get("algorithm") is not None:
                return True
    return False


def _algorithm_options_without_class(argv: Sequence[str]) -> bool:
    """Whether algorithm options are given but no class names the algorithm: the parser has
    no default class (jsonargparse would carry a default's arguments over to another class
    named later), so MAML, the default algorithm, is named for them."""
    flags = [a.partition("=")[0] for a in argv]
    options = any(f.startswith("--model.algorithm.") for f in flags)
    return options and "--model.algorithm" not in flags and not _configs_name_an_algorithm(argv)


def _takes_value(flag: str) -> bool:
    return flag in RENAMED or flag in TRANSLATED or flag in TRAINER_FLAGS


def translate_original_flags(argv: Sequence[str]) -> list[str]:
    """``--episode_classes=20`` -> ``--data.ways=20``, ``--gpus -1`` ->
    ``--trainer.accelerator=gpu --trainer.devices=-1``, and the other flags of the original
    project, in either form; fewshot's own options pass through unchanged."""
    translated: list[str] = []
    arguments = list(argv)
    i = 0
    while i < len(arguments):
        argument = arguments[i]
        flag, separator, value = argument.partition("=")
        i += 1
        if flag in SWITCHES and not separator:
            translated += wandb_options()
        elif _takes_value(flag):
            if not separator:  # the space form: the value is the next argument
                lone_switch = i == len(arguments) or arguments[i].startswith("--")
                if lone_switch and flag in TRAINER_FLAGS and flag not in TRANSLATED:
                    value = "true"  # Lightning 1.x took --fast_dev_run alone as true
                elif i == len(arguments):
                    raise ValueError(f"{flag} needs a value")
                else:
                    value, i = arguments[i], i + 1
            translated += translate(flag, value)
        else:
            translated.append(argument)
    if _algorithm_options_without_class(translated):
        # MAML's options (the original project's --inner_loop_steps among them) given without
        # an algorithm class: the class must come first, right after the subcommand.
        at = next((i + 1 for i, a in enumerate(translated) if a in ("fit", "validate", "test")), 0)
        translated.insert(at, "--model.algorithm=fewshot.algorithms.MAML")
    return translated


def translation_table() -> list[tuple[str, str]]:
    """(original flag, fewshot option) for the README and ``--help``."""
    rows = [(flag, option) for flag, option in RENAMED.items()]
    rows += [("--gpus", "--trainer.accelerator, --trainer.devices"),
             ("--data_class", "--data.dataset, --data.image_size, --data.channels"),
             ("--model_class", "--model.backbone"),
             ("--accelerator=ddp", "--trainer.strategy=ddp"),
             ("--wandb", "--trainer.logger=[RunLogger, WandbLogger]"),
             ("--<Trainer argument>", "--trainer.<Trainer argument>")]
    return rows
