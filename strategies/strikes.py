"""Exclude nodes whose updates keep failing validation: a wrapper around any Flower Message-API strategy.

The coordinator's loop validates every reply (strategies/validation.py) and tells this wrapper about
each rejected and each accepted update. A node whose last `max_strikes` updates were all rejected
(NaN, wrong shapes, an update norm over the bound, …) gets no more train messages in this run: the
loop samples among the other connected nodes (server/loop.py), and the wrapper drops any message the
inner strategy's `configure_train` still addresses to it. An accepted update resets the count; error
replies and missing replies (a refused budget, a crash, a timeout) neither count nor reset. The counts
and the excluded set are part of the coordinator's checkpoint. When every connected node is excluded
the run stops, with that reason.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

log = logging.getLogger("fedsafe.server")


class StrikesStrategy:
    def __init__(self, inner: Any, max_strikes: int) -> None:
        if max_strikes < 0:
            raise ValueError(f"max-strikes must be >= 0 (0: never exclude); got {max_strikes}")
        self.strategy = self.inner = inner  # `.strategy`: the next link (strategies/state.py walks it)
        self.max_strikes = max_strikes
        self.strikes: dict[int, int] = {}
        self.excluded: dict[int, str] = {}  # node id -> reason of the strike that excluded it

    # ---- told by the coordinator's loop ------------------------------------------------------------
    def record_rejection(self, node_id: int, reason: str, server_round: int) -> None:
        node_id = int(node_id)
        self.strikes[node_id] = self.strikes.get(node_id, 0) + 1
        count = self.strikes[node_id]
        log.warning("round %d: node %d update rejected (strike %d%s): %s", server_round, node_id, count,
                    f" of {self.max_strikes}" if self.max_strikes else "", reason)
        if self.max_strikes and count >= self.max_strikes and node_id not in self.excluded:
            self.excluded[node_id] = reason
            log.warning("node %d excluded from sampling for the rest of the run: %d rejected updates in a row "
                        "(last: %s)", node_id, count, reason)

    def record_accepted(self, node_id: int) -> None:
        self.strikes[int(node_id)] = 0

    # ---- the strategy surface ----------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays, config, grid) -> Iterable:
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        kept = [m for m in messages if int(m.metadata.dst_node_id) not in self.excluded]
        dropped = sorted(int(m.metadata.dst_node_id) for m in messages if int(m.metadata.dst_node_id) in self.excluded)
        if dropped:
            log.warning("round %d: not sending to excluded node(s) %s", server_round, dropped)
        return kept

    def __getattr__(self, name: str) -> Any:  # aggregate_train, configure_evaluate, summary, …
        return getattr(self.inner, name)

    # ---- checkpoint ----------------------------------------------------------------------------------
    def fedsafe_state_dict(self) -> dict[str, Any]:
        """This link's own state; the wrapped strategy's is saved by strategies/state.py's chain walk."""
        return {
            "strikes": {str(k): v for k, v in self.strikes.items()},
            "excluded": {str(k): v for k, v in self.excluded.items()},
        }

    def fedsafe_load_state_dict(self, state: dict[str, Any]) -> None:
        self.strikes = {int(k): int(v) for k, v in state.get("strikes", {}).items()}
        self.excluded = {int(k): str(v) for k, v in state.get("excluded", {}).items()}
