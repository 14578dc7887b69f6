"""The ``fewshot`` command line: LightningCLI over :class:`MetaLearner` and the data module.

    fewshot fit -c configs/omniglot_5way_1shot_cpu.yaml
    fewshot test -c configs/omniglot_5way_1shot_cpu.yaml --ckpt_path runs/.../best.ckpt
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from fewshot.data.datamodule import FewShotDataModule
from fewshot.data.download import DatasetNotFoundError, IntegrityError
from fewshot.module import MetaLearner
from fewshot.observability import MetaGradientMonitor

# The original project's flags, accepted and translated to their fewshot options.
LEGACY_FLAGS = {
    "--episode_classes": "--data.ways",
    "--support_samples": "--data.shots",
    "--query_samples": "--data.queries",
    "--batch_size": "--data.meta_batch_size",
    "--inner_loop_steps": "--model.inner_steps",
    "--track_grad_norm": "--grad_monitor.norm_type",
}
# Flags of the original project that took no value.
LEGACY_SWITCHES = {
    "--wandb": "--trainer.logger=lightning.pytorch.loggers.WandbLogger",
}

TRAINER_DEFAULTS = {
    # Evaluation adapts with gradients; inference mode would forbid them.
    "inference_mode": False,
    "default_root_dir": "runs",
    # Under DDP the data module gives each process its share of every meta-batch itself.
    "use_distributed_sampler": False,
}


OVERVIEW = """usage: fewshot SUBCOMMAND [options]

Few-shot image classification with MAML, first-order MAML and MAML++.

meta-training and evaluation (LightningCLI, YAML configs in configs/):
  fit        meta-train:          fewshot fit -c configs/omniglot_5way_1shot_cpu.yaml
  validate   score validation episodes of a checkpoint
  test       score the test episodes (600 by default) with a 95% confidence interval

using a trained model:
  adapt      adapt to your own support images and classify query images
  export     write a checkpoint as safetensors + JSON, to share without a pickle

looking at a run:
  report     draw PNG figures and a summary from a run folder

fewshot SUBCOMMAND --help lists every option of a subcommand."""


def translate_legacy_flags(argv: Sequence[str]) -> list[str]:
    """``--episode_classes=20`` -> ``--data.ways=20`` (and the other original-project flags)."""
    translated = []
    for argument in argv:
        if argument in LEGACY_SWITCHES:
            translated.append(LEGACY_SWITCHES[argument])
            continue
        flag, separator, value = argument.partition("=")
        if flag == "--accelerator" and value.startswith("ddp"):  # Lightning 1.x spelling
            flag = "--trainer.strategy"
        translated.append(LEGACY_FLAGS.get(flag, flag) + separator + value)
    return translated


class FewShotCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Settings given once: the data decides, the model follows.
        parser.link_arguments("data.ways", "model.ways")
        parser.link_arguments("data.image_size", "model.backbone.init_args.image_size")
        parser.link_arguments("data.channels", "model.backbone.init_args.in_channels")
        parser.set_defaults({"model.backbone": {"class_path": "fewshot.models.Conv4"}})
        # CSV and TensorBoard in one run folder, no setup needed (fewshot.loggers).
        parser.set_defaults({"trainer.logger": {
            "class_path": "fewshot.loggers.RunLogger", "init_args": {"save_dir": "runs"}}})
        # The original project's --track_grad_norm, and gradient histograms (fewshot.observability).
        parser.add_lightning_class_args(MetaGradientMonitor, "grad_monitor")
        # Keep the best checkpoint by validation accuracy, and the last one for resuming.
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.monitor": "val/acc", "checkpoint.mode": "max",
                             "checkpoint.save_last": True, "checkpoint.filename": "best-{step}",
                             "checkpoint.auto_insert_metric_name": False})
        parser.add_argument(
            "--test_after_fit", type=bool, default=False,
            help="After fit, run the test episodes with the best checkpoint and print the accuracy.",
        )

    def before_instantiate_classes(self) -> None:
        # A Rich progress bar on a terminal; Lightning's plain one elsewhere (logs, CI), none
        # with --trainer.enable_progress_bar false.
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.get("trainer", {})
        if trainer.get("enable_progress_bar", True) is not False and sys.stdout.isatty():
            callbacks = list(trainer.get("callbacks") or [])
            if not any("ProgressBar" in str(getattr(c, "class_path", c)) for c in callbacks):
                trainer["callbacks"] = [*callbacks, Namespace(
                    class_path="lightning.pytorch.callbacks.RichProgressBar", init_args=Namespace())]

    def after_fit(self) -> None:
        if self.config[self.subcommand].get("test_after_fit"):
            has_best = getattr(self.trainer.checkpoint_callback, "best_model_path", "")
            self.trainer.test(self.model, datamodule=self.datamodule,
                              ckpt_path="best" if has_best else None)


def build_cli(args: Sequence[str] | None = None, run: bool = True) -> FewShotCLI:
    return FewShotCLI(
        MetaLearner,
        FewShotDataModule,
        trainer_defaults=TRAINER_DEFAULTS,
        args=translate_legacy_flags(sys.argv[1:] if args is None else args),
        run=run,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"default_env": False},
    )


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of the ``fewshot`` console script.

    ``fit``, ``validate`` and ``test`` go to LightningCLI; ``adapt`` and ``export`` (use a
    trained model) to :mod:`fewshot.adapt_cli`. User errors (missing data or checkpoint,
    impossible task sizes, bad images or values) end with one line on stderr and exit code 2;
    set ``FEWSHOT_DEBUG=1`` to see the traceback instead.
    """
    argv = list(sys.argv[1:] if args is None else args)
    if not argv or argv[0] in ("-h", "--help"):
        print(OVERVIEW)
        return
    try:
        if argv and argv[0] == "report":
            from fewshot.report import main as report_main

            report_main(argv[1:])
            return
        if argv and argv[0] in ("adapt", "export"):
            # Using a trained model needs no Trainer: plain argparse (fewshot.adapt_cli).
            from fewshot.adapt_cli import main as adapt_main

            adapt_main(argv)
            return
        build_cli(args)
    except (DatasetNotFoundError, IntegrityError, ValueError, FileNotFoundError) as error:
        if os.environ.get("FEWSHOT_DEBUG"):
            raise
        print(f"fewshot: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
