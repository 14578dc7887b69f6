"""``fewshot fit|validate|test``: LightningCLI over :class:`MetaLearner` and the data module.

    fewshot fit -c configs/omniglot_5way_1shot_cpu.yaml
    fewshot test -c configs/omniglot_5way_1shot_cpu.yaml --ckpt_path runs/.../best.ckpt
    fewshot fit -c configs/omniglot_5way_1shot_cpu.yaml --ckpt_path last   # resume a killed run
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import yaml
from jsonargparse import Namespace
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from fewshot.configs import config_path
from fewshot.data.download import DatasetNotFoundError, IntegrityError
from fewshot.data.registry import task_of
from fewshot.inference.checkpoints import describe_load_error
from fewshot.training.callbacks import NonFinitePolicy, TestResultsWriter, Throughput
from fewshot.training.checkpoint_io import ResumableModelCheckpoint, find_last_checkpoint
from fewshot.training.datamodule import FewShotDataModule
from fewshot.training.ensemble import ensemble_paths, load_members
from fewshot.training.lost_process import (
    LostProcess,
    LostProcessError,
    join_this_attempts_process_group,
)
from fewshot.training.module import MetaLearner
from fewshot.training.observability import MetaGradientMonitor
from fewshot.training.original_flags import translate_original_flags
from fewshot.training.out_of_memory import meta_step_memory_error
from fewshot.training.resume import check_model_settings_kept, check_resume

TRAINER_DEFAULTS = {
    # Evaluation adapts with gradients; inference mode would forbid them.
    "inference_mode": False,
    "default_root_dir": "runs",
    # Under DDP the data module gives each process its share of every meta-batch itself.
    "use_distributed_sampler": False,
}


class FewShotCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # Lightning's `predict` needs a predict_dataloader, which a few-shot task is not:
        # `fewshot predict` is `fewshot adapt` (support and query folders in).
        return {name: keys for name, keys in LightningCLI.subcommands().items()
                if name != "predict"}

    def parse_arguments(self, parser: LightningArgumentParser, args: Sequence[str] | None) -> None:
        # main() hands the command line over itself, after translating the original project's
        # flags; Lightning's warning about arguments given twice would end every command.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
            super().parse_arguments(parser, args)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Settings given once: the data decides, the model follows.
        parser.link_arguments("data.ways", "model.ways")
        parser.link_arguments("data.image_size", "model.backbone.init_args.image_size")
        parser.link_arguments("data.channels", "model.backbone.init_args.in_channels")
        # Classification or regression (sine waves): the head, loss and metric follow the data.
        parser.link_arguments("data.dataset", "model.task", compute_fn=task_of)
        parser.set_defaults({"model.backbone": {"class_path": "fewshot.models.Conv4"},
                             "model.inner_optimizer": {"class_path": "fewshot.core.inner_optimizers.SGD"},
                             "model.executor": {"class_path": "fewshot.execution.Auto"}})
        # No default class for model.algorithm: jsonargparse would carry a default MAML's
        # arguments over to another algorithm named later (MAML++ would get MAML's inner_lr).
        # Unset, MetaLearner uses MAML(); configs name their algorithm.
        # NaN/Inf in the meta-loss or meta-gradient: stop or skip (fewshot.training.callbacks).
        parser.add_lightning_class_args(NonFinitePolicy, "nonfinite")
        # CSV and TensorBoard in one run folder, no setup needed (fewshot.loggers).
        # Its save_dir follows --trainer.default_root_dir unless given (before_instantiate_classes).
        parser.set_defaults({"trainer.logger": {
            "class_path": "fewshot.training.loggers.RunLogger", "init_args": {"save_dir": None}}})
        # The original project's --track_grad_norm, and gradient histograms (fewshot.observability).
        parser.add_lightning_class_args(MetaGradientMonitor, "grad_monitor")
        # Under DDP, how long a process waits for a lost one before stopping (fewshot.lost_process).
        parser.add_lightning_class_args(LostProcess, "ddp")
        # Keep the best checkpoint by validation accuracy, and the last one for resuming.
        parser.add_lightning_class_args(ResumableModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.monitor": "val/acc", "checkpoint.mode": "max",
                             "checkpoint.save_last": True, "checkpoint.filename": "best-{step}",
                             "checkpoint.auto_insert_metric_name": False})
        parser.add_argument(
            "--test_after_fit", type=bool, default=False,
            help="After fit, run the test episodes with the best checkpoint and print the accuracy.",
        )
        parser.add_argument(
            "--ensemble", type=list[str] | str, default=[],
            help="Test a checkpoint ensemble (the MAML++ reference code's protocol): checkpoint "
                 "files or glob patterns whose adapted models' probabilities are averaged per "
                 "query; 'top_k' is the best checkpoints the run kept (--checkpoint.save_top_k).",
        )

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the hyperparameters of --ckpt_path before anything else: a damaged
        # or refused file is a user error naming it, not a traceback from torch.load.
        subcommand = self.config.get("subcommand")
        asked = self.config[subcommand].get("model") if subcommand == "fit" else None
        asked = asked.clone() if asked is not None else None
        try:
            super()._parse_ckpt_path()
        except Exception as error:
            path = Path(self.config[self.config.subcommand].get("ckpt_path"))
            raise describe_load_error(path, error) from error
        if asked is not None:
            # Lightning puts the checkpoint's model settings over the command line's: resuming
            # with another algorithm or model would silently train the checkpoint's instead.
            check_model_settings_kept(self.config[subcommand].get("ckpt_path"), asked,
                                      self.config[subcommand].get("model"))

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except TypeError as error:
            # A setting of the wrong type reaching a class (a YAML `devices: null`): a user
            # error saying what, not a traceback (found by tests/reliability/test_fuzzed_readers).
            raise ValueError(f"invalid settings: {error}") from error

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.get("trainer", {})
        _check_gpus_exist(trainer.get("accelerator"))
        _checkpoints_follow_the_task(config)
        _loggers_follow_the_root_dir(trainer)
        # Checkpoints are written atomically (fewshot.checkpoint_io), unless the user chose
        # another CheckpointIO plugin.
        plugins = trainer.get("plugins")
        plugins = [] if plugins is None else list(plugins) if isinstance(plugins, list) else [plugins]
        if not any(_is_checkpoint_io(plugin) for plugin in plugins):
            trainer["plugins"] = [*plugins, Namespace(
                class_path="fewshot.training.checkpoint_io.AtomicCheckpointIO", init_args=Namespace())]
        # A Rich progress bar on a terminal, a plain one elsewhere (logs, CI), both showing the
        # iteration and, for a time-limited run, the time left (fewshot.training.progress);
        # none with --trainer.enable_progress_bar false.
        if trainer.get("enable_progress_bar", True) is not False:
            callbacks = list(trainer.get("callbacks") or [])
            if not any("ProgressBar" in str(getattr(c, "class_path", c)) for c in callbacks):
                bar = "MetaRichProgressBar" if sys.stdout.isatty() else "MetaProgressBar"
                trainer["callbacks"] = [*callbacks, Namespace(
                    class_path=f"fewshot.training.progress.{bar}", init_args=Namespace())]

    def _resume_from_the_last_run(self) -> None:
        # --ckpt_path last: the last checkpoint of the previous runs, not of this new one.
        config = self.config_init[self.subcommand]
        restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0)
        if self.subcommand == "fit" and config.get("ckpt_path") is None and restarts > 0:
            # torchrun --max-restarts started this job again after a process failed: go on
            # from where the failed attempt got to, as --ckpt_path last would.
            self._say(f"torchrun restart {restarts}: resuming from the last checkpoint of this "
                      "run's settings, if any")
            config["ckpt_path"] = "last"
            join_this_attempts_process_group(self.trainer)
        if config.get("ckpt_path") == "last":
            found = find_last_checkpoint(self.trainer, self.model, self.datamodule)
            if found is not None:
                config["ckpt_path"] = str(found)
            elif self.subcommand != "fit":  # fit starts afresh; evaluating random weights is wrong
                looked = getattr(self.trainer.logger, "root_dir", self.trainer.default_root_dir)
                raise FileNotFoundError(f"--ckpt_path last: no run with these settings in {looked} "
                                        "has a last.ckpt; pass the path of a checkpoint")
        if self.subcommand == "fit" and config.get("ckpt_path") not in (None, "last"):
            # Say what is resumed (or that it had finished); refuse other settings or formats.
            line, warnings_ = check_resume(
                Path(config["ckpt_path"]), dict(self.model.hparams),
                dict(self.datamodule.hparams) if self.datamodule is not None else None,
                self.trainer.max_steps)
            for warning in warnings_:
                warnings.warn(warning, stacklevel=1)
            self._say(line)

    def _say(self, line: str) -> None:
        if self.trainer.is_global_zero:
            print(line, file=sys.stderr, flush=True)

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except Exception as error:
            memory = meta_step_memory_error(error)  # names the executors that bound memory
            if memory is not None:
                raise memory from error
            # A lost DDP process: one line naming it (fewshot.training.lost_process).
            lost = next((c for c in self.trainer.callbacks if isinstance(c, LostProcess)), None)
            if lost is None or lost.lost_ranks is None and not lost.cause:
                raise
            raise lost.error(self.trainer) from error

    before_fit = before_validate = _resume_from_the_last_run

    def before_test(self) -> None:
        self._resume_from_the_last_run()
        config = self.config_init[self.subcommand]
        self._build_ensemble(config.get("ensemble"), main_checkpoint=config.get("ckpt_path"))

    def _build_ensemble(self, specs: list[str] | str | None, main_checkpoint: str | None = None,
                        kept: list[str] = ()) -> None:
        if not specs:
            return
        specs = [specs] if isinstance(specs, str) else specs  # one path or pattern
        paths = ensemble_paths(specs, kept=kept, main_checkpoint=main_checkpoint)
        self.model.ensemble = load_members(paths, like=self.model)
        print(f"Testing an ensemble of {len(paths)} checkpoints: "
              + ", ".join(p.name for p in paths))

    def after_fit(self) -> None:
        config = self.config[self.subcommand]
        if config.get("test_after_fit"):
            callback = self.trainer.checkpoint_callback
            has_best = getattr(callback, "best_model_path", "")
            # Best first, as the checkpoint callback ranked them.
            scores = getattr(callback, "best_k_models", {}) or {}
            reverse = getattr(callback, "mode", "max") == "max"
            kept = sorted(scores, key=lambda p: float(scores[p]), reverse=reverse)
            self._build_ensemble(config.get("ensemble"), main_checkpoint=has_best or None,
                                 kept=kept)
            self.trainer.test(self.model, datamodule=self.datamodule,
                              ckpt_path="best" if has_best else None)


def _loggers_follow_the_root_dir(trainer: Namespace) -> None:
    """``--trainer.default_root_dir DIR`` moves the run folder (logs and checkpoints): the
    default logger, and W&B's, write there unless their own ``save_dir`` is given."""
    root = trainer.get("default_root_dir") or "runs"
    loggers = trainer.get("logger")
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        init_args = getattr(logger, "init_args", None)
        if init_args is None:
            continue
        class_path = str(getattr(logger, "class_path", ""))
        # W&B's own default is ".", the current folder.
        unset = (None, ".") if class_path.endswith("WandbLogger") else (None,)
        if class_path.endswith(("RunLogger", "WandbLogger")) and init_args.get("save_dir") in unset:
            init_args["save_dir"] = str(root)


def _checkpoints_follow_the_task(config: Namespace) -> None:
    """Regression is scored by its MSE, lower being better: unless another monitor was chosen,
    the best checkpoint is the one of the lowest ``val/mse`` instead of the highest ``val/acc``."""
    checkpoint, model = config.get("checkpoint"), config.get("model")
    if (checkpoint is not None and model is not None and model.get("task") == "regression"
            and checkpoint.get("monitor") == "val/acc"):
        checkpoint["monitor"], checkpoint["mode"] = "val/mse", "min"


def _check_gpus_exist(accelerator: object) -> None:
    """A GPU run (``--gpus=-1`` of the original project) on a machine without one: one line
    that says how to run on the CPU, rather than Lightning's accelerator message."""
    if str(accelerator).lower() in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"--trainer.accelerator={accelerator} (the original project's --gpus) asks for a "
            "GPU, but PyTorch sees none on this machine (torch.cuda.is_available() is False); "
            "to train on the CPU, drop --gpus or pass --gpus=0 (--trainer.accelerator=cpu)")


def _is_checkpoint_io(plugin: object) -> bool:
    if isinstance(plugin, CheckpointIO):
        return True
    class_path = getattr(plugin, "class_path", None)
    if not isinstance(class_path, str):
        return False  # e.g. "bf16-mixed": a precision plugin named by a string
    module, _, name = class_path.rpartition(".")
    plugin_class = getattr(importlib.import_module(module), name, None) if module else None
    return isinstance(plugin_class, type) and issubclass(plugin_class, CheckpointIO)


def resolve_config_names(argv: Sequence[str]) -> list[str]:
    """``-c omniglot_5way_1shot_cpu`` -> the shipped config's path (:mod:`fewshot.configs`),
    when no such file exists where the command runs; files are taken as they are."""
    resolved, arguments = [], list(argv)
    for i, argument in enumerate(arguments):
        flag, equals, value = argument.partition("=")
        is_config_value = i > 0 and arguments[i - 1] in ("-c", "--config")
        if flag == "--config" and equals:
            resolved.append(f"--config={_config_file(value)}")
        elif is_config_value:
            resolved.append(str(_config_file(argument)))
        else:
            resolved.append(argument)
    return resolved


def _config_file(value: str) -> str:
    if Path(value).exists():
        return value
    shipped = config_path(value)
    if shipped is not None:
        return str(shipped)
    if "/" not in value and not value.endswith((".yaml", ".yml")):
        raise ValueError(f"-c {value}: no such file, and no shipped config has that name; "
                         "`fewshot configs` lists them")
    return value  # a missing file: the parser names it


def check_config_files(argv: Sequence[str]) -> None:
    """Name the ``-c``/``--config`` file that is not YAML or not a mapping of options (the
    parser's own message gives a line number but not the file)."""
    for flag, value in zip(argv, [*argv[1:], None], strict=True):
        if flag.startswith("--config="):
            flag, value = "--config", flag.partition("=")[2]
        if flag not in ("-c", "--config") or value is None or not Path(value).is_file():
            continue
        try:
            with open(value) as file:
                config = yaml.safe_load(file)  # a syntax error names the file
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
            raise ValueError(f"config file {value} is not readable YAML: {error}") from error
        if config is not None and not isinstance(config, dict):
            raise ValueError(f"config file {value} must be a mapping of options (such as "
                             f"'trainer:', 'model:', 'data:'), not a {type(config).__name__}")


def _raised_by_jsonargparse(error: BaseException) -> bool:
    traceback = error.__traceback__
    while traceback is not None and traceback.tb_next is not None:
        traceback = traceback.tb_next
    return traceback is not None and str(
        traceback.tb_frame.f_globals.get("__name__", "")).startswith("jsonargparse")


def user_error(error: BaseException) -> BaseException:
    """The error to show: jsonargparse wraps one raised while building a class (e.g. Conv4's
    own ``ValueError``) in a list of every type it tried; the original says what is wrong."""
    while _raised_by_jsonargparse(error) and isinstance(error.__cause__, ValueError):
        error = error.__cause__
    return error


def build_cli(args: Sequence[str] | None = None, run: bool = True) -> FewShotCLI:
    return FewShotCLI(
        MetaLearner,
        FewShotDataModule,
        # Always on: tasks/s in the logs, test_results.json after testing.
        trainer_defaults={**TRAINER_DEFAULTS, "callbacks": [Throughput(), TestResultsWriter()]},
        args=translate_original_flags(sys.argv[1:] if args is None else args),
        run=run,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"default_env": False},
    )


# What ends a training command with one line instead of a traceback (see fewshot.cli.main).
USER_ERRORS = (DatasetNotFoundError, IntegrityError, ValueError, FileNotFoundError,
               MisconfigurationException)


# Defaults the CLI sets over the classes' own, for the concise help.
HELP_DEFAULTS = {**{f"trainer.{k}": v for k, v in TRAINER_DEFAULTS.items()},
                 "trainer.logger": "RunLogger (CSV + TensorBoard)", "model.backbone": "Conv4",
                 "model.inner_optimizer": "SGD", "model.executor": "Auto",
                 "model.algorithm": "MAML", "checkpoint.monitor": "val/acc",
                 "checkpoint.mode": "max", "checkpoint.save_last": True,
                 "checkpoint.filename": "best-{step}", "checkpoint.auto_insert_metric_name": False}


def run(argv: Sequence[str]) -> FewShotCLI | None:
    """``fewshot fit|validate|test ...``: check the config files, then run LightningCLI.

    ``--help`` prints the concise help (:mod:`fewshot.training.help`); ``--help-all``
    LightningCLI's full one."""
    if argv and argv[0] in ("fit", "validate", "test") and ("-h" in argv or "--help" in argv):
        from fewshot.training.help import concise_help

        print(concise_help(argv[0], HELP_DEFAULTS))
        return None
    argv = ["--help" if a == "--help-all" else a for a in argv]
    argv = resolve_config_names(argv)
    check_config_files(argv)
    try:
        return build_cli(argv)
    except LostProcessError as error:  # not the user's doing: exit code 1, one line
        if os.environ.get("FEWSHOT_DEBUG"):
            raise
        print(f"fewshot: error: {error}", file=sys.stderr)
        sys.exit(1)
