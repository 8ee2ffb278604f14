"""Per-round results on the coordinator's disk: JSON and CSV as the run goes, a plot at the end."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from fedsafe.client.files import atomic_write

# The CSV's columns: the round, the task's metrics (its headline metric first, see
# fedsafe.models.tasks.HEADLINE_ORDER; validation metrics, when early stopping is on, after the others),
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
    from fedsafe.models.tasks import headline_metric

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


class ResultsWriter:
    def __init__(self, directory: Path, config: dict[str, Any]) -> None:
        self.directory = directory
        self.config = config
        directory.mkdir(parents=True, exist_ok=True)
        self._tensorboard = None
        if config.get("tensorboard"):
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise RuntimeError("tensorboard=true needs the tensorboard package: pip install 'fedsafe[tensorboard]'") from None
            self._tensorboard = SummaryWriter(log_dir=str(directory / "tensorboard"))

    def add_round(self, record: dict[str, Any]) -> None:
        """Per-round scalars (and the per-node ε distribution) for TensorBoard, when enabled."""
        if self._tensorboard is None:
            return
        step = record["round"]
        for name, value in record.get("eval", {}).items():
            self._tensorboard.add_scalar(f"eval/{name}", value, step)
        for name in ("epsilon_max", "epsilon_mean"):
            if record.get(name) is not None:
                self._tensorboard.add_scalar(f"privacy/{name}", record[name], step)
        if record.get("node_epsilon"):
            self._tensorboard.add_histogram("privacy/node_epsilon", np.array(list(record["node_epsilon"].values())), step)
        self._tensorboard.flush()

    def write_node_epsilon(self, history: list[dict[str, Any]]) -> None:
        """Every node's cumulative ε after every round it trained in: the per-client distribution. `node` is
        the node's id, `node_name` the name the coordinator registered it under (empty without one)."""
        with atomic_write(self.directory / "node_epsilon.csv", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["round", "node", "epsilon", "node_name"])
            for h in history:
                names = h.get("node_names", {})
                for node, eps in sorted(h.get("node_epsilon", {}).items()):
                    writer.writerow([h["round"], node, eps, names.get(str(node), "")])

    def write(self, history: list[dict[str, Any]], summary: dict[str, Any] | None = None) -> None:
        document = {"config": self.config, "rounds": history, "summary": summary or {}}
        text = json.dumps(_json_safe(document), indent=1)  # one write, not one per token as json.dump makes
        with atomic_write(self.directory / "metrics.json") as handle:
            handle.write(text)
        columns = ["round", *metric_columns(history), *RUN_COLUMNS]
        rows = [
            {c: ("" if r.get(c) is None else r.get(c)) for c in columns}
            for r in ({**h, **{f"{k}": v for k, v in h.get("eval", {}).items()}} for h in history)
        ]
        with atomic_write(self.directory / "metrics.csv", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)

    def plot(self, history: list[dict[str, Any]]) -> None:
        """`accuracy_epsilon.png` and `rounds.png` (draw_results): drawn now, or by the plot helper
        (fedsafe.server.plots) when the run has one."""
        from .plots import draw

        draw("results", str(self.directory), history, self.config)


def draw_results(directory: str, history: list[dict[str, Any]], config: dict[str, Any]) -> None:
    """`accuracy_epsilon.png` (the task's headline metric — accuracy for classifiers — and ε per round)
    and `rounds.png` (headline metric, loss, and ε with every node's value per round)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory = Path(directory)
    metrics = metric_columns(history)
    metric = metrics[0] if metrics else "accuracy"
    rounds = [h["round"] for h in history]
    values = [h.get("eval", {}).get(metric) for h in history]
    values = [v if v is not None else float("nan") for v in values]
    loss = [h.get("eval", {}).get("loss", float("nan")) for h in history]
    eps_max = [float("nan") if h.get("epsilon_max") is None else h["epsilon_max"] for h in history]
    title = f"{config.get('model')} on {config.get('dataset')}"

    fig, ax_acc = plt.subplots(figsize=(7, 4))
    ax_acc.plot(rounds, values, "o-", color="tab:blue", label=f"test {metric}")
    ax_acc.set_xlabel("round")
    ax_acc.set_ylabel(metric, color="tab:blue")
    if metric in _UNIT_RANGE:
        ax_acc.set_ylim(0, 1)
    if any(math.isfinite(e) for e in eps_max):
        ax_eps = ax_acc.twinx()
        ax_eps.plot(rounds, eps_max, "s--", color="tab:red", label="ε (max over nodes)")
        ax_eps.set_ylabel("ε spent (max over nodes)", color="tab:red")
        ax_eps.set_ylim(bottom=0)
    ax_acc.set_title(title)
    ax_acc.grid(alpha=0.3)
    fig.tight_layout()
    path = directory / "accuracy_epsilon.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(rounds, values, "o-")
    axes[0].set_title(f"test {metric}")
    if metric in _UNIT_RANGE:
        axes[0].set_ylim(0, 1)
    axes[1].plot(rounds, loss, "o-", color="tab:orange")
    axes[1].set_title("test loss")
    for h in history:
        per_node = list(h.get("node_epsilon", {}).values())
        axes[2].scatter([h["round"]] * len(per_node), per_node, s=8, alpha=0.4, color="tab:gray")
    axes[2].plot(rounds, eps_max, "s-", color="tab:red", label="max")
    axes[2].set_title("ε per node (cumulative)")
    for ax in axes:
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(directory / "rounds.png", dpi=110)
    plt.close(fig)
