"""Flower's SuperNode, unchanged but for how long it idles between asking the SuperLink for work.

Flower 1.41's SuperNode (`flwr.supernode.start_client_internal`) sleeps a hard-coded 3 s whenever the
SuperLink has no message for it, and polls its own store every 0.5 s for the ClientApp's reply. On a
small model that is most of a round: the train request waits 1.5 s on average before the node even
sees it. `fedsafe node` runs the SuperNode through this module, which shortens those two waits and then
hands over to Flower's own `flower-supernode` entry point (same arguments, same behaviour otherwise).

The price is idle traffic: one authenticated pull per node every `--poll-interval` seconds instead of
every 3 s. `fedsafe node --poll-interval 3` restores Flower's pace for a large federation.

    python -m fedsafe.supernode --fedsafe-poll-interval 0.5 <flower-supernode arguments>
"""

from __future__ import annotations

import sys
import time
from types import ModuleType

IDLE_POLL_SECONDS = 3.0  # Flower 1.41's hard-coded wait when the SuperLink has no message
REPLY_POLL_SECONDS = 0.5  # ... and between looks for the ClientApp's reply
REPLY_POLL_FAST = 0.1
OPTION = "--fedsafe-poll-interval"


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
    from flwr.supernode import start_client_internal

    start_client_internal.time = _PacedTime(idle_seconds)


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if OPTION in args:
        at = args.index(OPTION)
        pace(float(args[at + 1]))
        del args[at:at + 2]
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *args]
    flower_supernode()


if __name__ == "__main__":
    main()
