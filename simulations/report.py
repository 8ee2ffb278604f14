"""What a researcher or operator reads at the end: a summary table, the files written, ledger balances."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from fedsafe.server.config import RunConfig
from fedsafe.server.loop import RunOutcome


def _fmt(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def wall_time_text(outcome: RunOutcome, command_started: float, now: float, backend: str = "ray") -> str:
    """The command's whole wall time and its parts, e.g. "28.1s in all: start-up 8.3s (imports, Ray, the
    federation's data), rounds 16.0s, shut-down 3.8s (results, plots, Ray)"; perf_counter() readings.
    `backend`: where the nodes ran (simulations/backend.py); Ray is named only where it ran."""
    if not outcome.started_at or not outcome.finished_at:
        return f"{now - command_started:.1f}s in all"
    engine = ", Ray" if backend == "ray" else ""
    return (f"{now - command_started:.1f}s in all: start-up {outcome.started_at - command_started:.1f}s "
            f"(imports{engine}, the federation's data), rounds {outcome.finished_at - outcome.started_at:.1f}s, "
            f"shut-down {now - outcome.finished_at:.1f}s (results, plots{engine})")


def print_summary(outcome: RunOutcome, cfg: RunConfig, command_started: float, backend: str = "ray") -> None:
    """The run's table and the final figures; `command_started`: time.perf_counter() when the command began;
    `backend`: where the nodes ran."""
    import time

    from fedsafe.server.results import headline_text, metric_columns

    console = Console()
    table = Table(title=f"fedsafe: {cfg.model} on {cfg.dataset}, {len(outcome.node_epsilon) or 'all'} nodes")
    # the task's metrics, headline first (accuracy, r2, anomaly AUROC, mse, digits score, FD, ...)
    metrics = [m for m in metric_columns(outcome.history) if not m.startswith("val_")]
    shown = [m for m in metrics if not (m == "loss" and "mse" in metrics)][:4]  # mse is the loss there
    for column in ("round", *shown, "ε max", "ε mean", "replies"):
        table.add_column(column, justify="right")
    for h in outcome.history:
        ev = h.get("eval", {})
        replies = "" if h["round"] == 0 else f"{h['replies']}/{h['sent']}"
        table.add_row(str(h["round"]), *(_fmt(ev.get(m)) for m in shown), _fmt(h.get("epsilon_max"), 2),
                      _fmt(h.get("epsilon_mean"), 2), replies)
    console.print(table)
    final = outcome.history[-1].get("eval", {}) if outcome.history else {}
    eps = max(outcome.node_epsilon.values()) if outcome.node_epsilon else None
    privacy = f"lifetime ε {eps:.3f} (max over nodes' ledgers), δ={cfg.delta:g}" if eps is not None else "no DP"
    console.print(f"final {headline_text(final)} at {privacy}; {wall_time_text(outcome, command_started, time.perf_counter(), backend)}")
    files = "metrics.json, metrics.csv, accuracy_epsilon.png, checkpoint.pt"
    if outcome.best is not None:
        best = outcome.best
        stopped = "stopped early; " if best.get("stopped_early") else ""
        seen = ("on the held-out half the choice did not see" if best["metric"].startswith("val_")
                else "(picked on the held-out set itself, so optimistic; early stopping picks on a separate half)")
        console.print(f"{stopped}best round {best['round']} by {best['metric']} {best['value']:.3f}: "
                      f"{headline_text(best['eval'])} {seen}")
        files += ", best_model.pt"
    console.print(f"results: {cfg.out_path}/{files}")


def print_ledgers(ledgers, directory: Path, delta: float) -> None:
    """A table of `ledgers` (fedsafe.client.ledger.PrivacyLedger, verified) in `directory`."""
    if not ledgers:
        Console().print(f"no privacy ledgers in {directory}")
        return
    from fedsafe.client.accounting import AGGREGATE

    table = Table(title=f"privacy ledgers in {directory} (δ={delta:g})")
    # Distributed-DP rounds have two ε (README, "Distributed DP"): the own update's is the one shown as spent.
    distributed = any(m > 1 for ledger in ledgers for m in ledger.noise_shares)
    columns = ("data", "ε spent", *(("ε vs SecAgg+ sum",) if distributed else ()), "steps", "rounds", "runs")
    for column in columns:
        table.add_column(column, justify="right")
    for ledger in ledgers:
        state = ledger.state_dict()
        aggregate = (f"{ledger.epsilon(delta, basis=AGGREGATE):.3f}",) if distributed else ()
        table.add_row(ledger.data_key, f"{ledger.epsilon(delta):.3f}", *aggregate, str(ledger.total_steps),
                      str(len(state["rounds"])), str(len(state["runs"])))
    Console().print(table)
