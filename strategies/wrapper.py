"""The base of fedsafe's strategy wrappers (budget-aware selection, strikes, client-level DP, SecAgg+).

Every wrapper is one link of a chain around a Flower strategy and speaks one protocol to the round loop
(server/loop.py), declared here with no-op defaults: the loop calls these hooks on every link of the
chain (`fedsafe.strategies.state`) and never probes for them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import Message
from flwr.serverapp.strategy import Strategy


class StrategyWrapper(Strategy):
    """One link of a strategy chain: the wrapped strategy is `.strategy`, as in Flower's DP wrappers, so
    `fedsafe.strategies.state.chain` can walk it. fedsafe evaluates the global model centrally (server/loop.py),
    never on the nodes, so a wrapper configures no federated evaluation."""

    strategy: Strategy
    # True when the server never holds a node's update in the clear (SecAgg+): the loop then neither
    # expects plaintext arrays nor validates them.
    hides_updates: bool = False

    # ---- what the loop tells every link --------------------------------------------------------
    def observe_replies(self, server_round: int, replies: list[Message]) -> None:
        """Every reply of the round, error replies included, before validation."""

    def round_report(self, server_round: int) -> dict[str, Any]:
        """Fields this link adds to the round's record."""
        return {}

    def excluded_nodes(self) -> Iterable[int]:
        """Nodes this link will not train any more in this run (the loop samples among the others)."""
        return ()

    # ---- checkpoints -----------------------------------------------------------------------------
    def fedsafe_state_dict(self) -> dict[str, Any]:
        """This link's own state (the wrapped strategy's is saved by strategies/state.py's chain walk)."""
        return {}

    def fedsafe_load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `fedsafe_state_dict` returned."""

    # ---- Flower's Strategy: pass through by default ------------------------------------------------
    def configure_train(self, server_round, arrays, config, grid):
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round, arrays, config, grid):
        return []

    def aggregate_evaluate(self, server_round, replies):
        return None

    def summary(self) -> None:
        self.strategy.summary()
