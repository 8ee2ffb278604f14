"""compress-updates: nodes upload their noised update in 8 bits per value, deflated; the coordinator decodes
it before validation and aggregation (fedsafe.update_compression, client/gate.py, server/loop.py).

Replies are the real node handler's (train_round) and the real privacy gate's; the coordinator side is the
real round loop. The decoding the tests check against is written out here (zlib, the formula), not
fedsafe's own decoder.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from fedsafe import protocol
from fedsafe.client.app import train_round
from fedsafe.client.gate import PUBLIC_METRICS, update_reply
from fedsafe.client.policy import NodePolicy
from fedsafe.server.app import global_model_setup
from fedsafe.server.config import ConfigError, RunConfig
from fedsafe.server.loop import Collected, report_problems, validate_replies
from fedsafe.strategies.strikes import StrikesStrategy
from fedsafe.update_compression import CODES, STYPE

from inprocess import federate
from node_harness import node_context, train_message

pytestmark = pytest.mark.usefixtures("flower_task_identity")


def by_hand(reply: Message, reference: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """A compressed reply decoded from its parts: inflate the stream, read (offset, step) per array of the
    model (in its order), then g + offset + code·step; and each array's step."""
    raw = zlib.decompress(reply.content[protocol.ARRAYS][CODES].data)
    ranges = np.frombuffer(raw[:16 * len(reference)], "<f8").reshape(-1, 2)
    codes = np.frombuffer(raw[16 * len(reference):], np.uint8)
    decoded, steps, position = {}, {}, 0
    for (name, base), (offset, step) in zip(reference.items(), ranges):
        decoded[name] = (base.astype(np.float64) + offset
                         + codes[position:position + base.size].reshape(base.shape) * step).astype(base.dtype)
        steps[name] = step
        position += base.size
    assert position == codes.size
    return decoded, steps


def test_the_server_aggregates_the_mean_of_the_nodes_dequantised_updates(tmp_path, monkeypatch):
    """One DP round of two nodes, compressed: the replies carry codes only; each decodes to within half a
    step of the noised arrays the node trained; the new global model is the FedAvg mean of what they decode
    to. The same round uncompressed: the same ledger figures, more bytes."""
    import fedsafe.update_compression as codec

    trained = []  # the noised arrays each node's gate compressed
    encode = codec.encode
    monkeypatch.setattr(codec, "encode", lambda update, reference: (trained.append(dict(update)),
                                                                   encode(update, reference))[1])
    cfg, outcome, grid = federate(tmp_path / "compressed", nodes=2, num_rounds=1, local_epochs=1,
                                  compress_updates=True)
    monkeypatch.undo()
    _, plain, plain_grid = federate(tmp_path / "plain", nodes=2, num_rounds=1, local_epochs=1)
    initial, _, _ = global_model_setup(cfg)
    reference = {k: initial[k].numpy() for k in initial.keys()}

    decoded, steps, weights = [], [], []
    for reply in grid.replies:
        arrays = reply.content[protocol.ARRAYS]
        assert list(arrays.keys()) == [CODES] and arrays[CODES].stype == STYPE  # no weight in the clear
        values, step = by_hand(reply, reference)
        decoded.append(values)
        steps.append(step)
        weights.append(float(reply.content[protocol.METRICS][protocol.NUM_EXAMPLES]))
    mean = {k: sum(w * d[k].astype(np.float64) for w, d in zip(weights, decoded)) / sum(weights) for k in reference}
    for key, value in outcome.arrays.items():
        np.testing.assert_allclose(value.numpy(), mean[key], rtol=0, atol=1e-6, err_msg=key)

    assert len(trained) == 2
    for compressed, sent_plain, node, update, step in zip(grid.replies, plain_grid.replies, decoded, trained, steps):
        assert set(update) == set(reference)
        for key, value in update.items():
            assert np.max(np.abs(node[key] - value)) <= step[key] / 2 + 1e-6, key
        assert any(np.any(node[key] != value) for key, value in update.items())  # quantised, not a copy
        # the same ledger figures: compression is post-processing, the privacy record is unchanged
        ledger = [k for k in protocol.LEDGER_METRICS if k in sent_plain.content[protocol.METRICS]]
        assert ledger and all(compressed.content[protocol.METRICS][k] == sent_plain.content[protocol.METRICS][k]
                              for k in ledger)

    plain_bytes, compressed_bytes = plain.history[-1]["upload_bytes"], outcome.history[-1]["upload_bytes"]
    # measured 21,744 -> 6,035 bytes (3.6x) for this 2,114-parameter MLP, where Flower's framing and the
    # metrics are a larger share than on the benchmark's CNN (benchmarks/compress_updates.py)
    assert plain_bytes / compressed_bytes >= 3.0


def test_a_federated_run_with_compressed_updates_learns(tmp_path):
    cfg, outcome, grid = federate(tmp_path, nodes=2, num_rounds=3, local_epochs=1, compress_updates=True)
    history = outcome.history
    assert all(h["replies"] == 2 and not h["problems"] for h in history[1:])
    assert history[-1]["eval"]["accuracy"] >= max(0.85, history[0]["eval"]["accuracy"] + 0.15)
    assert all(list(reply.content[protocol.ARRAYS].keys()) == [CODES] for reply in grid.replies)


def _reply_for(global_arrays: ArrayRecord, update: dict[str, np.ndarray]) -> Message:
    """A compressed reply as the node's one reply builder makes it."""
    msg = Message(RecordDict({protocol.ARRAYS: global_arrays}), dst_node_id=5, message_type=MessageType.TRAIN)
    return update_reply(msg, ArrayRecord({k: Array.from_numpy_ndarray(v) for k, v in update.items()}),
                        {protocol.NUM_EXAMPLES: 50.0}, compress=True)


def _tampered(reply: Message, arrays: ArrayRecord) -> Message:
    content = RecordDict({protocol.ARRAYS: arrays, protocol.METRICS: reply.content[protocol.METRICS]})
    return Message(content, reply_to=Message(RecordDict(), dst_node_id=5, message_type=MessageType.TRAIN))


def test_a_malformed_compressed_update_is_rejected_with_a_strike():
    cfg = RunConfig(dp=False, compress_updates=True)
    initial, _, _ = global_model_setup(cfg)
    reference = {k: initial[k].numpy() for k in initial.keys()}
    rng = np.random.default_rng(0)
    update = {k: v + 0.01 * rng.standard_normal(v.shape).astype(v.dtype) for k, v in reference.items()}
    good = _reply_for(initial, update)
    codes = good.content[protocol.ARRAYS][CODES]
    size = sum(v.size for v in reference.values())
    first = next(iter(reference))
    raw = zlib.decompress(codes.data)
    negative_step = np.frombuffer(raw, np.uint8).copy()
    negative_step[8:16] = np.frombuffer(np.array([-1.0], "<f8").tobytes(), np.uint8)  # the first array's step

    def codes_as(**changes) -> ArrayRecord:
        fields = {"dtype": codes.dtype, "shape": tuple(codes.shape), "stype": codes.stype, "data": codes.data, **changes}
        return ArrayRecord({CODES: Array(**fields)})

    nan_update = {**update, first: np.full_like(update[first], np.nan)}
    bad = {
        "wrong dtype": (_tampered(good, codes_as(dtype="float32")), "must be uint8 codes"),
        "wrong shape": (_tampered(good, codes_as(shape=(size + 1,))), f"of shape ({size},)"),
        "wrong stype": (_tampered(good, codes_as(stype="numpy.ndarray")), "and stype 'fedsafe.q8-deflate'"),
        "NaN offset": (_reply_for(initial, nan_update), "must be finite"),  # the real builder, a NaN update
        "negative step": (_tampered(good, codes_as(data=zlib.compress(negative_step.tobytes()))), "step >= 0"),
        "inflates too far": (_tampered(good, codes_as(data=zlib.compress(bytes(10**7)))), f"and {size} codes"),
        "one byte short": (_tampered(good, codes_as(data=zlib.compress(raw[:-1]))), f"and {size} codes"),
        "not deflate": (_tampered(good, codes_as(data=b"not a stream")), "not a deflate stream"),
        "plain weights": (_tampered(good, ArrayRecord({k: Array.from_numpy_ndarray(v) for k, v in update.items()})),
                          "the reply has no '(q8-codes)'"),
        "a weight in the clear": (_tampered(good, ArrayRecord({CODES: codes, first: Array.from_numpy_ndarray(update[first])})),
                                  f"floating-point array {first!r} is not compressed"),
    }
    hand, steps = by_hand(good, reference)  # (validation decodes the accepted reply in place)
    nodes = {node: name for node, name in enumerate(bad, start=1)}
    collected = Collected([(node, bad[name][0]) for node, name in nodes.items()] + [(99, good)], [], 0.0)
    checked = validate_replies(collected, initial, cfg)
    strikes = StrikesStrategy(inner=object(), max_strikes=3)
    report_problems(strikes, 1, checked)

    assert checked.valid_nodes == [99]
    reasons = {entry["node"]: entry["reason"] for entry in checked.rejected}
    for node, name in nodes.items():
        assert bad[name][1] in reasons[node], (name, reasons[node])
        assert strikes.strikes(node) == 1, name
    assert strikes.strikes(99) == 0
    accepted = checked.valid[0].content
    assert list(accepted[protocol.ARRAYS].keys()) == list(reference)  # decoded in place: aggregation sees arrays
    for key in reference:
        np.testing.assert_array_equal(accepted[protocol.ARRAYS][key].numpy(), hand[key])
        assert np.max(np.abs(hand[key] - update[key])) <= steps[key] / 2 + 1e-6


def test_the_setting_travels_in_the_message_and_a_node_without_it_refuses(tmp_path):
    cfg = RunConfig(num_partitions=3, local_epochs=1, compress_updates=True)
    policy = NodePolicy(state_dir=str(tmp_path / "ledgers"), max_epsilon=cfg.epsilon, seed_noise=True)
    reply = train_round(train_message(cfg, 1), node_context(), policy)
    assert not reply.has_error() and list(reply.content[protocol.ARRAYS].keys()) == [CODES]
    # the gate's allowlist: the one stream of codes and the public metrics, nothing else
    assert set(reply.content.keys()) == {protocol.ARRAYS, protocol.METRICS}
    assert set(reply.content[protocol.METRICS].keys()) <= set(PUBLIC_METRICS)

    message = train_message(cfg, 1)
    del message.content["config"]["compress-updates"]
    refused = train_round(message, node_context(1), policy)
    assert refused.has_error() and refused.error.code == protocol.REQUEST_REFUSED
    assert "lacks keys ['compress-updates']" in refused.error.reason


def test_compress_updates_with_secagg_is_refused_by_the_coordinator_and_the_node(tmp_path):
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    from fedsafe.client.secagg import secagg_mod

    with pytest.raises(ConfigError, match="compress-updates cannot be combined with secagg"):
        RunConfig(secagg=True, compress_updates=True, strategy="fedavg", num_partitions=3, min_nodes=3)
    message = train_message(RunConfig(num_partitions=3, compress_updates=True), 1)
    message.content[RECORD_KEY_CONFIGS] = ConfigRecord({"stage": "setup"})
    reply = secagg_mod(message, node_context(), lambda m, c: pytest.fail("the round must not be served"))
    assert reply.has_error() and reply.error.code == protocol.REQUEST_REFUSED
    assert "compress-updates cannot be combined with SecAgg+" in reply.error.reason


def test_frozen_arrays_stay_out_of_the_stream_and_integer_buffers_travel_as_they_are():
    from fedsafe.update_compression import CompressionError, decode, encode

    rng = np.random.default_rng(1)
    reference = {"head.weight": rng.standard_normal((4, 3)).astype(np.float32),
                 "body.weight": rng.standard_normal((5, 5)).astype(np.float32),  # frozen: never uploaded
                 "steps": np.array([7], dtype=np.int64)}
    update = {"head.weight": reference["head.weight"] + 0.1 * rng.standard_normal((4, 3)).astype(np.float32),
              "steps": np.array([8], dtype=np.int64)}
    sent = encode(update, reference)
    assert sorted(sent.keys()) == sorted([CODES, "steps"])
    record = ArrayRecord({k: Array.from_numpy_ndarray(v) for k, v in reference.items()})
    decoded = decode(sent, record, frozen={"body.weight"})
    assert sorted(decoded.keys()) == ["head.weight", "steps"] and decoded["steps"].numpy().tolist() == [8]
    step = np.ptp(update["head.weight"].astype(np.float64) - reference["head.weight"]) / 255
    assert np.max(np.abs(decoded["head.weight"].numpy() - update["head.weight"])) <= step / 2 + 1e-6
    with pytest.raises(CompressionError, match=r"must be uint8 codes of shape \(37,\)"):
        decode(sent, record)  # a coordinator expecting the frozen array too: too few codes
