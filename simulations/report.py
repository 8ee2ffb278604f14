"""What a researcher or operator reads at the end: a summary table, the files written, ledger balances."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from fedsafe.server.config import RunConfig
from fedsafe.server.loop import RunOutcome


def _fmt(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def print_summary(outcome: RunOutcome, cfg: RunConfig, seconds: float) -> None:
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
    privacy = f"ε {eps:.3f} (max over nodes), δ={cfg.delta:g}" if eps is not None else "no DP"
    console.print(f"final {headline_text(final)} at {privacy}; {seconds:.1f}s wall")
    files = "metrics.json, metrics.csv, accuracy_epsilon.png, checkpoint.pt"
    if outcome.best is not None:
        best = outcome.best
        stopped = "stopped early; " if best.get("stopped_early") else ""
        console.print(f"{stopped}best round {best['round']} by {best['metric']} {best['value']:.3f}: "
                      f"{headline_text(best['eval'])} on the held-out half the choice did not see")
        files += ", best_model.pt"
    console.print(f"results: {cfg.out_path}/{files}")


def print_ledgers(ledgers, directory: Path, delta: float) -> None:
    """A table of `ledgers` (fedsafe.client.ledger.PrivacyLedger, verified) in `directory`."""
    if not ledgers:
        Console().print(f"no privacy ledgers in {directory}")
        return
    table = Table(title=f"privacy ledgers in {directory} (δ={delta:g})")
    for column in ("data", "ε spent", "steps", "rounds", "runs"):
        table.add_column(column, justify="right")
    for ledger in ledgers:
        state = ledger.state_dict()
        table.add_row(ledger.data_key, f"{ledger.epsilon(delta):.3f}", str(ledger.total_steps),
                      str(len(state["rounds"])), str(len(state["runs"])))
    Console().print(table)
