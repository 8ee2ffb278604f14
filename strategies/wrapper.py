"""The base of fedsafe's strategy wrappers (budget-aware selection, client-level DP, SecAgg+)."""

from __future__ import annotations

from flwr.serverapp.strategy import Strategy


class StrategyWrapper(Strategy):
    """One link of a strategy chain: the wrapped strategy is `.strategy`, as in Flower's DP wrappers, so
    `fedsafe.strategies.state.chain` can walk it. fedsafe evaluates the global model centrally (server/loop.py),
    never on the nodes, so a wrapper configures no federated evaluation."""

    strategy: Strategy

    def configure_evaluate(self, server_round, arrays, config, grid):
        return []

    def aggregate_evaluate(self, server_round, replies):
        return None

    def summary(self) -> None:
        self.strategy.summary()
