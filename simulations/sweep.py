"""A grid of simulated federations, and the privacy-utility table and plot across it."""

from __future__ import annotations

import csv
import itertools
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fedsafe.server.config import ConfigError, RunConfig
from fedsafe.server.plots import plots_in_background

from .run import SimulationOptions, simulate, validate_against_data


@dataclass(frozen=True)
class SweepGrid:
    """Values to cross. An ε of `inf` is the non-private baseline."""

    epsilons: tuple[float, ...]
    strategies: tuple[str, ...]
    models: tuple[str, ...]
    alphas: tuple[float, ...]
    nodes: tuple[int, ...]

    def points(self, base: RunConfig, options: SimulationOptions, out: Path):
        for eps, strategy, model, alpha, nodes in itertools.product(
            self.epsilons, self.strategies, self.models, self.alphas, self.nodes
        ):
            setting = {"epsilon": eps, "strategy": strategy, "model": model, "alpha": alpha, "nodes": nodes}
            name = f"eps{eps:g}-{strategy}-{model}-a{alpha:g}-n{nodes}"
            cfg = replace(base, epsilon=eps if math.isfinite(eps) else base.epsilon, dp=math.isfinite(eps),
                          strategy=strategy, model=model, alpha=alpha, out_dir=str(out / name))
            yield setting, cfg, replace(options, num_nodes=nodes)


COLUMNS = ("epsilon", "strategy", "model", "alpha", "nodes", "status", "accuracy", "loss", "epsilon_max",
           "epsilon_mean", "seconds", "out_dir")
RAN = "ran"


def run_sweep(base: RunConfig, grid: SweepGrid, options: SimulationOptions, out: Path) -> list[dict[str, Any]]:
    """Run every point of the grid; a point that cannot run (refused by its checks, or failing) is a row
    whose status says why, and the sweep goes on with the rest."""
    points = list(grid.points(base, options, out))
    # Every point is checked before the first one runs: what cannot run is known (and said) up front.
    refused = {index: _why_not(cfg, point_options) for index, (_, cfg, point_options) in enumerate(points)}
    refused = {index: reason for index, reason in refused.items() if reason is not None}
    if refused:
        print(f"{len(refused)} of {len(points)} settings cannot run; they are recorded with the reason and "
              "skipped", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    with plots_in_background():  # one figure-drawing helper for every point, not one each
        for index, (setting, cfg, point_options) in enumerate(points):
            rows.append(_sweep_point(index, len(points), setting, refused.get(index), cfg, point_options))
            write_table(rows, out)  # after every point: an interrupted sweep keeps what it finished
    plot_privacy_utility([r for r in rows if r["status"] == RAN and r["accuracy"] is not None], out)
    return rows


def _sweep_point(index: int, total: int, setting: dict[str, Any], refusal: str | None, cfg: RunConfig,
                 point_options: SimulationOptions) -> dict[str, Any]:
    label = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in setting.items())
    print(f"[{index + 1}/{total}] {label}", flush=True)
    row = _failed_row(setting, refusal) if refusal is not None else _run_point(setting, cfg, point_options)
    if row["status"] != RAN:
        print(f"      {row['status']}", flush=True)
    else:
        accuracy = "n/a" if row["accuracy"] is None else f"{row['accuracy']:.3f}"
        print(f"      accuracy {accuracy}, ε max "
              + ("off" if row["epsilon_max"] is None else f"{row['epsilon_max']:.2f}")
              + f", {row['seconds']}s", flush=True)
    return row


def _why_not(cfg: RunConfig, options: SimulationOptions) -> str | None:
    try:
        validate_against_data(cfg, options)
    except ConfigError as err:
        return f"cannot run: {err}"
    return None


def _failed_row(setting: dict[str, Any], status: str) -> dict[str, Any]:
    return {**setting, "status": " ".join(status.split())}  # one line, for the table and the terminal


def _run_point(setting: dict[str, Any], cfg: RunConfig, options: SimulationOptions) -> dict[str, Any]:
    from fedsafe.client.data import DataError

    started = time.perf_counter()
    try:
        outcome = simulate(cfg, options, progress=None)
    except (ConfigError, DataError) as err:  # found only when the federation is built (e.g. a partition)
        return _failed_row(setting, f"cannot run: {err}")
    except RuntimeError as err:  # the run started and broke off (Ray, the simulation engine)
        return _failed_row(setting, f"failed: {type(err).__name__}: {err}")
    final = outcome.history[-1]
    eps = outcome.node_epsilon
    return {
        **setting,
        "status": RAN,
        "accuracy": final.get("eval", {}).get("accuracy"),
        "loss": final.get("eval", {}).get("loss"),
        "epsilon_max": max(eps.values()) if eps else None,
        "epsilon_mean": sum(eps.values()) / len(eps) if eps else None,
        "seconds": round(time.perf_counter() - started, 1),
        "out_dir": cfg.out_dir,
    }


def write_table(rows: list[dict[str, Any]], out: Path) -> Path:
    path = out / "privacy_utility.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: ("" if r.get(k) is None else r[k]) for k in COLUMNS} for r in rows)
    return path


def plot_privacy_utility(rows: list[dict[str, Any]], out: Path) -> Path:
    """Accuracy against ε, one line per other setting; non-private baselines as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    keyed: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        keyed.setdefault((row["strategy"], row["model"], row["alpha"], row["nodes"]), []).append(row)
    for index, ((strategy, model, alpha, nodes), group) in enumerate(sorted(keyed.items())):
        color = plt.get_cmap("tab10")(index % 10)
        label = f"{model}, {strategy}, α={alpha:g}, {nodes} nodes"
        private = sorted((r for r in group if math.isfinite(r["epsilon"])), key=lambda r: r["epsilon"])
        if private:
            ax.plot([r["epsilon"] for r in private], [r["accuracy"] for r in private], "o-", color=color, label=label)
        for r in group:
            if not math.isfinite(r["epsilon"]):
                ax.axhline(r["accuracy"], color=color, linestyle="--", linewidth=1,
                           label=f"{label} (no DP)")
    ax.set_xscale("log")
    ax.set_xlabel("ε per node (δ fixed)")
    ax.set_ylabel("test accuracy")
    ax.set_title("privacy-utility trade-off")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "privacy_utility.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def parse_list(text: str, kind, name: str) -> tuple:
    try:
        values = tuple(kind(v.strip()) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"--{name}: {text!r} is not a comma-separated list of {kind.__name__} values") from None
    if not values:
        raise ConfigError(f"--{name} needs at least one value")
    return values
