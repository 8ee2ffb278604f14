"""How updates are combined and guarded: Flower strategies by name, wrappers fedsafe adds around them
(client-level DP, budget-aware selection), their checkpointed state, and update validation."""

from .registry import PARAM_DEFAULTS, StrategyError, build_strategy, check_strategy, strategy_names, strategy_spec
from .state import (
    conform_arrays,
    load_strategy_state_dict,
    observe_replies,
    round_report,
    strategy_state_dict,
)
from .strikes import StrikesStrategy
from .validation import (
    DP_REPLY_FIELDS,
    NormBound,
    UpdateRejected,
    complete_update,
    keep_frozen,
    num_examples_cap,
    update_norm_bound,
    validate_dp_metrics,
    validate_update,
)

__all__ = [
    "DP_REPLY_FIELDS", "PARAM_DEFAULTS", "StrategyError", "StrikesStrategy", "UpdateRejected", "build_strategy", "check_strategy", "complete_update",
    "conform_arrays", "keep_frozen", "load_strategy_state_dict", "observe_replies", "round_report",
    "strategy_names", "strategy_spec", "strategy_state_dict", "num_examples_cap", "update_norm_bound", "validate_dp_metrics",
    "validate_update", "NormBound",
]
