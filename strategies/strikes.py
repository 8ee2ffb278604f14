"""Exclude nodes whose updates keep failing validation: a wrapper around any Flower Message-API strategy.

The coordinator's loop validates every reply (strategies/validation.py) and tells this wrapper about
each rejected and each accepted update. A node that had `max_strikes` of its last `window` updates
rejected (NaN, wrong shapes, an update norm over the bound, missing DP fields, …) gets no more train
messages in this run: the loop samples among the other connected nodes (server/loop.py), and the
wrapper drops any message the inner strategy's `configure_train` still addresses to it.

Strikes are counted in a sliding window, not only in a row: a node that alternates good and bad updates
(a good one now and then to wipe its record) is excluded all the same. Error replies and missing
replies (a refused budget, a crash, a timeout) are no updates: they neither count nor move the window.
The window and the excluded set are part of the coordinator's checkpoint. When every connected node is
excluded the run stops, with that reason.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from .wrapper import StrategyWrapper

log = logging.getLogger("fedsafe.server")

# A node's last updates looked at. With the default max-strikes 3, a node alternating rejected and
# accepted updates is excluded at its 5th update; an honest node that trips validation once in a while
# (a transient fault) needs three faults among ten updates.
STRIKE_WINDOW = 10


class StrikesStrategy(StrategyWrapper):
    def __init__(self, inner: Any, max_strikes: int, window: int = STRIKE_WINDOW) -> None:
        if max_strikes < 0:
            raise ValueError(f"max-strikes must be >= 0 (0: never exclude); got {max_strikes}")
        if window < max(max_strikes, 1):
            raise ValueError(f"the strike window ({window}) must hold at least max-strikes ({max_strikes}) updates")
        self.strategy = inner
        self.max_strikes, self.window = max_strikes, window
        self.recent: dict[int, list[bool]] = {}  # node id -> its last `window` updates, True: rejected
        self.excluded: dict[int, str] = {}  # node id -> reason of the strike that excluded it

    @property
    def inner(self) -> Any:
        return self.strategy

    def strikes(self, node_id: int) -> int:
        """Rejected updates among the node's last `window`."""
        return sum(self.recent.get(int(node_id), []))

    # ---- told by the coordinator's loop ------------------------------------------------------------
    def record_rejection(self, node_id: int, reason: str, server_round: int, label: str | None = None) -> None:
        """`label`: what the log calls the node (its registered name, fedsafe.server.node_names); its id
        without one."""
        node_id = int(node_id)
        label = label or str(node_id)
        self._remember(node_id, True)
        count = self.strikes(node_id)
        log.warning("round %d: node %s update rejected (strike %d%s in its last %d updates): %s", server_round,
                    label, count, f" of {self.max_strikes}" if self.max_strikes else "", self.window, reason)
        if self.max_strikes and count >= self.max_strikes and node_id not in self.excluded:
            self.excluded[node_id] = reason
            log.warning("node %s excluded from sampling for the rest of the run: %d of its last %d updates "
                        "rejected (last: %s)", label, count, len(self.recent[node_id]), reason)

    def record_accepted(self, node_id: int) -> None:
        self._remember(int(node_id), False)

    def _remember(self, node_id: int, rejected: bool) -> None:
        self.recent[node_id] = (self.recent.get(node_id, []) + [rejected])[-self.window:]

    def excluded_nodes(self) -> Iterable[int]:
        return self.excluded

    # ---- the strategy surface ----------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays, config, grid) -> Iterable:
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        kept = [m for m in messages if int(m.metadata.dst_node_id) not in self.excluded]
        dropped = sorted(int(m.metadata.dst_node_id) for m in messages if int(m.metadata.dst_node_id) in self.excluded)
        if dropped:
            log.warning("round %d: not sending to excluded node(s) %s", server_round, dropped)
        return kept

    def round_report(self, server_round: int) -> dict[str, Any]:
        return {"excluded": sorted(self.excluded)} if self.excluded else {}

    # ---- checkpoint ----------------------------------------------------------------------------------
    def fedsafe_state_dict(self) -> dict[str, Any]:
        return {
            "recent": {str(k): [int(r) for r in v] for k, v in self.recent.items()},
            "excluded": {str(k): v for k, v in self.excluded.items()},
        }

    def fedsafe_load_state_dict(self, state: dict[str, Any]) -> None:
        self.recent = {int(k): [bool(r) for r in v][-self.window:] for k, v in state.get("recent", {}).items()}
        self.excluded = {int(k): str(v) for k, v in state.get("excluded", {}).items()}
