"""Issue 12 item 4: never trade a good model for noise.

A node refuses a run whose calibrated σ is above its max-noise-multiplier, before its ledger is touched;
a round every node refuses is not aggregated and stops the run; a round that makes the global model
markedly worse is flagged, and best_model.pt keeps the better model. In-process federations (no Ray).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsafe.client.app import train_round
from fedsafe.client.policy import NodePolicy
from fedsafe.protocol import NOISE_TOO_HIGH, REFUSALS
from fedsafe.server.config import RunConfig
from fedsafe.server.loop import progress_line
from tests.inprocess import federate
from tests.node_harness import node_context, train_message


def _ledger_bytes(state_dir) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(state_dir.glob("*.json"))}


def test_a_tiny_grant_on_a_nearly_spent_ledger_is_refused_and_spends_nothing(tmp_path, capsys, flower_task_identity):
    state_dir = tmp_path / "ledgers"
    policy = NodePolicy(state_dir=str(state_dir), max_epsilon=1.0, seed_noise=True)
    context = node_context(partition_id=0, num_partitions=3)
    # A first run spends most of the node's cap.
    first = RunConfig(dataset="breast-cancer", model="mlp", epsilon=0.99, num_rounds=1, local_epochs=1)
    assert not train_round(train_message(first, 1, run_key="run-a"), context, policy).has_error()
    spent = _ledger_bytes(state_dir)
    assert spent

    # A second run asks for a full ε; the cap leaves it a sliver, which only a σ far above the bound meets.
    second = RunConfig(dataset="breast-cancer", model="mlp", epsilon=1.0, num_rounds=10, local_epochs=1)
    reply = train_round(train_message(second, 1, run_key="run-b"), context, policy)
    assert reply.has_error() and reply.error.code == NOISE_TOO_HIGH
    assert reply.error.reason == REFUSALS[NOISE_TOO_HIGH] == "noise would drown the update"
    assert _ledger_bytes(state_dir) == spent  # nothing reserved, no run plan written
    assert "max-noise-multiplier=20" in capsys.readouterr().err  # the operator hears why

    # The same round on a node whose operator accepts that much noise is trained and charged: the refusal
    # above was the bound's doing, not the budget's.
    lenient = policy.with_overrides(max_noise_multiplier=1e4)
    reply = train_round(train_message(second, 1, run_key="run-b"), context, lenient)
    assert not reply.has_error()
    assert reply.content["metrics"]["noise-multiplier"] > policy.max_noise_multiplier
    assert _ledger_bytes(state_dir) != spent


def test_max_noise_multiplier_is_a_node_config_key_with_bounds():
    assert NodePolicy.from_node_config({"max-noise-multiplier": 4}).max_noise_multiplier == 4.0
    assert NodePolicy.from_node_config({}).max_noise_multiplier == 20.0
    from fedsafe.client.policy import PolicyError

    with pytest.raises(PolicyError, match="max-noise-multiplier"):
        NodePolicy.from_node_config({"max-noise-multiplier": 0})


def test_a_round_every_node_refuses_for_noise_is_not_aggregated_and_stops_the_run(tmp_path, flower_task_identity):
    # ε=0.1 over 4 rounds of breast-cancer on 3 nodes needs σ far above 20: every node refuses.
    cfg, outcome, _ = federate(tmp_path, nodes=3, dataset="breast-cancer", model="mlp", epsilon=0.1,
                               num_rounds=4, local_epochs=1)
    initial, last = outcome.history[0], outcome.history[-1]
    assert len(outcome.history) == 2 and last["round"] == 1  # stopped after the first round, not looped on
    assert not last["aggregated"] and last["replies"] == 0 and last["noise_refusals"] == 3
    assert last["eval"] == initial["eval"]  # the global model is unchanged
    from fedsafe.server.app import global_model_setup

    start, _, _ = global_model_setup(cfg)
    for key in start.keys():
        assert np.array_equal(start[key].numpy(), outcome.arrays[key].numpy())
    assert "noise would drown the update" in outcome.stop_reason and "unchanged" in outcome.stop_reason
    assert "not aggregated" in progress_line(last, cfg)
    assert not list((tmp_path / "run" / "ledgers").glob("*.json"))  # no node spent anything


def test_a_markedly_worse_round_is_flagged_and_best_model_keeps_the_better_one(tmp_path, flower_task_identity):
    """Diabetes at lr 0.5 (no early stopping): r2 peaks early and then falls."""
    cfg, outcome, _ = federate(tmp_path, nodes=3, model="mlp", dataset="diabetes", lr=0.5, epsilon=20.0,
                               num_rounds=4)
    history = outcome.history
    r2 = [h["eval"]["r2"] for h in history]
    best_round = max(range(len(r2)), key=r2.__getitem__)
    flagged = [h for h in history if h.get("worse_than_best")]
    assert flagged, r2
    for entry in flagged:
        assert r2[entry["round"]] < max(r2[: entry["round"]]) - 0.05
        assert "markedly worse" in entry["worse_than_best"] and "WORSE" in progress_line(entry, cfg)
    saved = torch.load(tmp_path / "run" / "best_model.pt", weights_only=True)
    assert saved["round"] == best_round == outcome.best["round"] and outcome.best["metric"] == "r2"
    from flwr.app import ArrayRecord

    from fedsafe.server.app import global_model_setup

    _, _, evaluator = global_model_setup(cfg)
    assert evaluator(ArrayRecord(saved["model_state"]))["r2"] == pytest.approx(r2[best_round], abs=1e-6)
