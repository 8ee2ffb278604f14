"""Per-round results on the coordinator's disk: JSON and CSV as the run goes, a plot at the end."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any

# The CSV's columns: the round, the task's metrics (its headline metric first, see
# models.tasks.HEADLINE_ORDER; validation metrics, when early stopping is on, after the others),
# then the run's figures.
RUN_COLUMNS = ("epsilon_max", "epsilon_mean", "replies", "failures", "budget_refusals", "rejected", "seconds")
CSV_COLUMNS = ("round", "accuracy", "loss", "f1", "auroc", *RUN_COLUMNS)  # a classification run's
METRIC_ORDER = ("accuracy", "r2", "anomaly_auroc", "mse", "frechet_distance", "digits_is", "loss", "f1", "auroc")
# what the progress line shows next to the headline metric, and the short names it uses
_SECOND = {"accuracy": "loss", "r2": "mse", "anomaly_auroc": "mse", "frechet_distance": "digits_is"}
_SHORT = {"accuracy": "acc", "anomaly_auroc": "anomaly-auroc", "digits_is": "digits-IS", "frechet_distance": "FD"}
_UNIT_RANGE = {"accuracy", "precision", "recall", "f1", "auroc", "anomaly_auroc", "digits_coverage", "digits_confidence"}


def metric_columns(history: list[dict[str, Any]]) -> list[str]:
    """The evaluation metrics the rounds hold, headline first (METRIC_ORDER), validation last."""
    seen: dict[str, None] = {}
    for h in history:
        seen.update(dict.fromkeys(h.get("eval", {})))
    ranked = [m for m in METRIC_ORDER if m in seen]
    rest = [m for m in seen if m not in ranked]
    return ranked + [m for m in rest if not m.startswith("val_")] + [m for m in rest if m.startswith("val_")]


def headline_text(metrics: dict[str, float]) -> str:
    """The task's headline metric and one companion, e.g. "acc 0.912 loss 0.310", "r2 0.412 mse 0.588"."""
    from models.tasks import headline_metric

    name = headline_metric(metrics)
    if name is None:
        return "no evaluation"
    shown = [name] + ([_SECOND[name]] if _SECOND.get(name) in metrics else [])
    return " ".join(f"{_SHORT.get(m, m)} {metrics[m]:.3f}" for m in shown)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class ResultsWriter:
    def __init__(self, directory: Path, config: dict[str, Any]) -> None:
        self.directory = directory
        self.config = config
        directory.mkdir(parents=True, exist_ok=True)

    def write(self, history: list[dict[str, Any]], summary: dict[str, Any] | None = None) -> None:
        document = {"config": self.config, "rounds": history, "summary": summary or {}}
        _atomic_write(self.directory / "metrics.json", json.dumps(_json_safe(document), indent=1))
        columns = ["round", *metric_columns(history), *RUN_COLUMNS]
        rows = [
            {c: ("" if r.get(c) is None else r.get(c)) for c in columns}
            for r in ({**h, **{f"{k}": v for k, v in h.get("eval", {}).items()}} for h in history)
        ]
        tmp = self.directory / "metrics.csv.tmp"
        with tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.directory / "metrics.csv")

    def plot(self, history: list[dict[str, Any]]) -> Path:
        """A PNG of the task's headline metric (accuracy for classifiers) and ε per round."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        metrics = metric_columns(history)
        metric = metrics[0] if metrics else "accuracy"
        rounds = [h["round"] for h in history]
        values = [h.get("eval", {}).get(metric) for h in history]
        values = [v if v is not None else float("nan") for v in values]
        eps_max = [h.get("epsilon_max") for h in history]
        fig, ax_acc = plt.subplots(figsize=(7, 4))
        ax_acc.plot(rounds, values, "o-", color="tab:blue", label=f"test {metric}")
        ax_acc.set_xlabel("round")
        ax_acc.set_ylabel(metric, color="tab:blue")
        if metric in _UNIT_RANGE:
            ax_acc.set_ylim(0, 1)
        if any(e is not None for e in eps_max):
            ax_eps = ax_acc.twinx()
            ax_eps.plot(rounds, [e if e is not None else float("nan") for e in eps_max], "s--",
                        color="tab:red", label="ε (max over nodes)")
            ax_eps.set_ylabel("ε spent (max over nodes)", color="tab:red")
            ax_eps.set_ylim(bottom=0)
        ax_acc.set_title(f"{self.config.get('model')} on {self.config.get('dataset')}")
        ax_acc.grid(alpha=0.3)
        fig.tight_layout()
        path = self.directory / "accuracy_epsilon.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path
