"""Meta-learning algorithms: one file each, one registration line each here."""

from fewshot.algorithms.anil import ANIL
from fewshot.algorithms.base import Adapted, Algorithm, TaskFunction
from fewshot.algorithms.maml import MAML
from fewshot.algorithms.mamlpp import MAMLPlusPlus
from fewshot.algorithms.meta_sgd import MetaSGD
from fewshot.algorithms.protonet import ProtoNet
from fewshot.algorithms.reptile import Reptile
from fewshot.core.settings import build_from_settings

# The algorithms a file may name (by import path); looked up, never imported.
ALGORITHMS: dict[str, type[Algorithm]] = {
    f"{cls.__module__}.{cls.__qualname__}": cls
    for cls in (MAML, MAMLPlusPlus, MetaSGD, ANIL, Reptile, ProtoNet)
}



def build_algorithm(spec: dict | str) -> Algorithm:
    """The algorithm recorded as ``{"class_path", "init_args"}`` (a checkpoint, an export)."""
    return build_from_settings(spec, ALGORITHMS, "algorithm")


__all__ = ["ALGORITHMS", "ANIL", "MAML", "Adapted", "Algorithm", "MAMLPlusPlus", "MetaSGD",
           "ProtoNet", "Reptile", "TaskFunction", "build_algorithm"]
