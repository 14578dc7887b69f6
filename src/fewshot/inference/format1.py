"""Reading models made before the algorithms became objects (export format 1, and Lightning
checkpoints of that time): the MetaLearner's flags become an algorithm and an inner optimizer.

Format 1 stored the 31 constructor arguments of the old ``MetaLearner`` as
``hyper_parameters`` and the learned inner rates as ``inner_lrs.<name>``. Today's algorithms
own their rates (``algorithm.inner_lrs.<name>``). The translation is checked against
predictions the old code made (``tests/fixtures/format1``).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from fewshot.core.settings import class_path_of

_MAMLPP_SWITCHES = ("multi_step_loss", "derivative_order_annealing", "per_step_bn_weights")


def algorithm_from_flags(flags: dict[str, Any]) -> dict[str, Any]:
    """The algorithm settings that compute what the old flags did."""
    from fewshot.algorithms import ANIL, MAML, MAMLPlusPlus

    learned = ("per_entry" if flags.get("meta_sgd") else
               "per_tensor" if flags.get("learn_inner_lr") else "none")
    common = {"inner_steps": flags.get("inner_steps", 1), "inner_lr": flags.get("inner_lr", 0.4),
              "eval_inner_steps": flags.get("eval_inner_steps"),
              "eval_inner_lr": flags.get("eval_inner_lr"),
              "first_order": bool(flags.get("first_order", False)), "learned_rates": learned,
              "inner_max_grad_norm": flags.get("inner_max_grad_norm")}
    mamlpp = (any(flags.get(s) for s in _MAMLPP_SWITCHES)
              or flags.get("batch_norm", "transductive") != "transductive")
    if mamlpp and flags.get("anil"):
        raise ValueError("a format-1 model with both anil and MAML++ switches cannot be upgraded; "
                         "re-export it with fewshot 0.1.0")
    if mamlpp:
        cls, extra = MAMLPlusPlus, {
            "multi_step_loss": bool(flags.get("multi_step_loss")),
            "multi_step_loss_epochs": flags.get("multi_step_loss_epochs", 10),
            "derivative_order_annealing": bool(flags.get("derivative_order_annealing")),
            "first_order_epochs": flags.get("first_order_epochs", 50),
            "per_step_bn_weights": bool(flags.get("per_step_bn_weights")),
            "batch_norm": flags.get("batch_norm", "transductive")}
    else:
        cls, extra = (ANIL if flags.get("anil") else MAML), {}
    return cls(**common, **extra).settings()


def inner_optimizer_from_flags(flags: dict[str, Any]) -> dict[str, Any]:
    from fewshot.core.inner_optimizers import SGD, Adam, Momentum

    name = flags.get("inner_optimizer", "sgd")
    if name == "momentum":
        optimizer = Momentum(flags.get("inner_momentum", 0.9))
    elif name == "adam":
        beta1, beta2 = flags.get("inner_betas", (0.9, 0.999))
        optimizer = Adam(beta1, beta2, flags.get("inner_eps", 1e-3),
                         flags.get("inner_eps_inside_sqrt", True))
    elif name == "sgd":
        optimizer = SGD()
    else:
        raise ValueError(f"unknown inner_optimizer {name!r}")
    return {"class_path": class_path_of(optimizer), "init_args": optimizer.settings()["init_args"]}


def upgrade_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """``inner_lrs.*`` (the old module's) -> ``algorithm.inner_lrs.*``."""
    return {(f"algorithm.{name}" if name.startswith("inner_lrs.") else name): tensor
            for name, tensor in state_dict.items()}


def upgrade_format1(metadata: dict[str, Any], state_dict: dict[str, Tensor]
                    ) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Format-1 metadata and weights as format 2."""
    flags = metadata["hyper_parameters"]
    ways = flags.get("ways", 5)
    if isinstance(ways, bool) or not isinstance(ways, int):
        raise ValueError(f"hyper_parameters.ways must be an integer, got {ways!r}")
    upgraded = {key: value for key, value in metadata.items() if key != "hyper_parameters"}
    upgraded.update(format_version=2, ways=ways, algorithm=algorithm_from_flags(flags),
                    inner_optimizer=inner_optimizer_from_flags(flags),
                    upgraded_from_format=1)
    return upgraded, upgrade_state_dict(state_dict)
