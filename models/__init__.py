"""Model families as plain PyTorch modules, and the tasks that train and judge them."""

from . import cnn, mlp  # noqa: F401  (registers the families)
from .registry import DataSpec, UnknownModelError, build_model, model_names, register_model
from .tasks import ClassificationTask, evaluate, task_for

__all__ = [
    "ClassificationTask",
    "DataSpec",
    "UnknownModelError",
    "build_model",
    "evaluate",
    "model_names",
    "register_model",
    "task_for",
]
