"""``fewshot fit --help``: one line per option, in groups, short enough to read.

LightningCLI's own help (``--help-all`` here) prints every option with its full docstring and
type, and lists every ``torch.nn`` class as a possible backbone: well over a thousand lines.
This one is generated from the same classes and docstrings (jsonargparse reads them), so it
cannot drift from what the parser accepts: the first sentence of each option's description,
its default, and the choices of closed sets (datasets, backbones, algorithms, ...).
"""

from __future__ import annotations

import re
import shutil
import textwrap
from typing import Any

from jsonargparse import ArgumentParser
from lightning.pytorch import Trainer

from fewshot.algorithms import ALGORITHMS
from fewshot.configs import config_names
from fewshot.core.inner_optimizers import INNER_OPTIMIZERS
from fewshot.data.registry import DATASETS, REGRESSION_DATASETS
from fewshot.execution import EXECUTORS
from fewshot.models import BACKBONES
from fewshot.training.callbacks import NonFinitePolicy
from fewshot.training.checkpoint_io import ResumableModelCheckpoint
from fewshot.training.datamodule import FewShotDataModule
from fewshot.training.module import MetaLearner
from fewshot.training.observability import MetaGradientMonitor

# The parts of the model chosen by class, and their registries (short names shown).
PARTS = {"backbone": BACKBONES, "algorithm": ALGORITHMS, "inner_optimizer": INNER_OPTIMIZERS,
         "executor": EXECUTORS}
# Options whose values form a closed set the docstring may not list.
CHOICES = {"data.dataset": sorted([*DATASETS, *REGRESSION_DATASETS])}
# Set by linking (data.ways -> model.ways, data.dataset -> model.task ...) or by the CLI
# itself: not options to give.
HIDDEN = {"model.ways", "model.task"}
TOP_LEVEL = [
    ("-c, --config FILE|NAME", "a YAML config, or the name of a shipped one "
                               f"({len(config_names())}: `fewshot configs` lists them)"),
    ("--print_config", "print the resulting config and exit"),
    ("--seed_everything INT", "seed of the weight initialisation (true: a random one)"),
    ("--ckpt_path PATH|last", "resume (fit) or evaluate (validate, test) this checkpoint"),
    ("--test_after_fit BOOL", "after fit, test the best checkpoint and print the accuracy"),
    ("--ensemble PATHS|top_k", "test an ensemble of checkpoints: probabilities averaged "
                               "(top_k: the run's best, --checkpoint.save_top_k)"),
    ("--wandb, --gpus, --data_class, ...", "the original project's flags (README table)"),
]
GROUPS = [
    ("model", "the model: parts chosen by class (--model.algorithm MAML), each with options",
     MetaLearner),
    ("data", "the data: dataset, task sizes, episodes", FewShotDataModule),
    ("trainer", "Lightning's Trainer", Trainer),
    ("checkpoint", "which checkpoints are kept (best by val/acc, and last)",
     ResumableModelCheckpoint),
    ("nonfinite", "what a NaN or Inf in the meta-loss or meta-gradient does", NonFinitePolicy),
    ("grad_monitor", "meta-gradient norms and histograms", MetaGradientMonitor),
]


def first_sentence(text: str | None) -> str:
    """The description's first sentence, on one line, without Sphinx markup."""
    text = re.sub(r"\s+", " ", text or "").strip()
    text = re.sub(r":\w+:`~?([^`]+)`", r"\1", text).replace("``", "")
    match = re.search(r"(?<![ .][a-z])(?<!e\.g)(?<!i\.e)\.(\s|$)", text)
    return (text[:match.start()] if match else text).strip()


def _short(class_path: str) -> str:
    return class_path.rpartition(".")[2]


def option_rows(prefix: str, cls: type) -> list[tuple[str, str, Any]]:
    """``(option, description, default)`` for every option ``cls`` gives under ``prefix``."""
    parser = ArgumentParser()
    parser.add_class_arguments(cls, prefix, fail_untyped=False, sub_configs=True)
    rows = []
    for action in parser._actions:
        dest = action.dest
        if (not action.option_strings or dest == prefix or dest.endswith(".help")
                or dest in HIDDEN or not dest.startswith(prefix + ".")):
            continue
        part = dest.partition(".")[2]
        description = first_sentence(action.help)
        if prefix == "model" and part in PARTS:
            names = sorted({cls.__name__ for cls in PARTS[part].values()})
            description = f"one of {', '.join(names)}; its options: --model.{part}.help CLASS"
        elif dest in CHOICES:
            description = f"{description}: {', '.join(CHOICES[dest])}"
        rows.append((f"--{dest}", description, action.default))
    return rows


def _default(value: Any) -> str:
    if isinstance(value, dict):
        value = _short(str(value.get("class_path", "")))
    if value is None or value == "" or callable(value) or type(value).__name__ == "Namespace":
        return ""
    return f" [{value}]"


def concise_help(subcommand: str, defaults: dict[str, Any] | None = None) -> str:
    """The help of ``fewshot <subcommand>`` (fit, validate or test); ``defaults`` are the CLI's
    own (``{"trainer.inference_mode": False, ...}``), shown instead of the classes'."""
    defaults = defaults or {}
    width = max(shutil.get_terminal_size((100, 20)).columns, 80)
    lines = [f"usage: fewshot {subcommand} [-c CONFIG|NAME] [--group.option VALUE ...]",
             "",
             "Meta-train (fit), or score validation/test episodes (validate, test), a few-shot",
             "classifier. Options come from a config file and the command line (later wins).",
             "Every option below, one line each; `fewshot fit --help-all` prints the full",
             "descriptions and types, `--model.algorithm.help MAML` one part's options.",
             "", "options:"]
    lines += [f"  {flag:<34} {text}" for flag, text in TOP_LEVEL]
    for prefix, title, cls in GROUPS:
        lines += ["", f"{prefix}: {title}"]
        for flag, description, default in option_rows(prefix, cls):
            default = defaults.get(flag[2:], default)
            text = f"{description}{_default(default)}"
            if len(flag) > 34:  # the description starts on the next line
                lines.append(f"  {flag}")
                flag = ""
            wrapped = textwrap.wrap(text, max(width - 38, 30)) or [""]
            lines.append(f"  {flag:<34}  {wrapped[0]}")
            lines += [f"  {'':<34}  {more}" for more in wrapped[1:]]
    return "\n".join(lines)
