"""What the server loop needs from a strategy beyond Flower's interface: its state for checkpoints, and
what it has to say about a round.

A strategy here may be a chain of wrappers (budget-aware selection → client-level DP → a Flower
strategy); each wrapper holds the next one in `.strategy`, as Flower's DP wrappers do. The functions
below walk that chain so the loop never needs to know which strategy it drives.

State saved per link: FedAdam/FedYogi/FedAdagrad moments (m_t, v_t), FedAvgM's momentum vector, the
adaptive clipping norm of Flower's DP wrapper, the client-level privacy accountant, the budget-aware
view of each node's ledger. Everything else a Flower strategy holds is rebuilt from the global model in
`configure_train`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any, TypeVar

import numpy as np
from flwr.app import Array, ArrayRecord, Message

from .registry import StrategyError
from .wrapper import StrategyWrapper

STATE_VERSION = 1
T = TypeVar("T")


def chain(strategy: Any) -> Iterator[Any]:
    """The strategy and every strategy it wraps, outermost first."""
    seen = set()
    while strategy is not None and id(strategy) not in seen:
        seen.add(id(strategy))
        yield strategy
        strategy = getattr(strategy, "strategy", None)


def _link_state(link: Any) -> dict[str, Any]:
    from flwr.serverapp.strategy import (
        DifferentialPrivacyServerSideAdaptiveClipping,
        DifferentialPrivacyServerSideFixedClipping,
        FedAvgM,
    )
    from flwr.serverapp.strategy.fedopt import FedOpt

    if isinstance(link, StrategyWrapper):
        return link.fedsafe_state_dict()
    if isinstance(link, FedOpt):
        return {"m_t": copy.deepcopy(link.m_t), "v_t": copy.deepcopy(link.v_t)}
    if isinstance(link, FedAvgM):
        return {"momentum_vector": copy.deepcopy(link.momentum_vector)}
    if isinstance(link, DifferentialPrivacyServerSideFixedClipping):
        return {"accountant": link.accountant.state_dict() if link.accountant is not None else None}
    if isinstance(link, DifferentialPrivacyServerSideAdaptiveClipping):
        return {"clipping_norm": float(link.clipping_norm)}
    return {}


def _load_link_state(link: Any, state: dict[str, Any]) -> None:
    from flwr.serverapp.strategy import (
        DifferentialPrivacyServerSideAdaptiveClipping,
        DifferentialPrivacyServerSideFixedClipping,
        FedAvgM,
    )
    from flwr.serverapp.strategy.fedopt import FedOpt

    if isinstance(link, StrategyWrapper):
        link.fedsafe_load_state_dict(state)
    elif isinstance(link, FedOpt):
        link.m_t, link.v_t = copy.deepcopy(state["m_t"]), copy.deepcopy(state["v_t"])
    elif isinstance(link, FedAvgM):
        link.momentum_vector = copy.deepcopy(state["momentum_vector"])
    elif isinstance(link, DifferentialPrivacyServerSideFixedClipping):
        if state.get("accountant") is not None:
            link.accountant.load_state_dict(state["accountant"])
    elif isinstance(link, DifferentialPrivacyServerSideAdaptiveClipping):
        link.clipping_norm = float(state["clipping_norm"])


def _names(strategy: Any) -> list[str]:
    return [type(link).__name__ for link in chain(strategy)]


def strategy_state_dict(strategy: Any) -> dict[str, Any]:
    """Everything the strategy chain must remember across a coordinator restart (picklable)."""
    return {
        "version": STATE_VERSION,
        "chain": _names(strategy),
        "links": [_link_state(link) for link in chain(strategy)],
    }


def load_strategy_state_dict(strategy: Any, state: dict[str, Any] | None) -> None:
    """Restore what `strategy_state_dict` saved into a freshly built strategy of the same kind."""
    if not state:
        return
    if state.get("version") != STATE_VERSION:
        raise StrategyError(f"strategy state version {state.get('version')!r}; expected {STATE_VERSION}")
    if state["chain"] != _names(strategy):
        raise StrategyError(
            f"the checkpoint was written by strategy {' → '.join(state['chain'])}; this run builds "
            f"{' → '.join(_names(strategy))}: resume with the run's original strategy settings"
        )
    for link, link_state in zip(chain(strategy), state["links"], strict=True):
        _load_link_state(link, link_state)


def wrappers(strategy: Any) -> list[StrategyWrapper]:
    """fedsafe's links of the chain (Flower's own strategies and DP wrappers are not), outermost first."""
    return [link for link in chain(strategy) if isinstance(link, StrategyWrapper)]


def find_link(strategy: Any, kind: type[T]) -> T | None:
    """The outermost link of the chain that is a `kind`, or None."""
    return next((link for link in chain(strategy) if isinstance(link, kind)), None)


def round_report(strategy: Any, server_round: int) -> dict[str, Any]:
    """Fields the strategy chain adds to the round record (skipped nodes, client-level ε, …)."""
    report: dict[str, Any] = {}
    for link in reversed(wrappers(strategy)):
        report.update(link.round_report(server_round))
    return report


def observe_replies(strategy: Any, server_round: int, replies: list[Message]) -> None:
    """Show every reply of the round, errors included, to the wrappers that keep track of nodes."""
    for link in wrappers(strategy):
        link.observe_replies(server_round, replies)


def excluded_nodes(strategy: Any) -> set[int]:
    """Nodes some link of the chain will not train again in this run."""
    return {int(node) for link in wrappers(strategy) for node in link.excluded_nodes()}


def hides_updates(strategy: Any) -> bool:
    """Whether the server never sees a node's update in the clear (secure aggregation)."""
    return any(link.hides_updates for link in wrappers(strategy))


def conform_arrays(reference: ArrayRecord, arrays: ArrayRecord) -> ArrayRecord:
    """`arrays` with the dtypes of `reference` (the global model's).

    Some of Flower's server optimisers (FedAdam's bias-corrected step, for one) return float64 arrays
    for a float32 model; the next round's updates would then fail validation against the global model.
    """
    out = ArrayRecord()
    for key in arrays.keys():
        value = arrays[key]
        if key in reference.keys() and value.dtype != reference[key].dtype:
            target = reference[key].numpy().dtype
            out[key] = Array(np.asarray(value.numpy(), dtype=target))
        else:
            out[key] = value
    return out
