"""A finished run directory, read back: its config, the global (or best) model, the server's held-out data.

A run directory (results/<run>/) holds metrics.json (the run config, every round, the summary),
checkpoint.pt (the global model after the last round) and, with early stopping, best_model.pt. The
model is rebuilt exactly as the coordinator built it (models.resolve_spec, models.build_model with the
run's model options) and the held-out data is the coordinator's own (server.app.central_data), so
what the after-training tools see is what the run's evaluation saw.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

METRICS_NAME = "metrics.json"
WEIGHTS = {"global": "checkpoint.pt", "best": "best_model.pt"}


class RunDirError(ValueError):
    """A run directory that is missing, unfinished or unreadable (one line, names the file)."""


@dataclass
class FinishedRun:
    directory: Path
    config: Any  # server.config.RunConfig
    document: dict[str, Any]  # metrics.json: config, rounds, summary
    model: nn.Module  # in eval mode, weights loaded
    spec: Any  # models.DataSpec the model was built from
    task: Any  # models.tasks task
    weights: str  # "global" or "best"

    @property
    def family(self) -> str:
        return self.config.model

    def held_out(self):
        """(x, y, outliers) of the coordinator's held-out data in the model's input shape; the reported
        half when early stopping kept the other half for choosing the best round. RunDirError if the
        coordinator had none (a deployment whose server holds no data)."""
        from fedsafe.client.data import fit_view
        from fedsafe.server.app import central_data
        from fedsafe.server.evaluation import split_validation

        _, split = central_data(self.config)
        if split is None or not len(split.test):
            raise RunDirError(f"run {self.directory}: the coordinator held no evaluation data (set eval-path)")
        test = fit_view(split.test, self.spec.input_shape)
        if self.config.early_stopping_patience > 0:
            _, test = split_validation(test)
        # test.x[:]: all of it, also from an image folder read lazily (the held-out set, loaded once here)
        return np.asarray(test.x[:], dtype=np.float32), test.y, split.outliers


def read_metrics(directory: str | Path) -> dict[str, Any]:
    path = Path(directory).expanduser() / METRICS_NAME
    if not path.is_file():
        raise RunDirError(f"{Path(directory)} is not a finished fedsafe run: {METRICS_NAME} is missing")
    try:
        document = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise RunDirError(f"{path} is unreadable ({err})") from None
    if not isinstance(document, dict) or not isinstance(document.get("config"), dict):
        raise RunDirError(f"{path} holds no run config")
    return document


def run_config(document: dict[str, Any]):
    from fedsafe.server.config import ConfigError, RunConfig

    try:
        return RunConfig.from_mapping(document["config"])
    except ConfigError as err:
        raise RunDirError(f"the run's config cannot be read back: {err}") from None


def open_run(directory: str | Path, weights: str = "global") -> FinishedRun:
    """The run in `directory` with its `weights` ("global": checkpoint.pt; "best": best_model.pt)."""
    from fedsafe.client.data import DataError
    from fedsafe.models import ModelConfigError, build_model, parse_model_options, resolve_spec, task_for
    from fedsafe.models.transfer import read_state_dict
    from fedsafe.server.app import central_data
    from fedsafe.server.config import ConfigError

    directory = Path(directory).expanduser()
    if weights not in WEIGHTS:
        raise RunDirError(f"weights must be one of: {', '.join(WEIGHTS)}; got {weights!r}")
    document = read_metrics(directory)
    cfg = run_config(document)
    path = directory / WEIGHTS[weights]
    if not path.is_file():
        extra = " (best_model.pt exists only for runs with early stopping)" if weights == "best" else ""
        raise RunDirError(f"run {directory}: {path.name} is missing{extra}")
    try:
        data_spec, _ = central_data(cfg)
        spec = resolve_spec(cfg.model, data_spec)
        model = build_model(cfg.model, spec, parse_model_options(cfg.model_options))
        model.load_state_dict(read_state_dict(path))
    except (ConfigError, DataError, ModelConfigError) as err:
        raise RunDirError(f"run {directory}: {err}") from None
    except RuntimeError as err:  # load_state_dict: missing or misshapen tensors
        raise RunDirError(f"run {directory}: {path.name} does not fit a {cfg.model}: {str(err).splitlines()[0]}") from None
    model.eval()
    return FinishedRun(directory, cfg, document, model, spec, task_for(spec.task, spec.num_classes), weights)
