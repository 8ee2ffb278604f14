"""The training settings fedsafe picks for the run's budget (fedsafe.picked_defaults, issue 12 item 1): the
user's settings always win, the picks follow ε and the model, a node never takes an unpicked placeholder,
the ε the nodes report is exact for what the picks ran, and the picked runs learn."""

from dataclasses import replace

import pytest

from fedsafe.client.accounting import calibrate_noise, epsilon
from fedsafe.client.policy import DEFAULT_MAX_NOISE_MULTIPLIER, PolicyError, TrainRequest
from fedsafe.client.training import TrainSettings, poisson_schedule, scheduled_lr
from fedsafe.picked_defaults import DISTRIBUTED_DP, FIXED_ROUNDS, NO_DP
from fedsafe.server.config import RunConfig
from fedsafe.settings import RUN_SETTINGS
from tests.node_harness import train_message

pytestmark = pytest.mark.usefixtures("flower_task_identity")

PICKABLE_KEYS = sorted(s.key for s in RUN_SETTINGS if s.pickable)


def _values(cfg: RunConfig) -> dict:
    return {key: cfg.to_mapping()[key] for key in PICKABLE_KEYS}


def test_settings_the_user_gives_always_win():
    mine = dict(num_rounds=4, local_epochs=2, batch_size=8, lr=0.07, lr_schedule="cosine")
    for budget in (dict(epsilon=0.5), dict(epsilon=3.0, model="cnn", dataset="digits"), dict(dp=False)):
        cfg = RunConfig(**mine, **budget)
        assert {k: getattr(cfg, k) for k in mine} == mine and cfg.picked == () and cfg.picks_line() is None
    one = RunConfig(lr=0.07)  # one setting given: the rest picked, that one kept, and the line says which
    assert one.lr == 0.07 and "lr" not in dict(one.picked) and "lr 1.0" not in one.picks_line()
    assert "num-rounds 20" in one.picks_line()


def test_picks_follow_the_budget_and_the_model():
    mlp, cnn = RunConfig(), RunConfig(model="cnn", dataset="digits")
    assert _values(mlp) == {"num-rounds": 20, "local-epochs": 1, "batch-size": 256, "lr": 1.0,
                            "lr-schedule": "constant"}
    assert _values(cnn) == {"num-rounds": 60, "local-epochs": 1, "batch-size": 256, "lr": 3.0,
                            "lr-schedule": "cosine"}
    assert RunConfig(epsilon=0.5).num_rounds == 5 and RunConfig(model="cnn", epsilon=1.2).num_rounds == 29
    # below ε = 2 the MLP's steps halve (measured over five seeds); the CNN's recipe keeps its lr
    assert RunConfig(epsilon=1.0).lr == 0.5 and RunConfig(epsilon=2.0).lr == 1.0
    assert "lr 0.5 below ε=2" in RunConfig(epsilon=1.0).picks_line()
    assert RunConfig(model="cnn", dataset="digits", epsilon=1.0).lr == 3.0
    no_dp = RunConfig(dp=False)
    assert {k: getattr(no_dp, k) for k in NO_DP} == NO_DP
    distributed = RunConfig(secagg=True, distributed_dp=True, local_steps=1, num_partitions=10)
    assert {k: getattr(distributed, k) for k in DISTRIBUTED_DP} == DISTRIBUTED_DP
    # The rounds fixed by the user: the per-round settings fedsafe always had, not half a recipe.
    fixed = RunConfig(model="cnn", num_rounds=10)
    assert fixed.num_rounds == 10 and {k: getattr(fixed, k) for k in FIXED_ROUNDS} == FIXED_ROUNDS
    assert "num-rounds set" in fixed.picks_line()


@pytest.mark.parametrize("model", ["mlp", "cnn"])
@pytest.mark.parametrize("eps", [0.2, 0.3, 0.5, 0.9, 1.0, 1.5, 3.0, 8.0])
def test_the_picks_are_never_refused_as_noise_by_a_default_node(model, eps):
    """At q = 1 (a node of up to 256 records: the largest σ the picks can need) σ stays under the nodes'
    default max-noise-multiplier, whatever the budget."""
    cfg = RunConfig(model=model, epsilon=eps)
    sample_rate, batches = poisson_schedule(100, cfg.batch_size)
    assert sample_rate == 1.0
    sigma = calibrate_noise([], sample_rate, cfg.num_rounds * batches * cfg.local_epochs, eps, cfg.delta)
    assert sigma < DEFAULT_MAX_NOISE_MULTIPLIER, (cfg.num_rounds, sigma)


def test_a_copy_with_another_budget_picks_again_and_a_copy_with_a_setting_keeps_it():
    cnn = RunConfig(model="cnn", dataset="digits")
    assert replace(cnn, epsilon=1.2).num_rounds == 29  # a sweep's point at another ε
    assert replace(cnn, dp=False).lr == NO_DP["lr"]
    tuned = replace(cnn, lr=0.2)  # a tuning trial's own lr wins
    assert tuned.lr == 0.2 and tuned.num_rounds == 60 and "lr" not in dict(tuned.picked)
    assert RunConfig(**{**cnn.__dict__, "num_rounds": 3}).local_epochs == FIXED_ROUNDS["local_epochs"]


@pytest.mark.parametrize("key, placeholder", [("batch-size", 0), ("lr", 0.0), ("num-rounds", 0),
                                              ("lr-schedule", "")])
def test_a_node_refuses_a_setting_left_to_the_coordinator(key, placeholder):
    """PICKED is the coordinator's placeholder; a train message carrying it is refused, naming the key."""
    config = dict(train_message(RunConfig(), 1).content["config"].items())
    with pytest.raises(PolicyError, match=key):
        TrainRequest.from_config({**config, key: placeholder}, "flower-run")


def test_cosine_schedule_decays_the_lr_over_the_planned_rounds():
    at = lambda r, rounds=10: scheduled_lr(TrainSettings(lr=2.0, lr_schedule="cosine", server_round=r,
                                                          num_rounds=rounds))
    assert at(1) == 2.0 and at(6) == pytest.approx(1.0) and 0 < at(10) < 0.05
    assert all(at(r) > at(r + 1) for r in range(1, 10)) and at(12) == at(10)  # a run extended: the last lr
    assert scheduled_lr(TrainSettings(lr=0.3, lr_schedule="constant", server_round=9, num_rounds=10)) == 0.3


@pytest.mark.slow
def test_the_default_run_learns_and_reports_the_exact_epsilon_of_what_it_picked(tmp_path):
    """`fedsafe simulate` at its defaults (breast-cancer MLP, ε=3), 5 nodes: the nodes calibrate σ for the
    picked 20 full-batch rounds, and the reported ε is the accountant's for exactly that."""
    from fedsafe.simulations.run import SimulationOptions, simulate_in_process

    cfg = RunConfig(out_dir=str(tmp_path / "run"))
    outcome = simulate_in_process(cfg, SimulationOptions(num_nodes=5), progress=None)
    rounds = [r for r in outcome.history if r.get("aggregated")]
    assert len(rounds) == cfg.num_rounds == 20
    first, last = outcome.history[0]["eval"], rounds[-1]["eval"]
    assert last["accuracy"] >= 0.8 and last["accuracy"] > first["accuracy"] + 0.1, (first, last)  # majority: 0.63
    sigma = calibrate_noise([], 1.0, cfg.num_rounds, cfg.epsilon, cfg.delta)  # q = 1: ~85 records per node
    for node, noise in rounds[-1]["node_noise"].items():
        assert noise["noise_multiplier"] == pytest.approx(sigma, rel=1e-6), node
        assert noise["sample_rate"] == 1.0
    expected = epsilon([(sigma, 1.0, cfg.num_rounds)], cfg.delta)
    assert max(outcome.node_epsilon.values()) == pytest.approx(expected, rel=1e-6) and expected <= cfg.epsilon


@pytest.mark.slow
def test_a_cnn_on_digits_learns_at_its_picked_settings(tmp_path):
    from fedsafe.simulations.run import SimulationOptions, simulate_in_process

    cfg = RunConfig(model="cnn", dataset="digits", out_dir=str(tmp_path / "run"))
    outcome = simulate_in_process(cfg, SimulationOptions(num_nodes=10), progress=None)
    accuracy = outcome.history[-1]["eval"]["accuracy"]
    assert accuracy >= 0.4, accuracy  # chance: 0.10
    assert max(outcome.node_epsilon.values()) <= cfg.epsilon + 1e-9
