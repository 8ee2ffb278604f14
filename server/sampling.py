"""Which nodes train each round: sampled by the coordinator with its own seeded generator.

Flower's strategies sample with the process-wide `random` from a set of node ids, which neither a seed
nor a checkpoint can pin down. fedsafe samples here instead and shows the strategy only the sampled
nodes, so the same seed trains the same nodes and a resumed run continues the same sequence.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterable
from typing import Any

log = logging.getLogger("fedsafe.server")


class NodeSampler:
    def __init__(self, seed: int, fraction: float, min_nodes: int, min_sample: int = 1) -> None:
        self.fraction = fraction
        self.min_nodes = min_nodes
        self.min_sample = min_sample
        self._rng = random.Random(seed)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self._rng.getstate()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._rng.setstate(state["rng"])

    def wait_for_nodes(self, grid, timeout: float, poll: float = 1.0) -> list[int]:
        """The connected nodes, once at least `min_nodes` are; raises TimeoutError after `timeout` s."""
        deadline = time.monotonic() + timeout
        while len(nodes := sorted(grid.get_node_ids())) < self.min_nodes:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"only {len(nodes)} nodes connected after {timeout:.0f}s; min-nodes is {self.min_nodes}"
                )
            log.info("waiting for nodes: %d connected, %d needed", len(nodes), self.min_nodes)
            time.sleep(poll)
        return nodes

    def sample(self, nodes: list[int]) -> list[int]:
        size = min(len(nodes), max(self.min_sample, int(len(nodes) * self.fraction)))
        return sorted(self._rng.sample(sorted(nodes), size))


class SampledGrid:
    """A view of a Flower Grid in which only the sampled nodes are connected."""

    def __init__(self, grid, node_ids: Iterable[int]) -> None:
        self._grid = grid
        self._node_ids = list(node_ids)

    def get_node_ids(self) -> list[int]:
        return list(self._node_ids)

    def __getattr__(self, name: str):
        return getattr(self._grid, name)
