"""An in-process federation: the real ClientApp of each virtual node called directly, no Ray.

The same server loop, strategies and node code as `simulate()`, minus the simulation engine's start-up
(~20 s on 2 cores) — the fast path for tests and benchmarks. Messages are deep-copied on the way in, as
a real transport would, so no node can touch another's (or the server's) objects.
"""

from __future__ import annotations

import copy
import traceback
from collections.abc import Callable, Iterable

from flwr.app import Context, Error, Message, RecordDict

NODE_ID_BASE = 1000


class LocalGrid:
    def __init__(self, client_app, num_nodes: int, run_id: int = 1,
                 drop: Callable[[int, Message], bool] | None = None) -> None:
        from fedsafe.flower.task_identity import ensure_task_identity

        ensure_task_identity(run_id)  # no Flower runtime around these ClientApps sets it
        self.client_app = client_app
        self.drop = drop  # drop(node, message) -> True: the node never answers this message
        self.contexts = {
            NODE_ID_BASE + i: Context(run_id=run_id, node_id=NODE_ID_BASE + i,
                                      node_config={"partition-id": i, "num-partitions": num_nodes},
                                      state=RecordDict(), run_config={})
            for i in range(num_nodes)
        }
        self.received: list[Message] = []  # every reply the server got, for tests that audit it
        self.bytes_down = self.bytes_up = 0  # arrays and config payload, server → nodes and back

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def get_nodes(self):
        """Flower's node records, named after each node's partition as a registration would name them."""
        from flwr.proto.node_pb2 import NodeInfo

        from fedsafe.server.node_names import virtual_node_name

        return [NodeInfo(node_id=node, name=virtual_node_name(int(context.node_config["partition-id"])))
                for node, context in self.contexts.items()]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        from fedsafe.strategies.secagg import payload_bytes

        replies = []
        for message in messages:
            self.bytes_down += payload_bytes(message.content)
            node = message.metadata.dst_node_id
            delivered = Message(copy.deepcopy(message.content), dst_node_id=node,
                                message_type=message.metadata.message_type, group_id=message.metadata.group_id)
            if self.drop is not None and self.drop(node, delivered):
                continue
            try:
                reply = self.client_app(delivered, self.contexts[node])
            except Exception as err:  # noqa: BLE001 - a crashing ClientApp is an error reply, as in Flower
                reply = Message(Error(code=2, reason=f"ClientApp raised {type(err).__name__}: {err}\n"
                                      + traceback.format_exc(limit=3)), reply_to=delivered)
            if not reply.has_error():
                self.bytes_up += payload_bytes(reply.content)
            replies.append(reply)
        self.received.extend(replies)
        return replies
