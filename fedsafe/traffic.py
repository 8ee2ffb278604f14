"""The bytes a message carries between the coordinator and a node: one definition for every figure fedsafe
reports (each round's `upload_bytes` and `download_bytes`, plain, compressed or SecAgg+).

A message's content travels as Flower's inflatable objects: each record, array and array chunk deflated
(serialised), an object shipped once per message even where it appears twice (its id is its content's
hash). The size of a content is the sum of those objects' deflated bytes: what a node pushes for a reply,
or pulls for a request, without the transport's framing or the message's own metadata envelope.

`MeteredGrid` measures each message once, as it passes between the server and the grid: every exchange of a
round goes through it (the round loop's, and SecAgg+'s protocol stages, which reach the grid through the
loop's), so no one re-measures a reply later or counts it differently.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from flwr.app import Array, ArrayRecord, Message, RecordDict


def content_bytes(content: RecordDict) -> int:
    """The bytes of `content` as Flower serialises it for transfer: every nested object (records, arrays,
    array chunks), deflated, each distinct object once. Costs one pass over the arrays (hashing and copying
    them: 8–9 ms for a 4 MB update, measured on the shared 2-core machine). `content` is left as it was: it
    is measured through a view sharing its arrays' bytes, since a Flower Array that has been sliced into
    chunks keeps memoryviews, which neither copy.deepcopy (the in-process transport) nor pickle (Ray) take."""
    return contents_bytes([content])


def contents_bytes(contents: Iterable[RecordDict]) -> int:
    """The sum of `content_bytes` over `contents`, each content object and each record object among them
    measured once: a round's train messages all carry one RecordDict (Flower's strategies build one and address
    it to every sampled node), or at least one global-model ArrayRecord, so a round's requests cost one pass
    over its arrays and its config, not one a node. Each content still counts every distinct object it carries
    (Flower ships a shared object once per message, not once per round), so the sum is what measuring each
    content alone gives. Exact as long as nothing changes `contents` while this runs (the grid is called after)."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, no_object_id_recompute

    # By identity, each entry keeping its object alive so that no other object can take its id meanwhile.
    views: dict[int, tuple[Any, Any]] = {}  # id(record) -> (record, its view)
    measured: dict[int, tuple[RecordDict, int]] = {}  # id(content) -> (content, its bytes)

    def view_of(record):
        if id(record) not in views:
            views[id(record)] = (record, _view(record))
        return views[id(record)][1]

    total = 0
    # Each object's id computed once (Flower recomputes an id, deflating the object again, wherever it is asked
    # for: a record's id 5-7 times per content). Safe here because every object measured is a fresh view made
    # below, whose id is first computed inside this block and which nothing changes: no stale id can be reused.
    with no_object_id_recompute():
        for content in contents:
            if id(content) not in measured:
                view = RecordDict({name: view_of(record) for name, record in content.items()})
                measured[id(content)] = (content, sum(len(obj.deflate()) for obj in get_all_nested_objects(view).values()))
            total += measured[id(content)][1]
    return total


def _view(record):
    """A fresh copy of `record` sharing its arrays' bytes (no copy of the data): fresh Arrays for an
    ArrayRecord, a fresh record of the same items for a config or metric record."""
    if not isinstance(record, ArrayRecord):
        return type(record)(dict(record.items()))
    return ArrayRecord({key: Array(dtype=array.dtype, shape=tuple(array.shape), stype=array.stype, data=array.data)
                        for key, array in record.items()})


def replies_bytes(replies: Iterable[Message]) -> int:
    """What `replies` uploaded: their contents' bytes (an error reply carries no content: 0)."""
    return contents_bytes(reply.content for reply in replies if not reply.has_error())


@dataclass(frozen=True)
class Traffic:
    """Bytes of message contents one way and the other, over some span (a round)."""

    upload_bytes: int = 0  # the nodes' replies
    download_bytes: int = 0  # the server's requests


class MeteredGrid:
    """A view of a Flower Grid (or fedsafe's in-process one) that counts the bytes of every message the server
    sends through it and of every reply it receives, each measured once as it passes (`content_bytes`).
    Everything else is the wrapped grid's: a grid without `pull_messages` still has none."""

    _METERED = ("push_messages", "pull_messages", "send_and_receive")

    def __init__(self, grid) -> None:
        self._grid = grid
        self._upload = self._download = 0

    def take(self) -> Traffic:
        """The bytes counted since the last take (a round's), and the count started afresh."""
        counted = Traffic(upload_bytes=self._upload, download_bytes=self._download)
        self._upload = self._download = 0
        return counted

    def __getattr__(self, name: str):
        attribute = getattr(self._grid, name)  # AttributeError, as the grid's own, where it has none
        return getattr(self, "_" + name) if name in self._METERED else attribute

    def _push_messages(self, messages: Iterable[Message]):
        messages = list(messages)
        self._download += contents_bytes(message.content for message in messages)
        return self._grid.push_messages(messages)

    def _pull_messages(self, message_ids: Iterable[str]):
        replies = list(self._grid.pull_messages(message_ids))
        self._upload += replies_bytes(replies)
        return replies

    def _send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None):
        messages = list(messages)
        self._download += contents_bytes(message.content for message in messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self._upload += replies_bytes(replies)
        return replies
