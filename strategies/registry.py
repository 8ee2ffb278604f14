"""Flower's Message-API strategies by config name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class StrategyError(ValueError):
    """An unknown strategy name or a parameter it does not take."""


def _fedavg(**kw: Any):
    from flwr.serverapp.strategy import FedAvg

    return FedAvg(**kw)


_STRATEGIES: dict[str, Callable[..., Any]] = {"fedavg": _fedavg}


def strategy_names() -> list[str]:
    return sorted(_STRATEGIES)


def build_strategy(name: str, *, fraction_train: float, min_train_nodes: int, min_available_nodes: int):
    """A Flower strategy that samples `fraction_train` of the connected nodes each round.

    Federated evaluation on nodes is off: evaluating the global model on private data and
    returning the figures would leak it outside the DP guarantee; the server evaluates on held-out data.
    """
    try:
        factory = _STRATEGIES[name]
    except KeyError:
        raise StrategyError(f"unknown strategy {name!r}; choose one of: {', '.join(strategy_names())}") from None
    return factory(
        fraction_train=fraction_train,
        fraction_evaluate=0.0,
        min_train_nodes=min_train_nodes,
        min_evaluate_nodes=0,
        min_available_nodes=min_available_nodes,
    )
