"""Early stopping on the coordinator's validation metric, keeping the best global model.

The evaluator (server/evaluation.py) reports ``val_<metric>`` on half of the held-out set when
early stopping is on. After each round the watched metric is compared with the best so far; a
better value writes the global model to ``best_model.pt`` (atomically); `patience` rounds without
one stop the run. Its state is a function of the run's history, so a resumed run picks it up from
the checkpoint's history.

Without early stopping (patience 0) the same keeper still runs on the held-out metrics and never stops
the run: best_model.pt always holds the best global model seen, so a round that makes the model worse
(e.g. nodes training at noise that drowns their signal) never replaces it silently — `regression`
names such a round. (Picked on the held-out set itself, that model's figures are optimistic; turn early
stopping on for a pick on a separate validation half.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fedsafe.client.files import atomic_write

from .checkpoint import safe_tree
from .config import ConfigError

BEST_MODEL_NAME = "best_model.pt"
VALIDATION_PREFIX = "val_"
# A round whose headline metric is this much worse than the best so far (in the metric's units, scaled
# by the best value where that exceeds 1: losses, distances) is flagged: a few points of accuracy.
MARKED_DROP = 0.05


class EarlyStopping:
    def __init__(self, out_dir: Path, patience: int, metric: str = "") -> None:
        self.out_dir = Path(out_dir)
        self.patience = patience  # 0: keep the best model, never stop
        self.prefix = VALIDATION_PREFIX if patience else ""  # the evaluator halves the held-out set only then
        self.metric = metric  # "" until the first evaluation names the task's headline metric
        self.best_round: int | None = None
        self.best_value: float | None = None
        self.best_eval: dict[str, float] = {}
        self.last_round: int | None = None
        self._higher: bool | None = None  # whether larger values are better, once the metric is known

    @property
    def key(self) -> str:
        return self.prefix + self.metric

    def _resolve_metric(self, metrics: dict[str, float]) -> None:
        from fedsafe.models.tasks import headline_metric, higher_is_better

        if not self.metric:
            reported = [k for k in metrics if not k.startswith(VALIDATION_PREFIX)]
            self.metric = headline_metric(reported) or ""
        if self.key not in metrics:
            names = sorted(k[len(self.prefix):] for k in metrics
                           if k.startswith(self.prefix) and (self.prefix or not k.startswith(VALIDATION_PREFIX)))
            raise ConfigError(
                f"early-stopping-metric {self.metric!r} is not among this task's metrics: {', '.join(names)}"
            )
        self._higher = higher_is_better(self.metric)

    def _better(self, value: float) -> bool:
        if self.best_value is None:
            return True
        return value > self.best_value if self._higher else value < self.best_value

    def observe(self, rnd: int, metrics: dict[str, float], arrays=None) -> bool:
        """Record round `rnd`'s evaluation; write `arrays` (an ArrayRecord) to best_model.pt when it
        is the best so far (None: replaying history, the file is already there). True: stop now."""
        if self._higher is None or self.key not in metrics:
            self._resolve_metric(metrics)
        value = float(metrics[self.key])
        if self._better(value):
            self.best_round, self.best_value = rnd, value
            self.best_eval = {k: v for k, v in metrics.items() if not k.startswith(VALIDATION_PREFIX)}
            if arrays is not None:
                self._save(arrays)
        self.last_round = rnd
        return self.should_stop

    def regression(self, rnd: int, metrics: dict[str, float]) -> str | None:
        """A one-line warning where round `rnd`'s metric is markedly worse than the best so far, else None."""
        if self.best_value is None:
            return None
        if self._higher is None or self.key not in metrics:
            self._resolve_metric(metrics)
        value = float(metrics[self.key])
        drop = (self.best_value - value) if self._higher else (value - self.best_value)
        if drop <= MARKED_DROP * max(1.0, abs(self.best_value)):  # (a NaN metric compares False: flagged)
            return None
        return (f"round {rnd}: {self.key} {value:.3f} is markedly worse than the best so far, "
                f"{self.best_value:.3f} at round {self.best_round}; {BEST_MODEL_NAME} keeps round "
                f"{self.best_round}'s model")

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.best_round is not None and self.last_round is not None and \
            self.last_round - self.best_round >= self.patience

    def replay(self, history: list[dict[str, Any]]) -> None:
        """Catch up with the rounds of a resumed run (best_model.pt was written as they ran)."""
        for entry in history:
            if "eval" in entry:
                self.observe(int(entry["round"]), entry["eval"])

    def keep(self, arrays) -> Path:
        """Write `arrays` as the best model (the best round's global model)."""
        return self._save(arrays)

    def _save(self, arrays) -> Path:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        document = {
            "model_state": arrays.to_torch_state_dict(), "round": self.best_round, "metric": self.key,
            "value": self.best_value, "eval": self.best_eval,
        }
        path = self.out_dir / BEST_MODEL_NAME
        with atomic_write(path, "wb") as handle:
            torch.save(safe_tree(document, "best_model"), handle)  # loadable with weights_only=True
        return path

    def summary(self) -> dict[str, Any]:
        return {
            "round": self.best_round, "metric": self.key, "value": self.best_value, "eval": self.best_eval,
            "stopped_early": self.should_stop, "path": str(self.out_dir / BEST_MODEL_NAME),
        }
