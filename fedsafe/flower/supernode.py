"""Flower 1.41's SuperNode loop (`flwr.supernode.start_client_internal`): which apps it runs, and its pace.

Replaces, for the rest of the `fedsafe node` SuperNode process (`python -m fedsafe.supernode`):

* `start_client_internal._pull_and_store_message`, wrapped so that **only approved app packages run**.
  The coordinator ships the app (a FAB: a zip of the project) with every run, and the SuperNode installs
  and runs it: a modified FAB could skip the privacy ledger or turn DP off. The node operator pins the
  apps it may run (`fedsafe node --allow-app <sha256>`, the hash `flwr run` gives the FAB). The check sits
  where Flower's own FAB verification sits: when a message of a run the node has not seen arrives, the
  wrapper fetches the run's FAB and hashes its *content* itself (the SuperLink's claimed hash is not
  trusted). An unapproved FAB is never stored, installed or run: the node logs one line and answers the
  message with an error reply (Flower's `INVALID_FAB` code), so the coordinator sees a refusal at once
  instead of waiting out its round. The FAB that passed is the very object Flower stores and later hands
  to the ClientApp (no second fetch). Flower's own hook there, `--trusted-entities`, accepts only FABs
  signed by Flower Hub entities, not a hash the operator pins.
* `start_client_internal.time`, the `time` module as the loop sees it, so that its **two polling waits**
  are shorter: the loop sleeps a hard-coded 3 s whenever the SuperLink has no message for it, and polls
  its own store every 0.5 s for the ClientApp's reply; on a small model that is most of a round. Flower
  1.41 has no option for either wait.

Guard: tests/test_flower_adapters.py runs Flower's own SuperNode loop and `_pull_and_store_message` with
these in place.
"""

from __future__ import annotations

import hashlib
import re
import sys
import time
from collections.abc import Iterable
from types import ModuleType

from . import flower_piece, replace

LOOP_MODULE = "flwr.supernode.start_client_internal"
IDLE_POLL_SECONDS = 3.0  # Flower 1.41's hard-coded wait when the SuperLink has no message
REPLY_POLL_SECONDS = 0.5  # ... and between looks for the ClientApp's reply
REPLY_POLL_FAST = 0.1
APP_HASH = re.compile(r"[0-9a-f]{64}")
APP_NOT_APPROVED = "app package not approved by this node's operator"


def app_digest(fab_content: bytes) -> str:
    """The SHA-256 of an app package, as `flwr run` names it and `--allow-app` pins it."""
    return hashlib.sha256(fab_content).hexdigest()


class _PacedTime(ModuleType):
    """The `time` module as the SuperNode loop sees it: Flower's two polling waits shortened."""

    def __init__(self, idle_seconds: float) -> None:
        super().__init__("time")
        self._idle = idle_seconds

    def sleep(self, seconds: float) -> None:
        if seconds == IDLE_POLL_SECONDS:
            seconds = self._idle
        elif seconds == REPLY_POLL_SECONDS:
            seconds = min(seconds, REPLY_POLL_FAST)
        time.sleep(seconds)

    def __getattr__(self, name: str):
        return getattr(time, name)


def pace(idle_seconds: float) -> None:
    """Shorten the SuperNode's idle poll to `idle_seconds` in this process."""
    if not idle_seconds > 0:
        raise ValueError(f"poll interval must be > 0 seconds; got {idle_seconds}")
    replace(f"{LOOP_MODULE}:time", _PacedTime(idle_seconds), "the SuperNode's poll interval")


class _AppRefused(Exception):
    def __init__(self, run_id: int) -> None:
        super().__init__(run_id)
        self.run_id = run_id


def pin_apps(allowed: Iterable[str]) -> None:
    """Make this process's SuperNode refuse every run whose app package's SHA-256 is not in `allowed`."""
    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode

    approved = frozenset(allowed)
    bad = sorted(h for h in approved if not APP_HASH.fullmatch(h))
    if bad or not approved:
        raise ValueError(f"--allow-app takes a SHA-256 in hex (64 characters 0-9a-f); got {bad or 'none'}")
    insert_message = flower_piece(f"{LOOP_MODULE}:_insert_message", "the error reply to an unapproved app")
    pull_and_store = flower_piece(f"{LOOP_MODULE}:_pull_and_store_message", "pinning the apps a node runs")

    def pull_and_store_approved(*, state, object_store, receive, get_run, get_fab, **rest):
        checked: dict[int, tuple] = {}  # run id -> (run, FAB) fetched and hashed here, handed on to Flower

        def receive_approved():
            received = receive()
            if received is None:
                return None
            message = received[0]
            run_id = message.metadata.run_id
            if state.get_run(run_id) is not None:
                return received  # stored runs passed this check when their first message came
            run = get_run(run_id)
            fab = get_fab(run.fab_hash, run_id)
            digest = app_digest(fab.content)
            if digest in approved and digest == run.fab_hash:
                fab.hash_str = digest
                checked[run_id] = (run, fab)
                return received
            print(f"fedsafe node: REFUSED run {run_id}: its app package (sha256 {digest}) is not one this node "
                  f"may run (--allow-app: {', '.join(sorted(approved))}); nothing of it was installed or run, "
                  "the coordinator gets an error reply", file=sys.stderr, flush=True)
            refusal = Error(ErrorCode.INVALID_FAB, f"{APP_NOT_APPROVED} (sha256 {digest})")
            insert_message(Message(refusal, reply_to=message), state, object_store)
            raise _AppRefused(run_id)

        try:
            return pull_and_store(
                state=state, object_store=object_store, receive=receive_approved,
                get_run=lambda run_id: checked[run_id][0] if run_id in checked else get_run(run_id),
                get_fab=lambda fab_hash, run_id: checked[run_id][1], **rest)
        except _AppRefused as refused:
            return refused.run_id  # the loop then pushes the error reply

    replace(f"{LOOP_MODULE}:_pull_and_store_message", pull_and_store_approved, "pinning the apps a node runs")
