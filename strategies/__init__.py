"""How updates are combined and guarded: Flower strategies by name, and update validation."""

from .registry import StrategyError, build_strategy, strategy_names
from .validation import UpdateRejected, validate_update

__all__ = ["StrategyError", "UpdateRejected", "build_strategy", "strategy_names", "validate_update"]
