"""Flower 1.41's simulation engine (`flwr.server.superlink.fleet.vce`), as fedsafe runs it.

Replaces, while a simulation runs:

* `vce_api.add_messages_to_queue`, the dispatcher that hands stored messages to the backend's workers.
  Flower's polls every registered node for messages ten times a second, and each poll scans every stored
  message: O(nodes × messages) under one lock, which stalls 10,000 virtual nodes. `run_api` starts it
  as a thread target looked up in the module, and no backend config chooses another.
* `raybackend.RayBackend._validate_actor_arguments`, which makes the keyword arguments of every Ray
  actor. Flower gives actors an init function only for TensorFlow (its `actor` backend config holds
  nothing else); fedsafe's warm-up makes each actor import PyTorch and Opacus and load the federation's
  data when it is created, while the coordinator prepares round 1, instead of inside round 1.
* `vce_api._register_nodes`, which registers the virtual nodes without a name (`run_simulation` takes
  none): fedsafe's names each after its partition (`node-3`) in the LinkState, as a deployment's
  registration names a node, so results and log lines name it (fedsafe.server.node_names reads the
  names back through the grid). Guard: tests/test_node_names.py registers nodes with Flower's own
  `_register_nodes` in a real in-memory LinkState and reads the names back.

Guard: tests/test_flower_adapters.py runs Flower's own `run_api` with the replaced dispatcher on a real
in-memory LinkState, and builds a real RayBackend whose actors get the warm-up.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from . import flower_piece, replaced

DISPATCHER = "flwr.server.superlink.fleet.vce.vce_api:add_messages_to_queue"
ACTOR_ARGUMENTS = "flwr.server.superlink.fleet.vce.backend.raybackend:RayBackend._validate_actor_arguments"
NODE_REGISTRATION = "flwr.server.superlink.fleet.vce.vce_api:_register_nodes"

# The simulated grid is an in-memory store: polling it costs no network request, so replies and new
# messages are picked up within this many seconds rather than the deployment's poll-interval.
SIMULATED_GRID_POLL_SECONDS = 0.02


def dispatch_pending_messages(state, queue, nodes_mapping, f_stop) -> None:
    """Flower's dispatcher, polling only the nodes that have a message waiting (cheap enough to do fifty
    times a second)."""
    while not f_stop.is_set():
        with state.lock:
            waiting = {m.metadata.dst_node_id for m in state.message_ins_store.values()
                       if m.metadata.delivered_at == ""}
        for node_id in waiting & nodes_mapping.keys():
            for message in state.get_message_ins(node_id=node_id, limit=1):
                queue.put(message)
        f_stop.wait(SIMULATED_GRID_POLL_SECONDS)


@contextlib.contextmanager
def scalable_engine():
    """Flower's simulation engine with `dispatch_pending_messages` as its dispatcher."""
    with replaced(DISPATCHER, dispatch_pending_messages, "dispatching messages to 10,000 virtual nodes"):
        yield


@contextlib.contextmanager
def warm_actors(warm_up: Callable[[], None]):
    """Every Ray actor Flower's backend creates while the block runs calls `warm_up` when it starts."""
    def actor_arguments(_backend, config):  # noqa: ARG001 (Flower passes config=)
        return {"on_actor_init_fn": warm_up}

    with replaced(ACTOR_ARGUMENTS, actor_arguments, "warming up Ray actors"):
        yield


@contextlib.contextmanager
def named_virtual_nodes():
    """Every virtual node Flower's simulation registers while the block runs is named `node-<partition>`."""
    from fedsafe.server.node_names import virtual_node_name

    used_for = "naming virtual nodes after their partitions"
    register = flower_piece(NODE_REGISTRATION, used_for)

    def register_named(num_nodes, state_factory):
        mapping = register(num_nodes=num_nodes, state_factory=state_factory)
        nodes = getattr(state_factory.state(), "nodes", {})  # InMemoryLinkState: node id -> NodeInfo
        for node_id, partition in mapping.items():
            if node_id in nodes:
                nodes[node_id].name = virtual_node_name(partition)
        return mapping

    with replaced(NODE_REGISTRATION, register_named, used_for):
        yield
