"""How updates are combined and guarded: Flower strategies by name, update validation, exclusion of
nodes whose updates keep failing validation, and strategy state for checkpoints."""

from .registry import StrategyError, build_strategy, strategy_names
from .state import load_strategy_state, strategy_state
from .strikes import StrikesStrategy
from .validation import UpdateRejected, validate_update

__all__ = [
    "StrategyError", "StrikesStrategy", "UpdateRejected", "build_strategy", "load_strategy_state",
    "strategy_names", "strategy_state", "validate_update",
]
