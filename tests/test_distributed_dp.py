"""Distributed DP over SecAgg+ (issue 12.3): each node adds σ/√m, m being SecAgg+'s threshold; its ledger
records ε against the aggregate (σ) and of its own update alone (σ/√m); the cap counts the one node-config
cap-basis names; a sum of fewer than m nodes is never released; and the federation still learns."""

import math

import numpy as np
import pytest
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from opacus.accountants import RDPAccountant

from fed_harness import run
from fedsafe.client.accounting import AGGREGATE, OWN_UPDATE
from fedsafe.client.app import REQUEST_REFUSED, train_round
from fedsafe.client.ledger import BudgetExhausted, LedgerError, PrivacyLedger, audit_state_dir
from fedsafe.client.policy import NodePolicy, PolicyError
from fedsafe.client.training import TrainSettings, train
from fedsafe.server.app import build_run_strategy, global_model_setup
from fedsafe.server.config import ConfigError, RunConfig
from fedsafe.simulations.local import NODE_ID_BASE, LocalGrid
from fedsafe.simulations.run import SimulationOptions, _simulated_federation
from tests.node_harness import node_context, train_message

NODES = 5
# 5 nodes, secagg-threshold 0.6: SecAgg+ unmasks only with shares from 3 live nodes, so m = 3.
DISTRIBUTED = dict(secagg=True, distributed_dp=True, local_steps=1, secagg_threshold=0.6, dataset="breast-cancer",
                   model="mlp", lr=1.0, epsilon=3.0)
M = 3


def _federation(tmp_path, cap_basis="aggregate", drop=None, **overrides):
    cfg = RunConfig(**{"num_rounds": 3, "out_dir": str(tmp_path / "run"), **DISTRIBUTED, **overrides})
    federation = _simulated_federation(cfg, SimulationOptions(num_nodes=NODES, cap_basis=cap_basis))
    return federation.cfg, LocalGrid(federation.client_app, NODES, drop=drop), build_run_strategy(federation.cfg)


def _accountant_epsilon(sigma, sample_rate, steps, delta):
    accountant = RDPAccountant()
    for _ in range(steps):
        accountant.step(noise_multiplier=sigma, sample_rate=sample_rate)
    return accountant.get_epsilon(delta)


def _rounds(outcome):
    return [r for r in outcome.history if "aggregated" in r]  # not the initial model's evaluation


def _ledgers(cfg):
    audit = audit_state_dir(cfg.out_path / "ledgers")
    assert not audit.problems and len(audit.ledgers) == NODES
    return audit.ledgers


def test_both_epsilons_equal_an_accountant_fed_sigma_and_its_share(tmp_path):
    cfg, grid, strategy = _federation(tmp_path)
    outcome = run(cfg, grid, strategy)
    assert all(r["aggregated"] and r["secagg"]["threshold"] == M for r in _rounds(outcome))

    for ledger in _ledgers(cfg):
        (run_key,) = ledger.state_dict()["runs"]
        plan = ledger.run_plan(run_key)
        assert plan.noise_shares == M and plan.steps_per_round == 1
        sigma = plan.aggregate_noise_multiplier  # what the SecAgg+ sum of M shares carries
        assert plan.noise_multiplier == pytest.approx(sigma / math.sqrt(M), rel=1e-12)  # what the node added
        steps = cfg.num_rounds
        aggregate = _accountant_epsilon(sigma, plan.sample_rate, steps, cfg.delta)
        own = _accountant_epsilon(sigma / math.sqrt(M), plan.sample_rate, steps, cfg.delta)
        assert ledger.epsilon(cfg.delta, basis=AGGREGATE) == pytest.approx(aggregate, rel=1e-9)
        assert ledger.epsilon(cfg.delta, basis=OWN_UPDATE) == pytest.approx(own, rel=1e-9)
        # cap-basis aggregate: the run's ε (3) is met against the sum; the update alone leaks far more.
        assert cfg.epsilon - 0.02 <= aggregate <= cfg.epsilon
        assert own > 2 * aggregate

    # What the nodes told the server matches their ledgers, and the cap's figure is the aggregate one.
    replies = [r.content.metric_records["metrics"] for r in grid.received
               if not r.has_error() and "metrics" in r.content.metric_records]
    last = [m for m in replies if "epsilon-aggregate" in m]
    assert len(last) == NODES * cfg.num_rounds
    final = last[-NODES:]
    for metrics in final:
        assert metrics["epsilon"] == metrics["epsilon-aggregate"] < metrics["epsilon-own-update"]
        assert metrics["noise-shares"] == M


def test_the_cap_counts_the_figure_cap_basis_names(tmp_path):
    grant, cap, q, rounds = 3.0, 4.0, 0.25, 40
    ledgers = {}
    for basis in (OWN_UPDATE, AGGREGATE):
        ledger = PrivacyLedger.open(tmp_path / basis, "data")
        plan = ledger.plan_run("run", sample_rate=q, steps_per_round=1, planned_rounds=rounds, run_epsilon=grant,
                               max_epsilon=cap, delta=1e-5, noise_shares=4, cap_basis=basis)
        for r in range(1, rounds + 1):
            ledger.reserve("run", r, plan.round_spend(), max_epsilon=cap, run_epsilon=grant, delta=1e-5,
                           noise_shares=4, cap_basis=basis)
        ledgers[basis] = PrivacyLedger.open(tmp_path / basis, "data")  # re-read: the file verifies
        for check, sigma in ((OWN_UPDATE, plan.noise_multiplier), (AGGREGATE, plan.noise_multiplier * 2)):
            assert ledgers[basis].epsilon(1e-5, basis=check) == pytest.approx(
                _accountant_epsilon(sigma, q, rounds, 1e-5), rel=1e-9)
    own_basis, aggregate_basis = ledgers[OWN_UPDATE], ledgers[AGGREGATE]
    # own-update (the default): the node's update alone stays within the cap, so the aggregate gets more
    # noise than the grant needs; aggregate: the sum lands on the grant and the update alone exceeds the cap.
    assert cap - 0.02 <= own_basis.epsilon(1e-5, basis=OWN_UPDATE) <= cap
    assert own_basis.epsilon(1e-5, basis=AGGREGATE) < grant - 0.5
    assert grant - 0.02 <= aggregate_basis.epsilon(1e-5, basis=AGGREGATE) <= grant
    assert aggregate_basis.epsilon(1e-5, basis=OWN_UPDATE) > cap
    # One round more on the own-update ledger: its cap is spent on that figure, so it is refused.
    with pytest.raises(BudgetExhausted, match="own-update"):
        own_basis.reserve("run", rounds + 1, own_basis.run_plan("run").round_spend(), max_epsilon=cap, delta=1e-5,
                          noise_shares=4, cap_basis=OWN_UPDATE)
    # A reservation that claims another m than its run's plan would misstate the aggregate: refused.
    with pytest.raises(LedgerError, match="noise shared by 9"):
        aggregate_basis.reserve("run", rounds + 1, aggregate_basis.run_plan("run").round_spend(), max_epsilon=100,
                                delta=1e-5, noise_shares=9, cap_basis=AGGREGATE)


def test_cap_basis_is_a_node_config_key_with_one_line_errors():
    assert NodePolicy.from_node_config({}).cap_basis == OWN_UPDATE
    assert NodePolicy.from_node_config({"cap-basis": "aggregate"}).cap_basis == AGGREGATE
    with pytest.raises(PolicyError, match="cap-basis"):
        NodePolicy.from_node_config({"cap-basis": "both"})


def test_a_sum_of_fewer_than_m_nodes_is_never_released(tmp_path):
    dropped = {NODE_ID_BASE + i for i in range(NODES - M + 1)}  # 3 of 5 vanish while training: 2 < m survive

    def drop(node, message):
        configs = message.content.config_records.get(RECORD_KEY_CONFIGS)
        return node in dropped and configs is not None and configs.get(Key.STAGE) == Stage.COLLECT_MASKED_VECTORS

    cfg, grid, strategy = _federation(tmp_path, drop=drop, num_rounds=1)
    initial, _, _ = global_model_setup(cfg)
    outcome = run(cfg, grid, strategy)
    (record,) = _rounds(outcome)
    assert not record["aggregated"]
    assert "distributed DP: 2 masked vectors, fewer than the 3 noise shares" in record["secagg"]["abandoned"]
    assert all(np.array_equal(outcome.arrays[k].numpy(), initial[k].numpy()) for k in initial.keys())
    # No unmasking stage was even started: no node revealed a share for a sum that is not released.
    assert not any(m.content.config_records.get(RECORD_KEY_CONFIGS, {}).get(Key.NODE_ID_LIST)
                   for m in grid.received if not m.has_error())


def test_one_node_dropping_above_m_still_releases_the_sum(tmp_path):
    def drop(node, message):
        configs = message.content.config_records.get(RECORD_KEY_CONFIGS)
        return node == NODE_ID_BASE and configs is not None and configs.get(Key.STAGE) == Stage.COLLECT_MASKED_VECTORS

    cfg, grid, strategy = _federation(tmp_path, drop=drop, num_rounds=1)
    (record,) = _rounds(run(cfg, grid, strategy))
    assert record["aggregated"] and record["secagg"]["noise_shares_summed"] == NODES - 1 >= M


def test_nodes_refuse_a_round_whose_threshold_fell_below_their_noise_share(tmp_path):
    cfg, grid, strategy = _federation(tmp_path, num_rounds=2)

    def lower_threshold(record, _cfg):  # after round 1, the coordinator asks SecAgg+ for only 2 live nodes
        strategy.reconstruction_threshold = 0.4

    outcome = run(cfg, grid, strategy, progress=lower_threshold)
    first, second = _rounds(outcome)
    assert first["aggregated"] and not second["aggregated"]
    round_two = [r for r in grid.received if r.has_error()]
    assert len(round_two) == NODES and all(r.error.code == REQUEST_REFUSED for r in round_two)
    for ledger in _ledgers(cfg):
        assert len(ledger.history) == 1  # round 2 spent nothing


@pytest.mark.usefixtures("flower_task_identity")
def test_node_refuses_distributed_dp_outside_secagg_or_with_several_local_steps(tmp_path):
    cfg = RunConfig(num_rounds=2, num_partitions=3, **DISTRIBUTED)
    policy = NodePolicy(state_dir=str(tmp_path / "ledgers"), seed_noise=True)
    # A plain train message (no SecAgg+ stage) asking for distributed DP: the share would reach the server alone.
    reply = train_round(train_message(cfg, 1), node_context(), policy)
    assert reply.has_error() and reply.error.code == REQUEST_REFUSED
    message = train_message(cfg, 1)
    message.content["config"]["local-steps"] = 3
    reply = train_round(message, node_context(), policy)
    assert reply.error.code == REQUEST_REFUSED and "one DP-SGD step" in reply.error.reason
    message = train_message(cfg, 1)
    message.content["config"]["optimizer"] = "adam"
    assert "optimizer must be sgd" in train_round(message, node_context(), policy).error.reason
    assert not list((tmp_path / "ledgers").glob("*.json"))  # nothing spent


@pytest.mark.parametrize("overrides, problem", [
    (dict(secagg=False), "needs secagg"),
    (dict(local_steps=0), "local-steps=1"),
    (dict(local_steps=2), "local-steps=1"),
    (dict(optimizer="adam"), "optimizer sgd"),
])
def test_coordinator_refuses_a_distributed_dp_run_the_accounting_does_not_cover(overrides, problem):
    with pytest.raises(ConfigError, match=problem):
        RunConfig(**{**DISTRIBUTED, **overrides})


def test_local_steps_takes_exactly_that_many_dp_steps():
    from fedsafe.client.data import PartitionScheme, load_partition
    from fedsafe.models import DataSpec, build_model, task_for

    data = load_partition("breast-cancer", 0, PartitionScheme("iid", 3, seed=3))  # ~190 records: 6 batches of 32
    model = build_model("mlp", DataSpec(input_shape=(30,), num_classes=2, task="classification"), {})
    outcome = train(model, task_for("classification", 2), data,
                    TrainSettings(local_steps=8, noise_multiplier=1.0), __import__("torch").device("cpu"), seed=1)
    assert outcome.steps == 8 and sum(n for _, _, n in outcome.dp_spend) == 8


def test_distributed_dp_over_secagg_learns(tmp_path):
    cfg, grid, strategy = _federation(tmp_path, num_rounds=10)
    outcome = run(cfg, grid, strategy)
    accuracy = outcome.history[-1]["eval"]["accuracy"]
    # breast-cancer's majority class is 63% of the test split: a margin well above chance.
    assert accuracy >= 0.85, accuracy


def test_an_update_secagg_would_clip_after_the_noise_is_withheld_and_others_share_one_weight():
    from fedsafe.client.secagg import SecAggRound, _equal_weight

    secagg = SecAggRound(threshold=M, max_weight=1000.0, clipping_range=8.0)
    # Every node masks with SecAgg+'s max weight: Flower's weight ratio is then exactly 1 on every node.
    assert _equal_weight([np.full(3, 7.9), np.zeros(0)], secagg) == 1000
    with pytest.raises(PolicyError, match="clipping range"):
        _equal_weight([np.array([0.1, -8.5])], secagg)
    with pytest.raises(PolicyError, match="clipping range"):
        _equal_weight([np.array([np.nan])], secagg)
