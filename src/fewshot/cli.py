"""The ``fewshot`` command line: LightningCLI over :class:`MetaLearner` and the data module.

    fewshot fit -c configs/omniglot_5way_1shot_cpu.yaml
    fewshot test -c configs/omniglot_5way_1shot_cpu.yaml --ckpt_path runs/.../best.ckpt
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from fewshot.data.datamodule import FewShotDataModule
from fewshot.data.download import DatasetNotFoundError, IntegrityError
from fewshot.module import MetaLearner

# The original project's flags, accepted and translated to their fewshot options.
LEGACY_FLAGS = {
    "--episode_classes": "--data.ways",
    "--support_samples": "--data.shots",
    "--query_samples": "--data.queries",
    "--batch_size": "--data.meta_batch_size",
    "--inner_loop_steps": "--model.inner_steps",
}

TRAINER_DEFAULTS = {
    # Evaluation adapts with gradients; inference mode would forbid them.
    "inference_mode": False,
    "default_root_dir": "runs",
}


def translate_legacy_flags(argv: Sequence[str]) -> list[str]:
    """``--episode_classes=20`` -> ``--data.ways=20`` (and the other original-project flags)."""
    translated = []
    for argument in argv:
        flag, separator, value = argument.partition("=")
        translated.append(LEGACY_FLAGS.get(flag, flag) + separator + value)
    return translated


class FewShotCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Settings given once: the data decides, the model follows.
        parser.link_arguments("data.ways", "model.ways")
        parser.link_arguments("data.image_size", "model.backbone.init_args.image_size")
        parser.link_arguments("data.channels", "model.backbone.init_args.in_channels")
        parser.set_defaults({"model.backbone": {"class_path": "fewshot.models.Conv4"}})
        parser.set_defaults({"trainer.logger": {
            "class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs"}}})
        # Keep the best checkpoint by validation accuracy, and the last one for resuming.
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.monitor": "val/acc", "checkpoint.mode": "max",
                             "checkpoint.save_last": True, "checkpoint.filename": "best-{step}",
                             "checkpoint.auto_insert_metric_name": False})
        parser.add_argument(
            "--test_after_fit", type=bool, default=False,
            help="After fit, run the test episodes with the best checkpoint and print the accuracy.",
        )

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

    User errors (missing data, impossible task sizes, bad values) end with one line on stderr
    and exit code 2; set ``FEWSHOT_DEBUG=1`` to see the traceback instead.
    """
    try:
        build_cli(args)
    except (DatasetNotFoundError, IntegrityError, ValueError, FileNotFoundError) as error:
        if os.environ.get("FEWSHOT_DEBUG"):
            raise
        print(f"fewshot: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
