"""Budget-aware node selection: do not ask a node for a round its privacy ledger cannot afford.

Every private reply carries the node's ledger figures (client/app.py): `epsilon` (all spend on its
data), `max-epsilon` (its operator's lifetime cap), `epsilon-next` (what `epsilon` would be after one
more round of this run), `run-epsilon` (what it granted this run) and `run-epsilon-next`. A node whose
last figures say the next round would pass either limit, or that refused a round for its budget, is
left out of sampling; the round record says who and why. Nodes never heard from are sampled: the node
itself enforces its budget, this only saves a wasted round trip and keeps the sample full.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp.strategy import Strategy

from fedsafe.protocol import (
    BUDGET_EXHAUSTED, EPSILON, EPSILON_NEXT, MAX_EPSILON, METRICS, RUN_EPSILON, RUN_EPSILON_NEXT,
)

from .client_dp import RunStop
from .state import chain
from .wrapper import StrategyWrapper

SLACK = 1e-9


class _FilteredGrid:
    """The grid as the wrapped strategy should see it: without the nodes that cannot afford a round."""

    def __init__(self, grid, excluded: set[int]) -> None:
        self._grid, self.excluded = grid, excluded

    def get_node_ids(self):
        return [n for n in self._grid.get_node_ids() if n not in self.excluded]

    def __getattr__(self, name: str):
        return getattr(self._grid, name)


class BudgetAwareSelection(StrategyWrapper):
    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy
        self.ledgers: dict[int, dict[str, float]] = {}  # node → last reported ledger figures
        self.refused: dict[int, str] = {}  # node → its last budget refusal
        self._skipped: dict[int, list[dict[str, Any]]] = {}

    # ---- what the nodes said -----------------------------------------------------------------
    def observe_replies(self, server_round: int, replies: list[Message]) -> None:
        for reply in replies:
            node = int(reply.metadata.src_node_id)
            if reply.has_error():
                if reply.error.code == BUDGET_EXHAUSTED:
                    self.refused[node] = reply.error.reason
                continue
            metrics = reply.content.get(METRICS)
            if metrics is None or EPSILON not in metrics:
                continue
            previous = self.ledgers.get(node, {})
            figures = {k: float(metrics[k]) for k in
                       (EPSILON, MAX_EPSILON, EPSILON_NEXT, RUN_EPSILON, RUN_EPSILON_NEXT) if k in metrics}
            figures["previous-epsilon"] = previous.get("epsilon", 0.0)
            self.ledgers[node] = figures
            self.refused.pop(node, None)

    def why_not(self, node: int) -> str | None:
        """Why `node` cannot afford the next round, or None if it can (or nothing is known)."""
        if node in self.refused:
            return f"refused its last round: {self.refused[node]}"
        figures = self.ledgers.get(node)
        if not figures or "max-epsilon" not in figures:
            return None
        eps, cap = figures["epsilon"], figures["max-epsilon"]
        # Without a projection, assume the next round costs what the last one did (RDP composition
        # makes later rounds cheaper, so this over-estimates).
        nxt = figures.get("epsilon-next", eps + (eps - figures["previous-epsilon"]))
        if nxt > cap + SLACK:
            return f"ledger at ε={eps:.3f}; the next round would reach ε={nxt:.3f}, over its cap ε={cap:g}"
        if "run-epsilon" in figures and "run-epsilon-next" in figures:
            if figures["run-epsilon-next"] > figures["run-epsilon"] + SLACK:
                return (f"the next round would take this run to ε={figures['run-epsilon-next']:.3f}, over the "
                        f"ε={figures['run-epsilon']:g} the node granted it")
        return None

    # ---- Strategy ----------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid) -> Iterable[Message]:
        connected = list(grid.get_node_ids())
        skipped = [{"node": n, "reason": reason} for n in connected if (reason := self.why_not(n))]
        self._skipped[server_round] = skipped
        if not skipped:
            return self.strategy.configure_train(server_round, arrays, config, grid)
        if len(skipped) == len(connected):
            raise RunStop(f"no connected node can afford another round ({len(skipped)} skipped for their budget)")
        excluded = {s["node"] for s in skipped}
        with _fewer_nodes_needed(self.strategy, len(connected) - len(excluded)):
            return list(self.strategy.configure_train(server_round, arrays, config, _FilteredGrid(grid, excluded)))

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        return self.strategy.aggregate_train(server_round, replies)

    def round_report(self, server_round: int) -> dict[str, Any]:
        skipped = self._skipped.pop(server_round, [])
        return {"skipped": len(skipped), "skipped_nodes": skipped}

    # ---- checkpoints ---------------------------------------------------------------------
    def fedsafe_state_dict(self) -> dict[str, Any]:
        return {"ledgers": {str(k): dict(v) for k, v in self.ledgers.items()},
                "refused": {str(k): v for k, v in self.refused.items()}}

    def fedsafe_load_state_dict(self, state: dict[str, Any]) -> None:
        self.ledgers = {int(k): dict(v) for k, v in state.get("ledgers", {}).items()}
        self.refused = {int(k): v for k, v in state.get("refused", {}).items()}


@contextlib.contextmanager
def _fewer_nodes_needed(strategy: Strategy, available: int):
    """Lower the wrapped strategies' node minimums to what can be sampled, for one configure_train:
    Flower's sampler would otherwise wait forever for nodes that are connected but left out."""
    saved = []
    for link in chain(strategy):
        for attr in ("min_available_nodes", "min_train_nodes"):
            if isinstance(getattr(link, attr, None), int) and not isinstance(getattr(link, attr), bool):
                if attr == "min_train_nodes" and getattr(link, "sample_size", None) is not None:
                    continue  # client-level DP keeps its n (and stops the run when it cannot have it)
                saved.append((link, attr, getattr(link, attr)))
                setattr(link, attr, min(getattr(link, attr), available))
    try:
        yield
    finally:
        for link, attr, value in saved:
            setattr(link, attr, value)
