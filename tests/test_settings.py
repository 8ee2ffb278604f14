"""One declaration of the run settings (fedsafe.settings): the coordinator's RunConfig, the CLI, pyproject's
defaults, the train message and the node's parsing of it all follow it, and a node refuses what it does
not know or is not sent rather than fill in a default of its own."""

import functools
import math
from dataclasses import replace
import tomllib
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from fedsafe import protocol
from fedsafe.cli import build_parser, _run_config
from fedsafe.client.app import REQUEST_REFUSED, train_round
from fedsafe.client.policy import NodePolicy, PolicyError, TrainRequest
from fedsafe.client.training import TrainSettings
from fedsafe.server.config import ConfigError, RunConfig
from fedsafe.settings import NODE_SETTINGS, RUN_SETTINGS, Setting, SettingError, sent_keys
from fedsafe.server.app import build_run_strategy, global_model_setup
from fedsafe.server.loop import run_rounds
from tests.inprocess import InProcessGrid
from tests.node_harness import node_context, train_message

ROOT = Path(__file__).resolve().parents[1]
# Every sent setting away from its default, so a node that fell back on a default would be caught.
CUSTOM = RunConfig(num_rounds=4, model="mlp", dataset="breast-cancer", num_partitions=3, seed=7, local_epochs=2,
                   batch_size=16, optimizer="adam", lr=0.05, momentum=0.0, weight_decay=0.01, l1=0.001,
                   epsilon=2.5, delta=2e-5, max_grad_norm=0.7, accountant="prv", alpha=0.3,
                   partitioner="dirichlet", classes_per_node=3, model_options="hidden=16", strategy="fedprox",
                   proximal_mu=0.1)


pytestmark = pytest.mark.usefixtures("flower_task_identity")


@functools.cache
def _message_config(cfg: RunConfig) -> tuple:
    return tuple(train_message(cfg, 1).content["config"].items())


def _config(cfg: RunConfig = CUSTOM) -> dict:
    """The config of the train message the coordinator sends for `cfg` (the round loop's own keys)."""
    return dict(_message_config(cfg))


def test_pyproject_app_config_is_the_schema():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    app_config = pyproject["tool"]["flwr"]["app"]["config"]
    declared = {s.key: s.default for s in RUN_SETTINGS}
    assert sorted(app_config) == sorted(declared)
    for key, default in declared.items():
        assert app_config[key] == default and type(app_config[key]) is type(default), key
    RunConfig.from_mapping(app_config)  # and Flower's run config parses as-is


def test_run_config_is_derived_from_the_schema():
    defaults = RunConfig()
    assert [s.name for s in RUN_SETTINGS] == [f for f in defaults.__dataclass_fields__ if f != "picked"]
    # the declared defaults, and for the pickable ones what fedsafe picks for the default run (local DP, ε=3, mlp)
    picked = dict(defaults.picked)
    assert sorted(picked) == sorted(s.name for s in RUN_SETTINGS if s.pickable)
    assert all(getattr(defaults, s.name) == picked.get(s.name, s.default) for s in RUN_SETTINGS)
    assert (defaults.lr, defaults.local_epochs, defaults.batch_size, defaults.num_rounds) == (1.0, 1, 256, 20)
    with pytest.raises(ConfigError, match=r"unknown run-config keys \['learning-rate'\]"):
        RunConfig.from_mapping({"learning-rate": 0.1})
    with pytest.raises(ConfigError, match=r"local-epochs=2.5 is not a valid int"):
        RunConfig.from_mapping({"local-epochs": 2.5})
    with pytest.raises(ConfigError, match=r"lr must be > 0; got -1.0"):
        RunConfig.from_mapping({"lr": "-1"})


def test_node_reads_exactly_what_the_coordinator_sent():
    for cfg in (RunConfig(), CUSTOM):
        request = TrainRequest.from_config(_config(cfg), "flower-run")
        for setting in RUN_SETTINGS:
            if setting.sent:
                assert getattr(request, setting.name) == getattr(cfg, setting.name), setting.key
        settings = TrainSettings.of(request)
        for name in ("local_epochs", "batch_size", "optimizer", "lr", "momentum", "weight_decay",
                     "max_grad_norm", "proximal_mu", "l1", "augment"):
            assert getattr(settings, name) == getattr(cfg, name), name
    # What the message carries is the schema's sent settings and the protocol's envelope, nothing else.
    assert set(_config()) == set(sent_keys()) | set(protocol.MESSAGE_KEYS)
    # TrainSettings' own defaults are the coordinator's for a run with its rounds set (they were lr 0.1 and
    # 1 epoch); without rounds the coordinator picks by budget (fedsafe.picked_defaults), and sends them.
    fixed = RunConfig(num_rounds=5)
    assert (TrainSettings().lr, TrainSettings().local_epochs, TrainSettings().batch_size, TrainSettings().lr_schedule) \
        == (fixed.lr, fixed.local_epochs, fixed.batch_size, fixed.lr_schedule)


class RecordingGrid(InProcessGrid):
    """The in-process federation's grid, keeping every message the coordinator sent."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.sent: list[Message] = []

    def send_and_receive(self, messages, timeout=None):
        self.sent += messages
        return super().send_and_receive(messages, timeout)


def test_the_round_loops_message_gives_the_node_the_coordinators_values(tmp_path):
    """The real round loop and strategy chain build the message (FedProx adds its μ); the real node handler
    trains on it."""
    cfg = replace(CUSTOM, num_rounds=1, num_partitions=3, min_nodes=3, out_dir=str(tmp_path / "run"),
                  accountant="rdp")  # (PRV's accounting takes minutes; the parsing tests above send prv)
    grid = RecordingGrid(3, NodePolicy(state_dir=str(tmp_path / "ledgers"), max_epsilon=cfg.epsilon, seed_noise=True))
    initial, model_config, _ = global_model_setup(cfg)
    outcome = run_rounds(grid, cfg, build_run_strategy(cfg), initial, model_config, None, progress=None)
    assert outcome.history[-1]["replies"] == 3, outcome.history[-1]["problems"]
    assert len(grid.sent) == 3
    for message in grid.sent:
        request = TrainRequest.from_config(message.content["config"], "flower-run")
        assert {s.key: getattr(request, s.name) for s in RUN_SETTINGS if s.sent} == {
            key: value for key, value in cfg.to_mapping().items() if key in sent_keys()}
        assert request.server_round == 1 and request.run_id != "flower-run"  # the coordinator's run key


@pytest.mark.parametrize("key", [*sent_keys(), protocol.SERVER_ROUND, protocol.INPUT_SHAPE, protocol.NUM_CLASSES,
                                 protocol.TASK])
def test_node_refuses_a_request_that_lacks_a_key_and_names_it(key):
    config = _config()
    del config[key]
    with pytest.raises(PolicyError, match=rf"train request lacks keys \['{key}'\]"):
        TrainRequest.from_config(config, "flower-run")


def test_node_refuses_an_unknown_key_and_names_it():
    with pytest.raises(PolicyError, match=r"unknown keys \['learning-rate'\]"):
        TrainRequest.from_config({**_config(), "learning-rate": 0.1}, "flower-run")


@pytest.mark.parametrize("key, value, message", [
    ("lr", "fast", "lr='fast' is not a valid float"),
    ("lr", -0.1, "lr must be > 0; got -0.1"),
    ("lr", math.nan, "lr must be > 0; got nan"),
    ("local-epochs", 1.5, "local-epochs=1.5 is not a valid int"),
    ("local-epochs", 0, "local-epochs must be >= 1; got 0"),
    ("dp", "maybe", "dp='maybe' is not a valid bool"),
    ("epsilon", 0.0, "epsilon must be > 0; got 0.0"),
    ("delta", 1.0, "delta must be in (0, 1); got 1.0"),
    ("server-round", 0, "server-round must be an integer >= 1; got 0"),
    ("input-shape", "30", "input-shape='30' is not a list of sizes"),
    ("num-classes", True, "num-classes must be an integer >= 0; got True"),
])
def test_node_refuses_a_bad_value_and_names_its_key(key, value, message):
    with pytest.raises(PolicyError) as caught:
        TrainRequest.from_config({**_config(), key: value}, "flower-run")
    assert message in str(caught.value)


def test_refused_request_is_an_error_reply_naming_the_key_and_spends_nothing(tmp_path):
    policy = NodePolicy(state_dir=str(tmp_path / "ledgers"), seed_noise=True)
    unknown = {**_config(), "learning-rate": 0.1}
    missing = {k: v for k, v in _config().items() if k != "lr"}
    for config, named in ((unknown, "'learning-rate'"), (missing, "'lr'")):
        message = Message(RecordDict({"arrays": train_message(CUSTOM, 1).content["arrays"],
                                      "config": ConfigRecord(config)}), dst_node_id=1, message_type="train")
        reply = train_round(message, node_context(), policy)
        assert reply.has_error() and reply.error.code == REQUEST_REFUSED
        assert named in reply.error.reason
    assert not list(tmp_path.glob("ledgers/*.json"))  # no ledger opened, nothing charged


def _actions(command: str) -> dict:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return {a.dest: a for a in sub.choices[command]._actions}


@pytest.mark.parametrize("command", ["simulate", "sweep"])
def test_cli_flags_are_the_schema(command):
    actions = _actions(command)
    for setting in RUN_SETTINGS:
        if setting.flag is None or (command == "sweep" and (setting.key == "dp" or not setting.in_sweep)):
            assert setting.name not in actions or setting.name == "dp", setting.key
            continue
        action = actions[setting.name]
        assert action.option_strings == ["--" + (setting.flag or setting.key)]
        listed = command == "sweep" and setting.listable
        assert action.default == (str(setting.default) if listed else setting.default), setting.key
        assert setting.help in action.help


def test_cli_defaults_make_the_schema_defaults():
    args = build_parser().parse_args(["simulate"])
    assert _run_config(args, out_dir=RunConfig().out_dir) == RunConfig()
    args = build_parser().parse_args(["sweep", "--epsilon", "1,inf", "--model", "mlp,cnn", "--alpha", "0.1,1"])
    base = _run_config(args, listed=True, model="mlp", strategy="fedavg")
    assert (base.epsilon, base.alpha, base.dp) == (RunConfig().epsilon, RunConfig().alpha, True)


def test_cli_values_reach_the_run_config():
    args = build_parser().parse_args(["simulate", "--lr", "0.05", "--local-epochs", "2", "--no-dp", "--fraction",
                                      "0.5", "--rounds", "7", "--client-dp", "fixed", "--secagg-shares", "0.5"])
    cfg = _run_config(args)
    assert (cfg.lr, cfg.local_epochs, cfg.dp, cfg.fraction_train, cfg.num_rounds, cfg.client_dp,
            cfg.secagg_shares) == (0.05, 2, False, 0.5, 7, "fixed", 0.5)


def test_node_config_is_its_own_table():
    policy = NodePolicy.from_node_config({})
    declared = {s.key: s.default for s in NODE_SETTINGS}
    assert (policy.max_epsilon, policy.delta, policy.state_dir, policy.device) == (
        declared["max-epsilon"], declared["delta"], declared["state-dir"], declared["device"])
    with pytest.raises(PolicyError, match=r"unknown node-config keys \['max-epsilom'\]"):
        NodePolicy.from_node_config({"max-epsilom": 1.0})
    with pytest.raises(PolicyError, match="max-epsilon must be > 0; got -1.0"):
        NodePolicy.from_node_config({"max-epsilon": -1.0})
    with pytest.raises(PolicyError, match="allow-non-private='yes please' is not a valid bool"):
        NodePolicy.from_node_config({"allow-non-private": "yes please"})
    # Run settings and node policy do not mix: a run cannot set a node's cap, nor a node the run's lr.
    assert "max-epsilon" not in sent_keys()
    with pytest.raises(PolicyError, match=r"unknown node-config keys \['lr'\]"):
        NodePolicy.from_node_config({"lr": 0.1})


@pytest.mark.parametrize("bounds, inside, outside", [
    ("> 0", [1e-9, 5], [0, -1, math.nan]),
    (">= 1", [1, 2], [0.999]),
    ("(0, 1]", [1, 0.5], [0, 1.01]),
    ("[0, 1)", [0, 0.99], [1, -0.01]),
])
def test_bounds(bounds, inside, outside):
    setting = Setting("x", 1.0, "", bounds=bounds)
    for value in inside:
        setting.check(value)
    for value in outside:
        with pytest.raises(SettingError, match="x must be"):
            setting.check(value)


def test_protocol_constants_have_one_home():
    import fedsafe.client.app as node_app
    import fedsafe.server.loop as loop
    import fedsafe.strategies.budget_aware as budget_aware

    for module in (node_app, loop, budget_aware):
        assert module.BUDGET_EXHAUSTED is protocol.BUDGET_EXHAUSTED == 4001
    for path in ("client/app.py", "server/loop.py", "strategies/budget_aware.py"):
        assert "4001" not in (ROOT / path).read_text(), path
