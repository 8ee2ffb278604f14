"""SecAgg+ on Flower's Message API: the server learns only the (weighted) sum of the nodes' updates.

Flower 1.41 runs SecAgg+ only inside its legacy `SecAggPlusWorkflow` (LegacyContext, legacy strategy,
legacy ClientApp). This is the same protocol, stage for stage, on Flower's primitives (Shamir shares,
ECDH-derived pairwise masks, the PRG, quantisation, `flwr.common.secure_aggregation`) driven from
fedsafe's loop, with Flower's unmodified `secaggplus_mod` on the nodes (client/secagg.py):

  configure_train:  0 setup (public keys) → 1 share keys (encrypted Shamir shares of each node's mask
                    seed and key) → returns the stage-2 messages: the train request + forwarded shares.
  the loop:         sends them; each node trains, masks its quantised, weighted update, replies.
  aggregate_train:  sums the masked vectors (mod 2^32) → 3 unmask: the surviving nodes return shares of
                    the survivors' mask seeds and of the dropped nodes' keys; the masks cancel or are
                    removed; the sum is dequantised, divided by the summed weights, added to the global
                    model, and handed to the wrapped strategy as a single aggregate reply.

A node that drops after sharing its keys (during training, or while unmasking) costs nothing as long as
every node keeps `threshold` live neighbours: its pairwise masks are rebuilt from the shares of its key.

What the server holds of a node: public keys, encrypted shares it cannot open, a masked vector that is
uniformly random on its own, and plaintext metrics (num-examples, ε and ledger figures, train loss).
Not the update: so it cannot validate one either (norm bounds, NaN checks) — SecAgg trades that away.
Only strategies that need just the weighted mean work on top (fedavg, fedprox, fedadam, fedyogi,
fedadagrad, fedavgm); robust aggregators need each update and are refused with secagg.

Distributed DP (`distributed_dp`): each node added only σ/√m of the noise, m being the round's threshold,
and recorded its ε on the promise that the released sum holds at least m nodes' shares. A round whose sum
would hold fewer is never unmasked nor released (the nodes' ledgers have already charged it: over-counted,
never under).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import Strategy

from .wrapper import StrategyWrapper

log = logging.getLogger("fedsafe.secagg")


@dataclass
class _Round:
    sampled: list[int]
    content: dict[int, RecordDict]
    num_shares: int
    threshold: int
    neighbours: dict[int, set[int]]
    public_keys: dict[int, list[bytes]] = field(default_factory=dict)
    active: set[int] = field(default_factory=set)
    shared: set[int] = field(default_factory=set)  # nodes whose key shares went out (stage 1 done)
    stage2_sent: dict[int, Message] = field(default_factory=dict)
    seconds: float = 0.0


class SecAggError(RuntimeError):
    """The protocol cannot finish this round (too few live nodes to unmask)."""


class SecAggPlusAggregation(StrategyWrapper):
    hides_updates = True  # the loop must not expect (or validate) plaintext updates

    def __init__(
        self,
        strategy: Strategy,
        *,
        num_shares: float = 1.0,
        reconstruction_threshold: float = 0.5,
        clipping_range: float = 8.0,
        quantization_range: int = 2**22,
        modulus_range: int = 2**32,
        max_weight: float = 1000.0,
        timeout: float | None = None,
        distributed_dp: bool = False,
    ) -> None:
        self.strategy = strategy
        self.distributed_dp = distributed_dp
        self.num_shares, self.reconstruction_threshold = num_shares, reconstruction_threshold
        self.clipping_range, self.quantization_range = clipping_range, quantization_range
        self.modulus_range, self.max_weight, self.timeout = modulus_range, max_weight, timeout
        self._rounds: dict[int, _Round] = {}
        self._report: dict[int, dict[str, Any]] = {}
        self._grid = None
        self._arrays: ArrayRecord | None = None
        self.seen_masked_vectors: list[list[np.ndarray]] = []  # for audits: all the server held of this round's updates

    # ---- protocol parameters (as Flower's SecAggPlusWorkflow sets them) ---------------------
    def _shares_and_threshold(self, n: int) -> tuple[int, int]:
        shares = round(self.num_shares * n)
        if shares < n and shares % 2 == 0:
            shares += 1
        if shares <= 2:
            shares = n
        threshold = max(2, round(self.reconstruction_threshold * shares))
        return shares, threshold

    def _exchange(self, state: _Round, messages: list[Message]) -> list[Message]:
        started = time.perf_counter()
        replies = list(self._grid.send_and_receive(messages, timeout=self.timeout))
        state.seconds += time.perf_counter() - started
        return replies

    def _message(self, node: int, rnd: int, content: RecordDict) -> Message:
        return Message(content=content, dst_node_id=node, message_type=MessageType.TRAIN, group_id=str(rnd))

    def _enough_neighbours(self, state: _Round, nodes: Iterable[int] | None = None) -> bool:
        nodes = state.sampled if nodes is None else nodes
        return all(len(state.neighbours[n] & state.active) >= state.threshold for n in nodes)

    # ---- stages 0 and 1, then the stage-2 messages ----------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid) -> Iterable[Message]:
        from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

        self._grid, self._arrays = grid, arrays
        self.seen_masked_vectors = []
        inner = list(self.strategy.configure_train(server_round, arrays, config, grid))
        sampled = [m.metadata.dst_node_id for m in inner]
        if len(sampled) < 3:
            log.warning("round %d: SecAgg+ needs at least 3 nodes, %d sampled; round skipped",
                        server_round, len(sampled))
            return []
        shares, threshold = self._shares_and_threshold(len(sampled))
        order = list(sampled)
        random.shuffle(order)
        half = shares >> 1
        neighbours = {nid: {order[(i + o) % len(order)] for o in range(-half, half + 1)} for i, nid in enumerate(order)}
        state = _Round(sampled=sampled, content={m.metadata.dst_node_id: m.content for m in inner},
                       num_shares=shares, threshold=threshold, neighbours=neighbours, active=set(sampled))
        self._rounds = {server_round: state}
        self._report[server_round] = {}

        setup = ConfigRecord({
            Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: len(sampled), Key.SHARE_NUMBER: shares,
            Key.THRESHOLD: threshold, Key.CLIPPING_RANGE: float(self.clipping_range),
            Key.TARGET_RANGE: int(self.quantization_range), Key.MOD_RANGE: int(self.modulus_range),
            Key.MAX_WEIGHT: float(self.max_weight),
        })
        replies = self._exchange(state, [self._message(n, server_round, RecordDict({RECORD_KEY_CONFIGS: setup}))
                                         for n in sampled])
        state.active = {r.metadata.src_node_id for r in replies if not r.has_error()}
        for reply in replies:
            if not reply.has_error():
                keys = reply.content.config_records[RECORD_KEY_CONFIGS]
                state.public_keys[reply.metadata.src_node_id] = [keys[Key.PUBLIC_KEY_1], keys[Key.PUBLIC_KEY_2]]
        if not self._enough_neighbours(state):
            return self._abandon(server_round, "too few nodes answered the SecAgg+ setup")

        def share_keys(nid: int) -> Message:
            record = ConfigRecord({str(n): state.public_keys[n] for n in state.neighbours[nid] & state.active})
            record[Key.STAGE] = Stage.SHARE_KEYS
            return self._message(nid, server_round, RecordDict({RECORD_KEY_CONFIGS: record}))

        replies = self._exchange(state, [share_keys(n) for n in sorted(state.active)])
        state.active = {r.metadata.src_node_id for r in replies if not r.has_error()}
        state.shared = set(state.active)
        forward: dict[int, tuple[list[int], list[bytes]]] = {n: ([], []) for n in state.active}
        for reply in replies:
            if reply.has_error():
                continue
            src = reply.metadata.src_node_id
            record = reply.content.config_records[RECORD_KEY_CONFIGS]
            for dst, ciphertext in zip(record[Key.DESTINATION_LIST], record[Key.CIPHERTEXT_LIST], strict=True):
                if dst in forward:
                    forward[dst][0].append(src)
                    forward[dst][1].append(ciphertext)
        if not self._enough_neighbours(state):
            return self._abandon(server_round, "too few nodes shared their keys")

        messages = []
        for nid in sorted(state.active):
            content = RecordDict({k: v for k, v in state.content[nid].items()})
            content[RECORD_KEY_CONFIGS] = ConfigRecord({
                Key.STAGE: Stage.COLLECT_MASKED_VECTORS, Key.CIPHERTEXT_LIST: forward[nid][1],
                Key.SOURCE_LIST: forward[nid][0],
            })
            message = self._message(nid, server_round, content)
            state.stage2_sent[nid] = message
            messages.append(message)
        return messages

    def _abandon(self, server_round: int, why: str) -> list[Message]:
        log.warning("round %d: SecAgg+ abandoned: %s", server_round, why)
        self._report[server_round] = {"secagg": {"abandoned": why}}
        self._rounds.pop(server_round, None)
        return []

    # ---- sum, stage 3, unmask -----------------------------------------------------------------
    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        from flwr.common import bytes_to_ndarray
        from flwr.common.secure_aggregation.crypto.shamir import combine_shares
        from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
        from flwr.common.secure_aggregation.ndarrays_arithmetic import (
            factor_extract,
            get_parameters_shape,
            parameters_addition,
            parameters_mod,
            parameters_subtraction,
        )
        from flwr.common.secure_aggregation.quantization import dequantize
        from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
        from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
        from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

        state = self._rounds.pop(server_round, None)
        if state is None:
            return None, None
        replies = [r for r in replies if not r.has_error() and r.metadata.src_node_id in state.stage2_sent]
        masked = None
        metrics_by_node = {}
        for reply in replies:
            vector = [bytes_to_ndarray(b) for b in reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]]
            self.seen_masked_vectors.append(vector)
            masked = vector if masked is None else parameters_addition(masked, vector)
            metrics_by_node[reply.metadata.src_node_id] = reply.content["metrics"]
        state.active = set(metrics_by_node)
        dead = state.shared - state.active  # shared their keys, then dropped: their masks are in the sum
        if self.distributed_dp and len(state.active) < state.threshold:
            why = (f"distributed DP: {len(state.active)} masked vectors, fewer than the {state.threshold} noise shares "
                   f"each node's ε assumes; the sum is not unmasked nor released")
            log.warning("round %d: %s", server_round, why)
            self._report[server_round] = {"secagg": {"abandoned": why, "dropped": len(dead)}}
            return None, None
        if masked is None or not self._enough_neighbours(state, state.active | dead):
            self._report[server_round] = {"secagg": {"abandoned": "too few masked vectors to unmask",
                                                     "dropped": len(dead)}}
            return None, None
        masked = parameters_mod(masked, self.modulus_range)

        def unmask(nid: int) -> Message:
            record = ConfigRecord({
                Key.STAGE: Stage.UNMASK,
                Key.ACTIVE_NODE_ID_LIST: sorted(state.neighbours[nid] & state.active),
                Key.DEAD_NODE_ID_LIST: sorted(state.neighbours[nid] & dead),
            })
            return self._message(nid, server_round, RecordDict({RECORD_KEY_CONFIGS: record}))

        share_replies = self._exchange(state, [unmask(n) for n in sorted(state.active)])
        collected: dict[int, list[bytes]] = {n: [] for n in state.active | dead}
        unmasking = 0
        for reply in share_replies:
            if reply.has_error():
                continue
            unmasking += 1
            record = reply.content.config_records[RECORD_KEY_CONFIGS]
            for owner, share in zip(record[Key.NODE_ID_LIST], record[Key.SHARE_LIST], strict=True):
                collected[owner].append(share)

        started = time.perf_counter()
        shape = get_parameters_shape(masked)
        for nid, shares in collected.items():
            if len(shares) < state.threshold:
                self._report[server_round] = {"secagg": {"abandoned": f"only {len(shares)} shares for node {nid}, "
                                                         f"{state.threshold} needed", "dropped": len(dead)}}
                log.warning("round %d: SecAgg+ cannot unmask: too few shares for node %s", server_round, nid)
                return None, None
            secret = combine_shares(shares)
            if nid in state.active:  # the seed of its private mask
                masked = parameters_subtraction(masked, pseudo_rand_gen(secret, self.modulus_range, shape))
            else:  # its key: rebuild the pairwise masks it shared with its live neighbours
                for other in (state.neighbours[nid] & state.active) - {nid}:
                    key = generate_shared_key(bytes_to_private_key(secret),
                                              bytes_to_public_key(state.public_keys[other][0]))
                    mask = pseudo_rand_gen(key, self.modulus_range, shape)
                    masked = parameters_addition(masked, mask) if nid > other else parameters_subtraction(masked, mask)
        total = parameters_mod(masked, self.modulus_range)
        q_weight, total = factor_extract(total)
        mean_update = dequantize(total, self.clipping_range, self.quantization_range)
        offset = -(len(state.active) - 1) * self.clipping_range
        scale = self.quantization_range / float(q_weight)
        mean_update = [(u + offset) * scale for u in mean_update]
        state.seconds += time.perf_counter() - started

        new = ArrayRecord()
        for key, update in zip(self._arrays.keys(), mean_update, strict=True):
            start = self._arrays[key].numpy()
            new[key] = Array(np.asarray(start + update.reshape(start.shape), dtype=start.dtype))
        examples = sum(float(m["num-examples"]) for m in metrics_by_node.values())
        metrics = {"num-examples": examples}
        aggregate = Message(RecordDict({"arrays": new, "metrics": MetricRecord(metrics)}),
                            reply_to=next(iter(state.stage2_sent.values())))
        self._report[server_round] = {"secagg": {
            "summed": len(state.active), "dropped": len(dead), "unmasking_nodes": unmasking,
            "threshold": state.threshold, "shares": state.num_shares,
            **({"noise_shares_summed": len(state.active)} if self.distributed_dp else {}),
            # (its bytes, every stage's, are the round's upload_bytes and download_bytes: fedsafe.traffic)
            "protocol_seconds": state.seconds,
        }}
        return self.strategy.aggregate_train(server_round, [aggregate])

    def round_report(self, server_round: int) -> dict[str, Any]:
        return self._report.pop(server_round, {})
