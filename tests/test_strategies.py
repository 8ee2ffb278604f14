"""Strategies by name: building, parameter checks, rounds through fedsafe's loop, checkpoint and resume."""

import shutil

import numpy as np
import pytest

from fedsafe.server.checkpoint import CheckpointError
import torch

from fedsafe.client.data import load_dataset
from fedsafe.client.policy import TrainRequest
from fedsafe.client.training import TrainSettings, train
from fedsafe.models import build_model, task_for
from fedsafe.server.checkpoint import load_checkpoint
from fedsafe.server.config import ConfigError, RunConfig
from fedsafe.strategies import StrategyError, build_strategy, check_strategy, strategy_names

from fed_harness import federation, run

ALL = ["fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedavgm", "fedmedian", "fedtrimmedavg",
       "krum", "multikrum", "bulyan"]


def test_every_asked_for_strategy_is_registered_and_built_from_flower():
    assert set(ALL) <= set(strategy_names())
    for name in ALL:
        strategy = build_strategy(name, fraction_train=1.0, min_train_nodes=2, min_available_nodes=2)
        assert type(strategy).__module__.startswith(("flwr.serverapp.strategy", "fedsafe.strategies.registry"))


def test_unknown_names_and_bad_parameters_are_refused_with_the_valid_choices(tmp_path):
    with pytest.raises(StrategyError, match="choose one of: fedavg, fedprox, fedadam"):
        build_strategy("fedsgd", fraction_train=1.0, min_train_nodes=1, min_available_nodes=1)
    with pytest.raises(ConfigError, match="unknown strategy 'fedsgd'; choose one of: .*krum"):
        RunConfig(strategy="fedsgd")
    with pytest.raises(ConfigError, match="'fedavg' does not use trim-beta; it takes: no parameters"):
        RunConfig(strategy="fedavg", trim_beta=0.3)
    with pytest.raises(ConfigError, match="does not use server-momentum; it takes: server-lr, beta-1, beta-2, tau"):
        RunConfig(strategy="fedadam", server_momentum=0.9)
    with pytest.raises(ConfigError, match=r"trim-beta must be in \[0, 0.5\)"):
        RunConfig(strategy="fedtrimmedavg", trim_beta=0.6)
    with pytest.raises(ConfigError, match="Bulyan needs n >= 4f \\+ 3"):
        RunConfig(strategy="bulyan", num_malicious=1, num_partitions=5)
    with pytest.raises(ConfigError, match="Krum needs n >= 2f \\+ 3"):
        RunConfig(strategy="krum", num_malicious=2, num_partitions=5)
    with pytest.raises(ConfigError, match="unknown client-dp 'local'; choose one of: off, fixed, adaptive"):
        RunConfig(client_dp="local")
    with pytest.raises(ConfigError, match="client-dp=fixed needs an averaging strategy"):
        RunConfig(client_dp="fixed", strategy="krum")
    with pytest.raises(ConfigError, match="secagg .* strategy 'fedmedian' needs each update"):
        RunConfig(secagg=True, strategy="fedmedian")
    with pytest.raises(ConfigError, match="server-lr='abc' is not a valid float"):
        RunConfig.from_mapping({"server-lr": "abc"})
    check_strategy("multikrum", {"num-malicious": 1, "krum-selected": 3}, sampled_nodes=5)
    RunConfig.from_mapping({"strategy": "fedavgm", "server-lr": "0.5", "server-momentum": "0.9"})


@pytest.mark.parametrize("name", ALL)
def test_each_strategy_trains_through_fedsafes_loop(tmp_path, name):
    params = {"fedprox": {"proximal_mu": 0.1}, "fedavgm": {"server_momentum": 0.5},
              "krum": {"num_malicious": 1}, "multikrum": {"num_malicious": 1}}.get(name, {})
    cfg, grid, strategy = federation(tmp_path, nodes=5, strategy=name, num_rounds=2, dp=False, **params)
    outcome = run(cfg, grid, strategy)
    rounds = outcome.history[1:]
    assert [r["aggregated"] for r in rounds] == [True, True]
    assert all(r["replies"] == 5 for r in rounds)
    assert outcome.history[-1]["eval"]["accuracy"] >= 0.85, outcome.history[-1]["eval"]
    # Every aggregate keeps the global model's dtypes (FedAdam's step would otherwise make it float64).
    assert {outcome.arrays[k].dtype for k in outcome.arrays.keys()} == {initial_dtype(cfg)}


def initial_dtype(cfg):
    from fedsafe.server.app import global_model_setup

    arrays, _, _ = global_model_setup(cfg)
    return next(iter(arrays.values())).dtype


class _Crash(Exception):
    pass


@pytest.mark.parametrize("name,params,state_key", [
    ("fedadam", {}, "m_t"),
    ("fedavgm", {"server_momentum": 0.9}, "momentum_vector"),
])
def test_stateful_strategies_resume_to_the_same_model(tmp_path, monkeypatch, name, params, state_key):
    straight_cfg, grid, strategy = federation(tmp_path / "straight", strategy=name, **params)
    straight = run(straight_cfg, grid, strategy)

    def crash_after_round_2(record, _cfg):
        if record["round"] == 2:
            raise _Crash

    cfg, grid, strategy = federation(tmp_path / "crashed", strategy=name, **params)
    with pytest.raises(_Crash):
        run(cfg, grid, strategy, progress=crash_after_round_2)
    saved = load_checkpoint(cfg.out_path, restore_rng=False).strategy_state
    assert any(link.get(state_key) is not None for link in saved["links"])  # strikes may wrap the strategy

    shutil.copytree(tmp_path / "crashed", tmp_path / "crashed-copy")
    resumed_cfg = RunConfig(**{**cfg.__dict__, "resume": True})
    _, grid, fresh_strategy = federation(tmp_path / "crashed", **{**cfg.__dict__, "resume": True})
    resumed = run(resumed_cfg, grid, fresh_strategy)
    assert [h["round"] for h in resumed.history] == [0, 1, 2, 3]
    for key in straight.arrays.keys():
        np.testing.assert_allclose(resumed.arrays[key].numpy(), straight.arrays[key].numpy(), atol=1e-5)

    # Without the saved state the third round lands elsewhere: the state is what made it equal.
    monkeypatch.setattr("fedsafe.server.loop.load_strategy_state_dict", lambda strategy, state: None)
    copy = {**cfg.__dict__, "resume": True, "out_dir": str(tmp_path / "crashed-copy" / "run")}
    _, grid, amnesiac = federation(tmp_path / "crashed-copy", **copy)
    forgot = run(RunConfig(**copy), grid, amnesiac)
    assert [h["round"] for h in forgot.history] == [0, 1, 2, 3]
    assert any(not np.allclose(forgot.arrays[k].numpy(), straight.arrays[k].numpy(), atol=1e-5)
               for k in straight.arrays.keys())


def test_checkpoint_from_another_strategy_refuses_to_resume(tmp_path):
    cfg, grid, strategy = federation(tmp_path, strategy="fedadam", num_rounds=1, dp=False)
    run(cfg, grid, strategy)
    _, grid, other = federation(tmp_path, strategy="fedyogi", num_rounds=2, dp=False, resume=True)
    with pytest.raises(CheckpointError, match="strategy: 'fedadam' → 'fedyogi'"):
        run(RunConfig(**{**cfg.__dict__, "strategy": "fedyogi", "num_rounds": 2, "resume": True}), grid, other)


def _distance_after_training(mu: float, private: bool) -> float:
    split = load_dataset("breast-cancer")
    torch.manual_seed(0)
    model = build_model("mlp", split.train.spec)
    start = [p.detach().clone() for p in model.parameters()]
    settings = TrainSettings(local_epochs=2, batch_size=32, lr=0.5, proximal_mu=mu,
                             noise_multiplier=0.8 if private else None)
    train(model, task_for("classification", 2), split.train.subset(np.arange(120)), settings,
          torch.device("cpu"), seed=0)
    return float(sum(((p.detach() - s) ** 2).sum() for p, s in zip(model.parameters(), start)) ** 0.5)


@pytest.mark.parametrize("private", [False, True])
def test_fedprox_proximal_term_holds_local_training_near_the_global_model(private):
    free, held = _distance_after_training(0.0, private), _distance_after_training(2.0, private)
    assert held < 0.7 * free, (free, held)


def test_fedprox_sends_proximal_mu_and_nodes_read_it(tmp_path):
    from flwr.app import ConfigRecord

    cfg, grid, strategy = federation(tmp_path, strategy="fedprox", proximal_mu=0.25)
    from fedsafe.server.app import global_model_setup

    arrays, model_config, _ = global_model_setup(cfg)
    messages = list(strategy.configure_train(1, arrays, ConfigRecord({**cfg.train_config(), **model_config}), grid))
    config = messages[0].content["config"]
    assert config["proximal-mu"] == 0.25
    assert TrainRequest.from_config(config, run_id="r").proximal_mu == 0.25


def test_every_fedsafe_wrapper_speaks_the_one_wrapper_protocol():
    """The loop calls the wrapper hooks on every fedsafe link and probes for none: each wrapper must be a
    StrategyWrapper (the strikes wrapper too), and the chain's exclusions reach the loop through it."""
    from fedsafe.server.app import build_run_strategy
    from fedsafe.server.config import RunConfig
    from fedsafe.strategies.state import chain, excluded_nodes, find_link, hides_updates, wrappers
    from fedsafe.strategies.strikes import StrikesStrategy
    from fedsafe.strategies.wrapper import StrategyWrapper

    strategy = build_run_strategy(RunConfig(budget_aware=True, max_strikes=2, client_dp="fixed", num_partitions=3))
    names = [type(link).__name__ for link in chain(strategy)]
    assert names[:3] == ["BudgetAwareSelection", "StrikesStrategy", "ClientLevelDP"]
    assert [type(w).__name__ for w in wrappers(strategy)] == names[:3]
    assert all(isinstance(w, StrategyWrapper) for w in wrappers(strategy))
    strikes = find_link(strategy, StrikesStrategy)
    strikes.record_rejection(9, "NaN", 1)
    strikes.record_rejection(9, "NaN", 2)
    assert excluded_nodes(strategy) == {9} and not hides_updates(strategy)
    assert hides_updates(build_run_strategy(RunConfig(secagg=True, num_partitions=3)))
