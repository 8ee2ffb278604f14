"""SecAgg+ through fedsafe's loop: the server holds only masked vectors, gets plain aggregation's result
up to quantisation, and survives a node dropping mid-protocol."""

import numpy as np
import pytest
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from fed_harness import federation, run
from fedsafe.simulations.local import NODE_ID_BASE

ONE_ROUND = dict(num_rounds=1, local_epochs=1)  # nodes train with DP-SGD, seeded: the same updates each run
TOLERANCE = 1e-4  # quantisation: 2·8/2^22 per coordinate and node, times the weight


def _updates_in_plain_round(tmp_path):
    cfg, grid, strategy = federation(tmp_path / "plain", **ONE_ROUND)
    outcome = run(cfg, grid, strategy)
    from fedsafe.server.app import global_model_setup

    start, _, _ = global_model_setup(cfg)
    updates = {r.metadata.src_node_id: ({k: r.content["arrays"][k].numpy() - start[k].numpy() for k in start.keys()},
                                        float(r.content["metrics"]["num-examples"])) for r in grid.received}
    return outcome, start, updates


def _mean(start, updates, nodes):
    total = sum(updates[n][1] for n in nodes)
    return {k: start[k].numpy() + sum(updates[n][0][k] * updates[n][1] for n in nodes) / total for k in start.keys()}


def _assert_close(arrays, expected):
    worst = max(float(np.max(np.abs(arrays[k].numpy() - expected[k]))) for k in expected)
    assert worst < TOLERANCE, worst
    return worst


def test_server_sees_only_masked_vectors_and_gets_the_plain_aggregate(tmp_path):
    plain, start, updates = _updates_in_plain_round(tmp_path)
    cfg, grid, strategy = federation(tmp_path / "secagg", secagg=True, **ONE_ROUND)
    outcome = run(cfg, grid, strategy)

    record = outcome.history[-1]
    assert record["aggregated"] and record["secagg"]["summed"] == 5 and record["secagg"]["dropped"] == 0
    _assert_close(outcome.arrays, _mean(start, updates, list(updates)))
    assert record["epsilon_max"] == plain.history[-1]["epsilon_max"]  # nodes' ledgers still report

    # Everything the server received: no reply carries weights; the masked vectors say nothing alone.
    assert all(sum(len(a) for a in r.content.array_records.values()) == 0 for r in grid.received if not r.has_error())
    vectors = strategy.seen_masked_vectors
    assert len(vectors) == 5
    quantum = 2 * 8.0 / 2**22
    for vector in vectors:
        masked = np.concatenate([v.ravel() for v in vector[1:]]).astype(np.float64)
        assert masked.min() >= 0 and masked.max() < 2**32
        for update, weight in updates.values():  # what the plain quantised update would have been
            honest = np.concatenate([u.ravel() for u in update.values()]) * (weight / 1000.0)
            quantised = (np.clip(honest, -8, 8) + 8) / quantum
            assert abs(np.corrcoef(masked, quantised)[0, 1]) < 0.2
        assert masked.std() > 2**32 / 5  # uniform on [0, 2^32): std 2^32/√12 ≈ 0.29·2^32


@pytest.mark.parametrize("stage", [Stage.COLLECT_MASKED_VECTORS, Stage.UNMASK])
def test_secagg_survives_a_node_dropping_mid_protocol(tmp_path, stage):
    _, start, updates = _updates_in_plain_round(tmp_path)
    dropper = NODE_ID_BASE + 2

    def drop(node, message):
        configs = message.content.config_records.get(RECORD_KEY_CONFIGS)
        return node == dropper and configs is not None and configs.get(Key.STAGE) == stage

    cfg, grid, strategy = federation(tmp_path / "secagg", secagg=True, drop=drop, **ONE_ROUND)
    outcome = run(cfg, grid, strategy)
    record = outcome.history[-1]
    assert record["aggregated"]
    if stage == Stage.COLLECT_MASKED_VECTORS:
        # It shared its keys, then vanished while training: its pairwise masks are rebuilt from shares.
        assert record["secagg"]["dropped"] == 1 and record["replies"] == 4
        _assert_close(outcome.arrays, _mean(start, updates, [n for n in updates if n != dropper]))
    else:
        # Its masked vector is in the sum; it only failed to help unmask: the others' shares suffice.
        assert record["secagg"]["unmasking_nodes"] == 4 and record["secagg"]["dropped"] == 0
        _assert_close(outcome.arrays, _mean(start, updates, list(updates)))
