"""`fewshot fit --help`: every option explained, closed sets with their choices, readable length."""

from __future__ import annotations

import pytest
from jsonargparse import ArgumentParser
from lightning.pytorch import Trainer

from fewshot.algorithms import ALGORITHMS
from fewshot.cli import main
from fewshot.core.inner_optimizers import INNER_OPTIMIZERS
from fewshot.data.registry import DATASETS
from fewshot.execution import EXECUTORS
from fewshot.models import BACKBONES
from fewshot.training.callbacks import NonFinitePolicy
from fewshot.training.checkpoint_io import ResumableModelCheckpoint
from fewshot.training.cli import HELP_DEFAULTS
from fewshot.training.datamodule import FewShotDataModule
from fewshot.training.help import GROUPS, HIDDEN, concise_help
from fewshot.training.loggers import RunLogger
from fewshot.training.module import MetaLearner
from fewshot.training.observability import MetaGradientMonitor
from fewshot.training.schedules import CosineAnnealing

CLASSES = sorted({MetaLearner, FewShotDataModule, NonFinitePolicy, MetaGradientMonitor,
                  RunLogger, CosineAnnealing, ResumableModelCheckpoint, Trainer,
                  *ALGORITHMS.values(), *INNER_OPTIMIZERS.values(), *EXECUTORS.values(),
                  *BACKBONES.values()}, key=lambda cls: f"{cls.__module__}.{cls.__name__}")


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.__name__)
def test_every_option_has_a_description(cls):
    """Walks the parser jsonargparse builds for each class the CLI can instantiate (the model's
    parts included) and fails on an option whose docstring says nothing about it."""
    parser = ArgumentParser()
    parser.add_class_arguments(cls, "x", fail_untyped=False, sub_configs=True)
    options = [a for a in parser._actions
               if a.option_strings and a.dest != "x" and not a.dest.endswith(".help")]
    assert options
    undocumented = [a.dest for a in options if not (a.help or "").strip()]
    assert not undocumented, f"{cls.__name__}: {undocumented}"


def test_the_concise_help_lists_every_option_in_under_300_lines(capsys):
    main(["fit", "--help"])
    text = capsys.readouterr().out
    assert text.strip() == concise_help("fit", HELP_DEFAULTS)
    lines = text.splitlines()
    assert len(lines) < 300
    for prefix, _, cls in GROUPS:
        parser = ArgumentParser()
        parser.add_class_arguments(cls, prefix, fail_untyped=False, sub_configs=True)
        for action in parser._actions:
            if action.dest.startswith(prefix + ".") and not action.dest.endswith(".help") \
                    and action.dest not in HIDDEN:
                assert f"--{action.dest} " in text or f"--{action.dest}\n" in text, action.dest
    backbone = next(line for line in lines if line.strip().startswith("--model.backbone"))
    assert "Conv4, MLP, ResNet12" in backbone and "torch.nn" not in text
    dataset = " ".join(lines[lines.index(next(line for line in lines
                                              if "--data.dataset" in line)):][:3])
    assert all(name in dataset for name in DATASETS)
    assert "[val/acc]" in text  # the CLI's defaults, not the classes'


def test_the_full_help_is_still_there(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help-all"])
    assert len(capsys.readouterr().out.splitlines()) > 1000
