"""What a researcher or operator reads at the end: a summary table, the files written, ledger balances."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from server.config import RunConfig
from server.loop import RunOutcome


def _fmt(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def print_summary(outcome: RunOutcome, cfg: RunConfig, seconds: float) -> None:
    console = Console()
    table = Table(title=f"fedsafe: {cfg.model} on {cfg.dataset}, {len(outcome.node_epsilon) or 'all'} nodes")
    for column in ("round", "accuracy", "loss", "F1", "AUROC", "ε max", "ε mean", "replies"):
        table.add_column(column, justify="right")
    for h in outcome.history:
        ev = h.get("eval", {})
        replies = "" if h["round"] == 0 else f"{h['replies']}/{h['sent']}"
        table.add_row(str(h["round"]), _fmt(ev.get("accuracy")), _fmt(ev.get("loss")), _fmt(ev.get("f1")),
                      _fmt(ev.get("auroc")), _fmt(h.get("epsilon_max"), 2), _fmt(h.get("epsilon_mean"), 2), replies)
    console.print(table)
    final = outcome.history[-1].get("eval", {}) if outcome.history else {}
    eps = max(outcome.node_epsilon.values()) if outcome.node_epsilon else None
    privacy = f"ε {eps:.3f} (max over nodes), δ={cfg.delta:g}" if eps is not None else "no DP"
    console.print(f"final accuracy {_fmt(final.get('accuracy'))} at {privacy}; {seconds:.1f}s wall")
    console.print(f"results: {cfg.out_path}/metrics.json, metrics.csv, accuracy_epsilon.png, checkpoint.pt")


def print_ledgers(state_dir: str, delta: float) -> None:
    from client.ledger import PrivacyLedger

    directory = Path(state_dir).expanduser()
    files = sorted(directory.glob("*.json"))
    if not files:
        Console().print(f"no privacy ledgers in {directory}")
        return
    table = Table(title=f"privacy ledgers in {directory} (δ={delta:g})")
    for column in ("data", "ε spent", "steps", "rounds", "runs"):
        table.add_column(column, justify="right")
    for path in files:
        key = json.loads(path.read_text())["data_key"]
        ledger = PrivacyLedger.open(directory, key)
        table.add_row(key, f"{ledger.epsilon(delta):.3f}", str(ledger.total_steps),
                      str(len(ledger.state_dict()["rounds"])), str(len(ledger.state_dict()["runs"])))
    Console().print(table)
