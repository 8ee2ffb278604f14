"""fedsafe audit: the one-run privacy audit (Steinke, Nasr, Jagielski 2023) — its bound, its canaries, its
refusal outside simulation, and the two targets: with DP the lower bound stays under the reported ε; without
DP the white-box audit finds a large one (the audit has power)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fedsafe.server.config import ConfigError, RunConfig
from fedsafe.simulations.audit import (
    AuditOptions,
    GradientCanaries,
    audit,
    audit_p_value,
    correct_guesses,
    epsilon_lower_bound,
    gradient_canary_hook,
)

# A small federation: 2 nodes, 3 rounds of 2 local epochs on breast-cancer; an MLP wide enough (7.7k weights)
# that the data moves each canary coordinate little, as in the larger models the paper audits.
SMALL = dict(num_rounds=3, local_epochs=2, seed=3, model_options="hidden=256")


# --- the bound ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("r", [10, 50, 200])
def test_all_correct_with_zero_delta_matches_the_closed_form(r):
    # δ = 0, v = r: the p-value is q^r with q = 1/(1+e^-ε); rejecting at 5 % means q^r < 0.05.
    q = 0.05 ** (1 / r)
    assert epsilon_lower_bound(1000, r, r, delta=0.0) == pytest.approx(math.log(q / (1 - q)), abs=1e-6)


def test_all_correct_bound_grows_with_the_number_of_guesses():
    bounds = [epsilon_lower_bound(1000, r, r, delta=1e-5) for r in (10, 20, 50, 100, 200, 500)]
    assert all(a < b for a, b in zip(bounds, bounds[1:]))
    assert bounds[0] > 1.0 and bounds[-1] > 5.0


def test_chance_level_guessing_proves_nothing():
    assert epsilon_lower_bound(1000, 100, 50, delta=1e-5) == 0.0
    assert epsilon_lower_bound(1000, 100, 55, delta=1e-5) == 0.0  # within chance at 95 %
    assert epsilon_lower_bound(1000, 100, 30, delta=1e-5) == 0.0


def test_delta_term_weakens_the_bound_and_p_value_grows_with_epsilon():
    assert epsilon_lower_bound(1000, 100, 90, delta=1e-6) > epsilon_lower_bound(1000, 100, 90, delta=1e-4)
    p = [audit_p_value(1000, 100, 80, eps, 1e-5) for eps in (0.0, 0.5, 1.0, 2.0)]
    assert all(a < b for a, b in zip(p, p[1:]))
    # at ε = 0 and δ = 0 it is the plain binomial tail of fair coins
    assert audit_p_value(100, 10, 10, 0.0, 0.0) == pytest.approx(0.5 ** 10)


def test_bound_rejects_impossible_counts():
    with pytest.raises(ValueError, match="correct"):
        epsilon_lower_bound(100, 10, 11, delta=1e-5)


def test_guesses_take_the_top_and_bottom_scores():
    members = np.array([True] * 5 + [False] * 5)
    scores = np.where(members, 1.0, 0.0) + np.linspace(0, 0.1, 10)
    assert correct_guesses(scores, members, 3) == 6
    assert correct_guesses(-scores, members, 3) == 0


# --- canaries stay in the audit -----------------------------------------------------------------------------


def test_canary_hook_is_gone_after_the_audit_context():
    from opacus.optimizers import DPOptimizer

    before = DPOptimizer.add_noise
    with gradient_canary_hook():
        assert DPOptimizer.add_noise is not before
    assert DPOptimizer.add_noise is before


def test_gradient_canaries_are_exactly_the_members_sampled():
    import torch

    rng = np.random.default_rng(0)
    plan = GradientCanaries.draw({"w": (10, 10), "b": (10,)}, 40, norm=2.0, private=True, rng=rng)
    plan.sample_rate = 1.0  # every member, every step
    tensors = [torch.zeros(10, 10), torch.zeros(10)]
    plan.add_to(tensors, 1.0)
    flat = torch.cat([t.reshape(-1) for t in tensors]).numpy()
    assert np.count_nonzero(flat) == plan.members.sum() == plan.inserted
    assert set(np.abs(flat[flat != 0])) == {2.0}  # norm C each: clipping leaves them whole


def test_a_real_node_refuses_a_canary_request(tmp_path, flower_task_identity):
    # A complete, valid train message, plus a key asking for canaries: the deployable node's handler refuses
    # it (a key it does not know) before it opens a ledger or touches data.
    from fedsafe.client.app import REQUEST_REFUSED, train_round
    from fedsafe.client.policy import NodePolicy

    from node_harness import node_context, train_message

    msg = train_message(RunConfig(num_rounds=1, num_partitions=2), server_round=1)
    msg.content["config"]["audit-canaries"] = 1000
    reply = train_round(msg, node_context(0, 2), NodePolicy(state_dir=str(tmp_path / "ledgers")))
    assert reply.has_error() and reply.error.code == REQUEST_REFUSED
    # refused by the one check of the request's keys (fedsafe.client.policy), which names the key and why
    assert "unknown keys ['audit-canaries']" in reply.error.reason and "simulation only" in reply.error.reason
    assert not (tmp_path / "ledgers").exists()
    # and no setting a node knows could carry canaries past that check
    from fedsafe.settings import RUN_SETTINGS

    assert not [s.key for s in RUN_SETTINGS if s.sent and ("canar" in s.key or "audit" in s.key)]
    # the same message without the canary key trains (the refusal is about the canaries, nothing else)
    del msg.content["config"]["audit-canaries"]
    ok = train_round(msg, node_context(0, 2), NodePolicy(state_dir=str(tmp_path / "ledgers")))
    assert not ok.has_error() and ok.content["metrics"]["epsilon"] > 0


def test_audit_refuses_what_it_cannot_audit(tmp_path):
    with pytest.raises(ConfigError, match="secagg"):
        audit(RunConfig(secagg=True, out_dir=str(tmp_path)), AuditOptions(num_nodes=3))
    with pytest.raises(ConfigError, match="guess-fraction"):
        AuditOptions(guess_fraction=0.9)


def test_cli_audit_refuses_attackers_in_one_line(capsys):
    from fedsafe.cli import main

    assert main(["audit", "--attackers", "1", "--attack", "scale"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--attackers" in err


# --- the targets --------------------------------------------------------------------------------------------


def test_with_dp_the_lower_bound_stays_under_the_reported_epsilon(tmp_path):
    # audit() raises PrivacyContradiction if either bound exceeds the ledger's ε: that failure is the alarm.
    report = audit(RunConfig(**SMALL, epsilon=3.0, out_dir=str(tmp_path / "dp")), AuditOptions(num_nodes=2))
    assert 0 < report.reported_epsilon <= 3.0 + 1e-6
    assert report.white_box.epsilon_lower_bound <= report.reported_epsilon
    assert report.black_box.epsilon_lower_bound <= report.reported_epsilon
    assert report.white_box.canaries == 1000 and report.white_box.guesses == 100
    saved = json.loads((tmp_path / "dp" / "audit.json").read_text())
    assert saved["reported_epsilon"] == report.reported_epsilon and not saved["contradicted"]
    assert (tmp_path / "dp" / "audit_accuracy.png").stat().st_size > 1000
    assert not list(tmp_path.rglob("*ledger*"))  # the audit's ledgers were throwaway, removed with its data


def test_a_training_bug_that_drops_the_noise_fails_loudly(tmp_path, monkeypatch):
    # The node accounts ε = 0.5 but (bug) adds no noise: the audit's bound passes the reported ε and it raises.
    import torch

    from fedsafe.simulations.audit import PrivacyContradiction

    monkeypatch.setattr("opacus.optimizers.optimizer._generate_noise",
                        lambda std, reference, **_: torch.zeros_like(reference))
    with pytest.raises(PrivacyContradiction, match="BUG") as caught:
        audit(RunConfig(**SMALL, epsilon=0.5, out_dir=str(tmp_path / "bug")), AuditOptions(num_nodes=2))
    assert caught.value.report.white_box.epsilon_lower_bound > caught.value.report.reported_epsilon
    assert json.loads((tmp_path / "bug" / "audit.json").read_text())["contradicted"]


def test_without_dp_the_white_box_audit_has_power(tmp_path):
    report = audit(RunConfig(**SMALL, dp=False, out_dir=str(tmp_path / "nodp")), AuditOptions(num_nodes=2))
    assert report.reported_epsilon is None
    assert report.white_box.epsilon_lower_bound >= 2.0, report.lines()
