"""Model families as plain PyTorch modules, and the tasks that train and judge them.

Nothing in this package imports Flower or Opacus.
"""

from . import autoencoder, cnn, gan, gru, lstm, mlp, transformer  # noqa: F401  (registers the families)
from .registry import (
    GRAD_SAMPLE_MODES,
    DataSpec,
    ModelConfigError,
    UnknownModelError,
    UserModelError,
    build_model,
    default_task,
    model_names,
    parse_model_options,
    preferred_grad_sample_mode,
    register_model,
    resolve_spec,
    supported_tasks,
)
from .tasks import (
    ClassificationTask,
    GenerationTask,
    ReconstructionTask,
    RegressionTask,
    anomaly_auroc,
    anomaly_scores,
    evaluate,
    headline_metric,
    higher_is_better,
    task_for,
)

__all__ = [
    "GRAD_SAMPLE_MODES",
    "ClassificationTask",
    "DataSpec",
    "GenerationTask",
    "ModelConfigError",
    "ReconstructionTask",
    "RegressionTask",
    "UnknownModelError",
    "UserModelError",
    "anomaly_auroc",
    "anomaly_scores",
    "build_model",
    "default_task",
    "evaluate",
    "headline_metric",
    "higher_is_better",
    "model_names",
    "parse_model_options",
    "preferred_grad_sample_mode",
    "register_model",
    "resolve_spec",
    "supported_tasks",
    "task_for",
]
