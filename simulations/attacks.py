"""Simulated attackers — FOR TESTS AND RESEARCH ONLY.

A ClientApp mod that turns some simulated nodes Byzantine: after honest training, the node replies with
its update scaled (`scale`) or reversed and scaled (`sign-flip`). It exists to measure how the robust
aggregators hold up; it is wired in only by the simulation driver (`SimulationOptions.attack`), never
by the node's deployable ClientApp (`fedsafe.client.app.app`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MessageType

ATTACKS = ("none", "scale", "sign-flip")


@dataclass(frozen=True)
class Attack:
    kind: str = "none"
    attackers: int = 0  # partitions 0 .. attackers-1 attack
    factor: float = 10.0

    def __post_init__(self) -> None:
        if self.kind not in ATTACKS:
            raise ValueError(f"unknown attack {self.kind!r}; choose one of: {', '.join(ATTACKS)}")
        if self.attackers < 0:
            raise ValueError(f"attackers must be >= 0; got {self.attackers}")
        if not self.factor > 0:
            raise ValueError(f"attack factor must be > 0; got {self.factor}")

    @property
    def active(self) -> bool:
        return self.kind != "none" and self.attackers > 0

    def is_attacker(self, context: Context) -> bool:
        return int(context.node_config.get("partition-id", -1)) in range(self.attackers)

    def poison(self, global_arrays: ArrayRecord, update: ArrayRecord) -> ArrayRecord:
        sign = -1.0 if self.kind == "sign-flip" else 1.0
        out = ArrayRecord()
        for key in update.keys():
            start = global_arrays[key].numpy()
            moved = update[key].numpy()
            if np.issubdtype(moved.dtype, np.floating):
                moved = (start + sign * self.factor * (moved - start)).astype(moved.dtype)
            out[key] = Array(np.asarray(moved))
        return out

    def mod(self, msg: Message, context: Context, call_next) -> Message:
        """The ClientApp mod (innermost: it changes the plain reply, before any masking)."""
        reply = call_next(msg, context)
        if (msg.metadata.message_type != MessageType.TRAIN or not self.is_attacker(context)
                or reply.has_error() or "arrays" not in reply.content or "arrays" not in msg.content):
            return reply
        reply.content["arrays"] = self.poison(msg.content["arrays"], reply.content["arrays"])
        return reply
