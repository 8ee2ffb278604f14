"""How updates are combined and guarded: Flower strategies by name, and update validation."""

from .registry import StrategyError, build_strategy, strategy_names
from .validation import UpdateRejected, complete_update, keep_frozen, validate_update

__all__ = ["StrategyError", "UpdateRejected", "build_strategy", "complete_update", "keep_frozen", "strategy_names", "validate_update"]
