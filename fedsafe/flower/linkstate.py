"""Flower 1.41's in-memory LinkState (`flwr.server.superlink.linkstate.in_memory_linkstate`): seeded ids.

Replaces, while a simulation registers its nodes, `in_memory_linkstate.generate_rand_int_from_bytes`,
from which the LinkState draws node ids (and run and task ids) with `os.urandom`. Flower samples nodes
from a set of those ids, so the same seed would still train different nodes; seeded ids make client
sampling reproducible. `run_simulation` takes no seed, and the LinkState no id source.

Guard: tests/test_flower_adapters.py registers nodes in real in-memory LinkStates the way Flower's
simulation engine does and checks the ids they get.
"""

from __future__ import annotations

import contextlib
import random

from . import replaced

ID_SOURCE = "flwr.server.superlink.linkstate.in_memory_linkstate:generate_rand_int_from_bytes"


def seeded_ids(seed: int):
    """A drop-in for Flower's `generate_rand_int_from_bytes(num_bytes, exclude)`, drawing from `seed`."""
    rng = random.Random(seed)

    def generate_rand_int_from_bytes(num_bytes: int, exclude: set[int] | None = None) -> int:
        while True:
            value = rng.getrandbits(8 * num_bytes)
            if value and not (exclude and value in exclude):
                return value

    return generate_rand_int_from_bytes


@contextlib.contextmanager
def deterministic_node_ids(seed: int):
    """In-memory LinkStates draw their node ids from `seed` while the block runs."""
    with replaced(ID_SOURCE, seeded_ids(seed), "reproducible node ids in simulations"):
        yield
