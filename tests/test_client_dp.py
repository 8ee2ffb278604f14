"""Client-level DP on the server: Flower's wrappers and accountant through fedsafe's loop."""

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from fed_harness import federation, run

pytest.importorskip("dp_accounting")  # flwr[dp]: Flower's RdpAccountant

FIXED = dict(client_dp="fixed", client_noise_multiplier=2.0, client_clipping_norm=0.5, dp=False)


def test_fixed_clipping_reports_client_level_epsilon_per_round_from_flowers_accountant(tmp_path):
    cfg, grid, strategy = federation(tmp_path, **FIXED)
    outcome = run(cfg, grid, strategy)
    eps = [r["client_level_epsilon"] for r in outcome.history[1:]]
    assert all(r["aggregated"] for r in outcome.history[1:])
    assert eps == sorted(eps) and eps[0] > 0

    # The same figure from first principles: k Gaussian releases at z = 2, RDP, no amplification.
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    rdp = compute_rdp(q=1.0, noise_multiplier=2.0, steps=3, orders=orders)
    assert eps[-1] == pytest.approx(get_privacy_spent(orders=orders, rdp=rdp, delta=1e-5)[0], rel=0.02)
    assert outcome.history[-1]["client_dp"]["sampled"] == 5


def test_one_erroring_node_does_not_void_the_dp_round(tmp_path, flower_task_identity):
    # Flower's wrapper alone voids the round when one reply is an error ...
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg

    arrays = ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))})
    sent = [Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=n, message_type="train") for n in (1, 2, 3)]
    replies = [Message(RecordDict({"arrays": ArrayRecord({"w": Array(np.ones(3, dtype=np.float32))}),
                                   "metrics": MetricRecord({"num-examples": 1})}), reply_to=m) for m in sent[:2]]
    replies.append(Message(Error(code=4001, reason="out of budget"), reply_to=sent[2]))
    flower = DifferentialPrivacyServerSideFixedClipping(FedAvg(), 1.0, 1.0, 3)
    flower.current_arrays = arrays
    assert flower.aggregate_train(1, replies) == (None, None)

    # ... fedsafe's loop removes the error reply and the round aggregates, the missing node counting
    # as a zero update, so the noise still matches the mean over the 5 sampled nodes.
    from fedsafe.simulations.local import NODE_ID_BASE

    cfg, grid, strategy = federation(tmp_path, **FIXED)
    original = grid.client_app

    def flaky(message, context):
        if context.node_id == NODE_ID_BASE and message.content["config"]["server-round"] == 2:
            return Message(Error(code=2, reason="node crashed"), reply_to=message)
        return original(message, context)

    grid.client_app = flaky
    outcome = run(cfg, grid, strategy)
    second = outcome.history[2]
    assert second["failures"] == 1 and second["replies"] == 4
    assert second["aggregated"] is True
    assert second["client_dp"]["zero_updates_for_missing"] == 1
    assert second["client_level_epsilon"] > outcome.history[1]["client_level_epsilon"]


def test_run_stops_cleanly_when_the_client_level_budget_is_reached(tmp_path):
    # z = 2: ε ≈ 2.17 after one release, ≈ 3.19 after two, ≈ 4.01 after three (δ = 1e-5).
    cfg, grid, strategy = federation(tmp_path, client_level_epsilon=3.5, **FIXED)
    outcome = run(cfg, grid, strategy)
    assert [h["round"] for h in outcome.history] == [0, 1, 2]
    assert outcome.stop_reason and "exceed max_epsilon" in outcome.stop_reason
    assert outcome.history[-1]["client_level_epsilon"] <= 3.5
    import json

    summary = json.loads((cfg.out_path / "metrics.json").read_text())["summary"]
    assert summary["stop_reason"] == outcome.stop_reason
    assert summary["client_level_epsilon"] == pytest.approx(outcome.history[-1]["client_level_epsilon"])


def test_adaptive_clipping_accounts_both_releases_stops_on_budget_and_resumes(tmp_path):
    from fedsafe.strategies.client_dp import AdaptiveClippingAccountant

    adaptive = dict(client_dp="adaptive", client_noise_multiplier=1.0, client_clipping_norm=0.1, dp=False)
    cfg, grid, strategy = federation(tmp_path, num_rounds=2, **adaptive)
    outcome = run(cfg, grid, strategy)
    eps = [r["client_level_epsilon"] for r in outcome.history[1:]]
    # Update noise z_Δ = (z⁻² − (2σ_b)⁻²)^-½ with σ_b = max(n/20, z) = 1; the count query adds σ_b.
    z_update = (1.0 - 0.25) ** -0.5
    assert eps[-1] == pytest.approx(AdaptiveClippingAccountant(z_update, 1.0, 1e-5, None).epsilon(2))
    norms = [r["client_dp"]["clipping_norm"] for r in outcome.history[1:]]
    assert norms[0] == 0.1 and all(n > 0 for n in norms)
    stopped_cfg, grid, strategy = federation(tmp_path / "b", num_rounds=3, client_level_epsilon=eps[0] + 0.01,
                                             **adaptive)
    stopped = run(stopped_cfg, grid, strategy)
    assert stopped.stop_reason and len(stopped.history) == 2
    assert math.isclose(stopped.history[-1]["client_level_epsilon"], eps[0], rel_tol=1e-9)


def test_client_level_accountants_and_clip_norm_survive_a_restart(tmp_path):
    from fedsafe.strategies.client_dp import AdaptiveClippingAccountant

    for mode, extra in (("adaptive", dict(client_clipping_norm=0.1, client_noise_multiplier=1.0)), ("fixed", {})):
        kwargs = {**FIXED, "client_dp": mode, **extra}
        cfg, grid, strategy = federation(tmp_path / mode, num_rounds=2, **kwargs)
        first = run(cfg, grid, strategy)
        cfg3, grid, fresh = federation(tmp_path / mode, num_rounds=3, resume=True, **kwargs)
        resumed = run(cfg3, grid, fresh)
        assert [h["round"] for h in resumed.history] == [0, 1, 2, 3]
        third = resumed.history[-1]
        # Round 3's clipping norm starts where round 2 left it, and ε composes three releases, not one.
        assert third["client_dp"]["releases"] == 3
        assert third["client_level_epsilon"] > first.history[-1]["client_level_epsilon"]
        if mode == "adaptive":
            z_update = (1.0 - 0.25) ** -0.5
            assert third["client_level_epsilon"] == pytest.approx(
                AdaptiveClippingAccountant(z_update, 1.0, 1e-5, None).epsilon(3))
            assert third["client_dp"]["clipping_norm"] != pytest.approx(0.1)  # not reset to the initial C


def test_resuming_twice_from_one_checkpoint_draws_fresh_client_level_noise(tmp_path, flower_task_identity):
    """Issue 10.6 (server side): a resumed coordinator restores NumPy's global random state from its
    checkpoint, and Flower's server-side DP noise comes from that state: a retried round reused the noise
    of the interrupted attempt. Resumed twice from one checkpoint, round 3 must now get two different
    noise draws, while the node sampling (its own seeded generator, restored) stays the same."""
    import shutil

    import numpy as np
    from test_coordinator_faults import FakeGrid, _config, _run, good

    from fedsafe.server.config import RunConfig

    nodes = {1: good(), 2: good(0.02), 3: good(0.03)}
    cfg = _config(tmp_path / "first", num_rounds=2, client_dp="fixed", client_noise_multiplier=1.0,
                  fraction_train=0.7, min_nodes=3)
    _run(cfg, FakeGrid(dict(nodes)))
    models, sampled = [], []
    for attempt in ("retry-a", "retry-b"):
        shutil.copytree(cfg.out_path, tmp_path / attempt)
        grid = FakeGrid(dict(nodes))
        resumed = _run(RunConfig(**{**cfg.__dict__, "out_dir": str(tmp_path / attempt), "num_rounds": 3,
                                    "resume": True}), grid)
        assert resumed.history[-1]["round"] == 3 and resumed.history[-1]["aggregated"]
        models.append({k: v.numpy() for k, v in resumed.arrays.items()})
        sampled.append(sorted(n for rnd, n in grid.sent if rnd == 3))
    assert sampled[0] == sampled[1]
    assert any(not np.array_equal(models[0][k], models[1][k]) for k in models[0])
