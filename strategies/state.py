"""A strategy's state across coordinator restarts: what a resumed run must restore to continue exactly.

Flower's Message-API strategies keep their server-side optimiser state in attributes (FedOpt family:
`current_arrays`, `m_t`, `v_t`; FedAvgM: `current_arrays`, `momentum_vector`); FedAvg keeps none.
A strategy (or wrapper) with `state_dict()` / `load_state_dict()` is asked; otherwise those attributes
are copied. The result holds plain Python, NumPy arrays and nested dicts/lists: `torch.save`-able.
"""

from __future__ import annotations

import copy
from typing import Any

from flwr.app import ArrayRecord

OPTIMIZER_ATTRIBUTES = ("current_arrays", "m_t", "v_t", "momentum_vector")


def _plain(value: Any) -> Any:
    if isinstance(value, ArrayRecord):
        return {"__arrayrecord__": {k: v.numpy() for k, v in value.items()}}
    return copy.deepcopy(value)


def _restore(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"__arrayrecord__"}:
        from flwr.app import Array

        return ArrayRecord({k: Array.from_numpy_ndarray(v) for k, v in value["__arrayrecord__"].items()})
    return copy.deepcopy(value)


def strategy_state(strategy: Any) -> dict[str, Any]:
    own = getattr(type(strategy), "state_dict", None)
    if callable(own):
        return strategy.state_dict()
    return {name: _plain(getattr(strategy, name)) for name in OPTIMIZER_ATTRIBUTES if hasattr(strategy, name)}


def load_strategy_state(strategy: Any, state: dict[str, Any] | None) -> None:
    if not state:
        return
    own = getattr(type(strategy), "load_state_dict", None)
    if callable(own):
        strategy.load_state_dict(state)
        return
    for name, value in state.items():
        if name in OPTIMIZER_ATTRIBUTES:
            setattr(strategy, name, _restore(value))
