"""An in-process federation: the real ClientApp of each virtual node called directly, no Ray.

The same server loop, strategies and node code as `simulate()`, minus the simulation engine's start-up
(~20 s on 2 cores) — the fast path for tests, benchmarks and `fedsafe simulate --backend local`. Messages
are copied on the way in and out, as a real transport would, so no node can touch another's (or the
server's) objects; each node has its own global random streams (NodeRandomness); a ClientApp that raises
becomes an error reply, as in Flower.

With `workers` > 1 the messages of a round are served by that many processes forked from this one
(simulations/workers.py), each taking the next message when it is free; a round of one message, or
`workers` = 1, runs here. Either way each node's ClientApp gets the same message, Context and random
streams, so the same seed gives the same run.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import random
import traceback
from collections.abc import Callable, Iterable, Sequence

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode

from .workers import Delivery, NodeWorkers, quiet_output

log = logging.getLogger("fedsafe.simulations")

NODE_ID_BASE = 1000


class LocalGrid:
    def __init__(self, client_app, num_nodes: int, run_id: int = 1,
                 drop: Callable[[int, Message], bool] | None = None, node_ids: Sequence[int] | None = None,
                 quiet: bool = False, workers: int = 1) -> None:
        from fedsafe.flower.task_identity import ensure_task_identity

        ensure_task_identity(run_id)  # no Flower runtime around these ClientApps sets it
        self.client_app = client_app
        self.drop = drop  # drop(node, message) -> True: the node never answers this message
        # `node_ids`: partition i is node node_ids[i] (the ids Flower's simulation engine would give them,
        # so that the seeded node sampling trains the same partitions on either backend).
        ids = list(node_ids) if node_ids is not None else [NODE_ID_BASE + i for i in range(num_nodes)]
        if len(ids) != num_nodes or len(set(ids)) != num_nodes:
            raise ValueError(f"need {num_nodes} distinct node ids; got {len(set(ids))}")
        if workers < 1:
            raise ValueError(f"workers must be >= 1; got {workers}")
        self.contexts = {
            node: Context(run_id=run_id, node_id=node, node_config={"partition-id": i, "num-partitions": num_nodes},
                          state=RecordDict(), run_config={})
            for i, node in enumerate(ids)
        }
        self.randomness = NodeRandomness()
        self.quiet = quiet  # the nodes' own lines (stderr) dropped, as Ray drops its actors' unless verbose
        self.received: list[Message] = []  # every reply the server got, for tests that audit it
        self.workers = workers
        self._pool: NodeWorkers | None = None  # forked at the first round with work for more than one

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def get_nodes(self):
        """Flower's node records, named after each node's partition as a registration would name them."""
        from flwr.proto.node_pb2 import NodeInfo

        from fedsafe.server.node_names import virtual_node_name

        return [NodeInfo(node_id=node, name=virtual_node_name(int(context.node_config["partition-id"])))
                for node, context in self.contexts.items()]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        deliveries = []
        for message in messages:
            node = message.metadata.dst_node_id
            delivered = Message(message.content, dst_node_id=node, message_type=message.metadata.message_type,
                                group_id=message.metadata.group_id)
            if self.drop is not None and self.drop(node, delivered):
                continue
            deliveries.append(Delivery(node, delivered, self.contexts[node], self.randomness.state_of(node)))
        if self.workers > 1 and len(deliveries) > 1:
            replies = self._serve_in_workers(deliveries)
        else:
            replies = [self._serve_here(delivery) for delivery in deliveries]
        self.received.extend(replies)
        return replies

    def _serve_here(self, delivery: Delivery) -> Message:
        message = Message(copy.deepcopy(delivery.message.content), dst_node_id=delivery.node,
                          message_type=delivery.message.metadata.message_type,
                          group_id=delivery.message.metadata.group_id)
        reply, state = serve_node(self.client_app, message, delivery.context, delivery.random_state, self.quiet)
        self.randomness.keep(delivery.node, state)
        return copy.deepcopy(reply)

    def _serve_in_workers(self, deliveries: list[Delivery]) -> list[Message]:
        replies = []
        if self._pool is None:
            from .backend import can_fork_workers

            if not can_fork_workers():  # CUDA initialised in this process since the backend was chosen
                log.warning("node workers cannot be forked from this process now (CUDA is initialised in it); "
                            "every node trains in this process")
                self.workers = 1
                return [self._serve_here(delivery) for delivery in deliveries]
            # The run's first message is served here: what it loads once per process (the training stack's
            # lazy imports, the run's σ calibration, cached) every worker forked after it inherits, instead
            # of each paying for it again in the first round.
            replies.append(self._serve_here(deliveries[0]))
            deliveries = deliveries[1:]
            self._pool = NodeWorkers(self.client_app, self.workers, self.quiet, serve_node)
        for delivery, served in zip(deliveries, self._pool.serve_all(deliveries), strict=True):
            if served.context is not None:  # the node's state as its ClientApp left it
                self.contexts[delivery.node] = served.context
            self.randomness.keep(delivery.node, served.random_state)
            replies.append(served.reply)
        return replies

    def close(self) -> None:
        """Stop the worker processes, if any were forked (idempotent)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None


def serve_node(client_app, message: Message, context: Context, random_state: tuple | None,
               quiet: bool) -> tuple[Message, tuple]:
    """One node's ClientApp on one message, under the node's own random streams: (its reply, or an error
    reply where it raised, as Flower's engine sends; the streams as the node left them)."""
    node = message.metadata.dst_node_id
    randomness = NodeRandomness({node: random_state} if random_state is not None else {})
    try:
        with randomness.of(node), quiet_output(quiet):
            reply = client_app(message, context)
    except Exception as err:  # noqa: BLE001 - a crashing ClientApp is an error reply, as in Flower
        # As Flower's engine: the error's type and text in the reply, its traceback in the log only.
        log.debug("virtual node %s: ClientApp raised\n%s", node, traceback.format_exc())
        reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                              reason=f"ClientApp raised {type(err).__name__}: {err}"), reply_to=message)
    return reply, randomness.state_of(node)


class NodeRandomness:
    """Each virtual node's own global random streams (PyTorch's CPU generator, NumPy's and Python's), as if
    it were a process of its own: a node that seeds or draws from them moves neither another node's
    streams nor the driver's. A node's streams start from fresh OS randomness, as a new process' would,
    when it first gets a message (only sampled nodes ever hold any: about 10 KB each)."""

    def __init__(self, states: dict[int, tuple] | None = None) -> None:
        self._states: dict[int, tuple] = dict(states or {})

    def state_of(self, node: int) -> tuple | None:
        """The node's streams as it last left them (None: it has never run)."""
        return self._states.get(node)

    def keep(self, node: int, state: tuple | None) -> None:
        """Record the node's streams as a run elsewhere (a worker process) left them."""
        if state is not None:
            self._states[node] = state

    @contextlib.contextmanager
    def of(self, node: int):
        import numpy as np
        import torch

        driver = _capture(np, torch)
        try:
            if node in self._states:
                _restore(np, torch, self._states[node])
            else:
                torch.seed()
                np.random.seed(int.from_bytes(os.urandom(4), "little"))
                random.seed(os.urandom(16))
            yield
        finally:
            self._states[node] = _capture(np, torch)
            _restore(np, torch, driver)


def _capture(np, torch) -> tuple:
    return torch.get_rng_state(), np.random.get_state(), random.getstate()


def _restore(np, torch, state: tuple) -> None:
    torch.set_rng_state(state[0])
    np.random.set_state(state[1])
    random.setstate(state[2])
