"""Each round's `upload_bytes` and `download_bytes` (fedsafe.traffic): the bytes of the messages' contents as
Flower's own push sends them, counted once per message, the same figure for plain, compressed and SecAgg+
rounds (whose key-exchange and unmasking stages count too).

The reference each figure is checked against is Flower's push (`push_objects`, what a SuperNode runs to
upload a reply), each object's bytes recorded as it would go out; not fedsafe's measure."""

from __future__ import annotations

import copy

import pytest
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from fed_harness import federation, run
from fedsafe.simulations.local import LocalGrid

pytestmark = pytest.mark.usefixtures("flower_task_identity")


def pushed_bytes(messages) -> int:
    """What Flower's push sends of these messages' contents: every object's deflated bytes, as they leave."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    from flwr.supercore.inflatable.inflatable_utils import push_objects

    sent: list[int] = []
    for message in messages:
        if not message.has_error():
            push_objects(get_all_nested_objects(message.content), lambda _id, content: sent.append(len(content)))
    return sum(sent)


class RecordingGrid(LocalGrid):
    """The in-process grid, keeping a copy of every message the server sent and of every reply as it arrived
    (the coordinator decodes a compressed reply in place later)."""

    def __init__(self, grid: LocalGrid) -> None:
        self.__dict__.update(grid.__dict__)
        self.sent: list[Message] = []
        self.arrived: list[Message] = []

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.sent.extend(copy.deepcopy(messages))
        replies = super().send_and_receive(messages, timeout=timeout)
        self.arrived.extend(copy.deepcopy(replies))
        return replies


def one_round(tmp_path, **overrides):
    cfg, grid, strategy = federation(tmp_path, nodes=3, num_rounds=1, local_epochs=1, **overrides)
    grid = RecordingGrid(grid)
    outcome = run(cfg, grid, strategy)
    return outcome.history[-1], grid


def test_round_bytes_are_what_flower_pushes_plain_compressed_and_secagg(tmp_path):
    rounds = {name: one_round(tmp_path / name, **overrides) for name, overrides in
              {"plain": {}, "compressed": {"compress_updates": True}, "secagg": {"secagg": True}}.items()}
    for name, (record, grid) in rounds.items():
        assert record["aggregated"] and record["replies"] >= 1, name
        assert record["upload_bytes"] == pushed_bytes(grid.arrived) > 0, name
        assert record["download_bytes"] == pushed_bytes(grid.sent) > 0, name

    plain, compressed, secagg = (rounds[name][0] for name in ("plain", "compressed", "secagg"))
    assert plain["upload_bytes"] > 3 * compressed["upload_bytes"]  # 8-bit codes, deflated
    # SecAgg+: 4 exchanges per node, not 1 (public keys, key shares, the masked vector, unmasking shares)
    assert len(rounds["secagg"][1].arrived) == 4 * len(rounds["plain"][1].arrived)
    assert secagg["upload_bytes"] > plain["upload_bytes"]
    assert "bytes_from_nodes" not in secagg["secagg"]  # one count of bytes: the round's, not the protocol's own


class PolledGrid:
    """A grid as a deployment has it (push, then poll): the replies arrive over two pulls."""

    def __init__(self, replies: list[Message]) -> None:
        self.replies, self.pulls = replies, 0

    def push_messages(self, messages):
        return [f"m{message.metadata.dst_node_id}" for message in messages]

    def pull_messages(self, message_ids):
        self.pulls += 1
        return [] if self.pulls == 1 else [r for r in self.replies if r.metadata.reply_to_message_id in message_ids]


def test_a_polled_grid_counts_each_reply_once(flower_task_identity):
    from fedsafe.server.loop import exchange
    from fedsafe.traffic import MeteredGrid

    messages = [Message(RecordDict({"config": ConfigRecord({"x": float(n)})}), dst_node_id=n,
                        message_type=MessageType.TRAIN) for n in (1, 2)]
    replies = []
    for n, message in zip((1, 2), messages):
        reply = Message(RecordDict({"config": ConfigRecord({"blob": bytes(1000 * n)})}), reply_to=message)
        reply.metadata.__dict__["_reply_to_message_id"] = f"m{n}"
        replies.append(reply)
    grid = MeteredGrid(PolledGrid(replies))
    got, silent = exchange(grid, messages, timeout=5.0, poll_interval=0.01)
    assert len(got) == 2 and not silent and grid.pulls == 2
    traffic = grid.take()
    assert traffic.upload_bytes == pushed_bytes(replies) > 3000
    assert traffic.download_bytes == pushed_bytes(messages)
    assert grid.take().upload_bytes == 0  # each round's count starts afresh
    assert not hasattr(MeteredGrid(object()), "pull_messages")  # the loop still tells an in-process grid apart


def test_a_content_shared_by_many_messages_counts_once_per_message(flower_task_identity):
    """Flower's strategies address one RecordDict to every sampled node; the meter measures it once but counts
    it for each message, and contents that share only the global model's ArrayRecord still count it each."""
    import numpy as np
    from flwr.app import Array, ArrayRecord

    from fedsafe.traffic import MeteredGrid

    arrays = ArrayRecord({"w": Array(np.arange(300_000, dtype=np.float32)), "b": Array(np.zeros(7, np.float32))})
    shared = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1, "lr": 0.5})})
    own = [RecordDict({"arrays": arrays, "config": ConfigRecord({"node": n})}) for n in (1, 2)]
    twice = RecordDict({"arrays": arrays, "again": arrays})  # one object twice in a message: shipped once
    messages = [Message(content, dst_node_id=n, message_type=MessageType.TRAIN)
                for n, content in enumerate([shared, shared, shared, *own, twice], start=1)]

    class Sink:
        def push_messages(self, messages):
            return [str(m.metadata.dst_node_id) for m in messages]

    grid = MeteredGrid(Sink())
    grid.push_messages(messages)
    assert grid.take().download_bytes == pushed_bytes(messages) > 6 * 1_200_000
    assert pushed_bytes(messages[:3]) == 3 * pushed_bytes(messages[:1])
