"""Per-round results on the coordinator's disk: JSON and CSV as the run goes, a plot at the end."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any

CSV_COLUMNS = (
    "round", "accuracy", "loss", "f1", "auroc", "epsilon_max", "epsilon_mean", "replies", "failures",
    "budget_refusals", "rejected", "seconds",
)


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
        rows = [
            {c: ("" if r.get(c) is None else r.get(c)) for c in CSV_COLUMNS}
            for r in ({**h, **{f"{k}": v for k, v in h.get("eval", {}).items()}} for h in history)
        ]
        tmp = self.directory / "metrics.csv.tmp"
        with tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.directory / "metrics.csv")

    def plot(self, history: list[dict[str, Any]]) -> Path:
        """A PNG of accuracy and ε per round."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rounds = [h["round"] for h in history]
        accuracy = [h.get("eval", {}).get("accuracy") for h in history]
        eps_max = [h.get("epsilon_max") for h in history]
        fig, ax_acc = plt.subplots(figsize=(7, 4))
        ax_acc.plot(rounds, accuracy, "o-", color="tab:blue", label="test accuracy")
        ax_acc.set_xlabel("round")
        ax_acc.set_ylabel("accuracy", color="tab:blue")
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
