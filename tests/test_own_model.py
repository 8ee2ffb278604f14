"""A user's own model: a factory in the user's package (``package.module:function``), a family an
installed package registers through the ``fedsafe.models`` entry points, the Opacus check (BatchNorm
named, or fixed where the run asks), and a node that lacks the code or does not allow it refusing
the round with a fixed code and one line.

The federations run in this process (tests/inprocess.py): the real round loop and node handler.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fedsafe.client.policy import NodePolicy, PolicyError
from fedsafe.models import DataSpec, UnknownModelError, UserModelError, build_model
from fedsafe.models.registry import model_family, model_names
from fedsafe.protocol import MODEL_UNAVAILABLE, REFUSALS
from fedsafe.server.config import ConfigError, RunConfig
from fedsafe.server.app import global_model_setup
from tests.inprocess import InProcessGrid, federate

pytestmark = pytest.mark.usefixtures("flower_task_identity")

USER_MODULE = """
    import torch
    from torch import nn

    def build_model(spec, options):
        width = int(options.get("width", 16))
        inputs = 1
        for d in spec.input_shape:
            inputs *= d
        return nn.Sequential(nn.Flatten(), nn.Linear(inputs, width), nn.ReLU(), nn.Linear(width, spec.num_classes))

    def build_batchnorm_model(spec):
        inputs = 1
        for d in spec.input_shape:
            inputs *= d
        return nn.Sequential(nn.Flatten(), nn.Linear(inputs, 8), nn.BatchNorm1d(8), nn.ReLU(),
                             nn.Linear(8, spec.num_classes))

    def not_a_model(spec, options):
        return "a string"

    PER_SAMPLE_CALLS = []  # how often DP-SGD asked this task for per-sample losses

    class MarginTask:
        # A multi-class hinge loss, where the built-in cross-entropy does not fit the user.

        def __init__(self, num_classes):
            self.num_classes = num_classes

        def targets(self, x, y):
            return y

        def per_sample_loss(self, outputs, targets):
            PER_SAMPLE_CALLS.append(len(targets))
            return nn.functional.multi_margin_loss(outputs, targets, reduction="none")

        def loss(self, outputs, targets):
            return nn.functional.multi_margin_loss(outputs, targets)

        def metrics(self, outputs, targets):
            return {"loss": float(self.loss(outputs, targets)),
                    "accuracy": float((outputs.argmax(1) == targets).float().mean()),
                    "margin_violations": float((self.per_sample_loss(outputs, targets) > 0).float().mean())}

    def build_task(num_classes):
        return MarginTask(num_classes)

    def build_half_task(num_classes):
        return object()
"""


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    """A package `hospital_models` with a module `nets`, importable as a user's own code is."""
    package = tmp_path / "userpkg" / "hospital_models"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(package.parent))
    yield "hospital_models.nets"
    for name in [m for m in sys.modules if m.startswith("hospital_models")]:
        del sys.modules[name]


SPEC = DataSpec((30,), 2)


def test_a_factory_reference_builds_the_users_model(user_package):
    model = build_model(f"{user_package}:build_model", SPEC, {"width": 5})
    assert model[1].out_features == 5 and model[3].out_features == 2
    with pytest.raises(ValueError, match="unknown option.*'depth'"):
        build_model(f"{user_package}:build_model", SPEC, {"depth": 2})
    with pytest.raises(ValueError, match="returned str, not a torch.nn.Module"):
        build_model(f"{user_package}:not_a_model", SPEC)


def test_a_missing_module_or_factory_is_named(user_package):
    with pytest.raises(UserModelError, match="module 'no_such_pkg' is not installed here"):
        model_family("no_such_pkg.nets:build_model")
    with pytest.raises(UserModelError, match="has no attribute 'build_it'"):
        model_family(f"{user_package}:build_it")
    with pytest.raises(ConfigError, match="module 'no_such_pkg' is not installed here"):
        RunConfig(model="no_such_pkg.nets:build_model")
    with pytest.raises(UnknownModelError, match="unknown model 'resnet9000'"):
        model_family("resnet9000")


def test_an_entry_point_registers_a_family_by_name(user_package, tmp_path, monkeypatch):
    """An installed package's metadata (a .dist-info with entry_points.txt) offers `hospital-mlp`."""
    site = tmp_path / "userpkg"
    dist = site / "hospital_models-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: hospital-models\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[fedsafe.models]\nhospital-mlp = {user_package}:build_model\n")
    assert "hospital-mlp" in model_names()
    assert build_model("hospital-mlp", SPEC)[3].out_features == 2
    cfg = RunConfig(model="hospital-mlp")  # a registered name: no module path in the run-config
    NodePolicy().check_model(cfg.model)  # and the operator installed it: no allow-models entry needed


def test_a_batchnorm_model_is_named_or_fixed_on_request(user_package, tmp_path):
    from fedsafe.server.app import global_model_setup

    model = f"{user_package}:build_batchnorm_model"
    cfg = dict(model=model, dataset="breast-cancer", out_dir=str(tmp_path / "run"))
    with pytest.raises(ConfigError, match=r"BatchNorm layer\(s\) 2 \(BatchNorm1d\).*fix_batchnorm=true"):
        global_model_setup(RunConfig(**cfg))
    fixed = build_model(model, SPEC, {"fix_batchnorm": True})
    assert isinstance(fixed[2], torch.nn.GroupNorm) and fixed[2].num_groups == 8  # gcd(32, 8), Opacus' rule
    from opacus.validators import ModuleValidator

    assert ModuleValidator.validate(fixed, strict=False) == []
    global_model_setup(RunConfig(**cfg, model_options="fix_batchnorm=true"))  # passes the Opacus check


def test_a_user_model_trains_under_dp_and_a_node_without_its_code_refuses(user_package, tmp_path, monkeypatch,
                                                                          capsys):
    """Three nodes train the user's model under DP-SGD (ε = 3); a fourth node, whose Python cannot
    import the module (its operator never installed it), refuses every round with a fixed code and a
    line naming the module; the run goes on without it."""
    model = f"{user_package}:build_model"
    package_dir = str(tmp_path / "userpkg")  # where the user_package fixture put it

    class GridWithOneNodeLackingTheCode(InProcessGrid):
        def send_and_receive(self, messages, timeout=None):
            lacking = [m for m in messages if m.metadata.dst_node_id == max(self.contexts)]
            rest = [m for m in messages if m not in lacking]
            replies = super().send_and_receive(rest, timeout)
            with monkeypatch.context() as without:
                for name in [m for m in sys.modules if m.startswith("hospital_models")]:
                    without.delitem(sys.modules, name)
                without.setattr(sys, "path", [p for p in sys.path if p != package_dir])
                replies += super().send_and_receive(lacking, timeout)
            return replies

    monkeypatch.setattr("tests.inprocess.InProcessGrid", GridWithOneNodeLackingTheCode)
    cfg, outcome, grid = federate(tmp_path, nodes=4, model=model, dataset="breast-cancer", num_rounds=2,
                                  model_options="width=16", epsilon=3.0)
    refused = [r for r in grid.replies if r.has_error()]
    assert len(refused) == cfg.num_rounds
    for reply in refused:  # a fixed code and category: the detail stays in the node's own output
        assert (reply.error.code, reply.error.reason) == (MODEL_UNAVAILABLE, REFUSALS[MODEL_UNAVAILABLE])
    assert "module 'hospital_models' is not installed here" in capsys.readouterr().err  # the operator's line
    rounds = outcome.history[1:]
    assert [r["replies"] for r in rounds] == [3, 3]
    assert 2.9 <= rounds[-1]["epsilon_max"] <= 3.0
    first, last = outcome.history[0]["eval"]["accuracy"], outcome.history[-1]["eval"]["accuracy"]
    assert last >= 0.8 and last > first, (first, last)


def test_a_node_imports_only_the_model_code_its_operator_allows(user_package):
    model = f"{user_package}:build_model"
    with pytest.raises(PolicyError, match="allow-models does not list it"):
        NodePolicy().check_model(model)
    with pytest.raises(PolicyError, match="allow-models"):  # a coordinator naming any importable callable
        NodePolicy(allow_models=("hospital_models",)).check_model("os:system")
    NodePolicy(allow_models=(model,)).check_model(model)
    NodePolicy(allow_models=("hospital_models",)).check_model(model)  # the whole package
    with pytest.raises(PolicyError):  # a package name is not a prefix of another's
        NodePolicy(allow_models=("hospital",)).check_model(model)
    policy = NodePolicy.from_node_config({"allow-models": f"{model}, other.pkg"})
    assert policy.allow_models == (model, "other.pkg")
    NodePolicy().check_model("mlp")


def test_a_users_task_trains_under_dp_and_judges_the_model(user_package, tmp_path):
    """--task package.module:factory: the nodes' DP-SGD clips the user's per-sample losses and the coordinator
    reports the user's metrics; a node imports the task only under allow-models, as a model."""
    import importlib

    task = f"{user_package}:build_task"
    cfg, outcome, _ = federate(tmp_path, nodes=3, model=f"{user_package}:build_model", task=task,
                               dataset="breast-cancer", num_rounds=2, epsilon=3.0, lr=0.2)
    assert importlib.import_module(user_package).PER_SAMPLE_CALLS  # the nodes trained on the user's loss
    rounds = outcome.history[1:]
    assert [r["replies"] for r in rounds] == [3, 3] and 2.9 <= rounds[-1]["epsilon_max"] <= 3.0
    first, last = outcome.history[0]["eval"], outcome.history[-1]["eval"]
    assert "margin_violations" in last and last["accuracy"] >= 0.8 and last["accuracy"] > first["accuracy"]
    with pytest.raises(PolicyError, match=f"import model or task code '{task}'; node-config allow-models"):
        NodePolicy(allow_models=(f"{user_package}:build_model",)).check_model(task)
    with pytest.raises(ConfigError, match="task 'no_such_pkg.losses:build_task': module 'no_such_pkg' is not installed"):
        RunConfig(task="no_such_pkg.losses:build_task")
    with pytest.raises(ConfigError, match="unknown task 'ranking'"):
        RunConfig(task="ranking")
    with pytest.raises(ConfigError, match="its object lacks targets, loss, per_sample_loss, metrics"):
        global_model_setup(RunConfig(task=f"{user_package}:build_half_task", out_dir=str(tmp_path / "half")))


def test_nodes_with_their_own_image_folders_train_a_user_model_and_one_lacking_its_code_refuses(
        user_package, tmp_path, monkeypatch, capsys):
    """Nodes set up as `fedsafe node` sets them up — the real ClientApp (its mods included), the policy from
    node-config: their own image folder (data-path), ledger (state-dir), ε cap and allow-models — train the
    user's model under DP-SGD; one node whose operator never installed the module refuses each round with
    4006 and a line naming the module, one whose allow-models omits it with 4002, and the run goes on."""
    from fedsafe.client.app import app
    from fedsafe.protocol import REQUEST_REFUSED
    from fedsafe.server.app import build_run_strategy
    from fedsafe.simulations.local import LocalGrid
    from tests.fed_harness import run
    from tests.test_image_folder import SCHEMA, image_folder

    model = f"{user_package}:build_model"
    package_dir = str(tmp_path / "userpkg")
    names = ("a", "b", "lacking", "unlisted")
    for seed, name in enumerate(names):
        image_folder(tmp_path / "sites" / name, per_class=40, seed=seed)
    held_out = image_folder(tmp_path / "held-out", per_class=40, seed=9)
    cfg = RunConfig(model=model, dataset="own", eval_path=str(held_out), num_rounds=2, local_epochs=1,
                    batch_size=16, lr=0.5, epsilon=3.0, min_nodes=4, out_dir=str(tmp_path / "run"))

    class NodesOnLoopback(LocalGrid):
        def send_and_receive(self, messages, *, timeout=None):
            lacking = [m for m in messages if m.metadata.dst_node_id == self.node_of["lacking"]]
            replies = super().send_and_receive([m for m in messages if m not in lacking], timeout=timeout)
            with monkeypatch.context() as without:  # this operator never installed the user's package
                for name in [m for m in sys.modules if m.startswith("hospital_models")]:
                    without.delitem(sys.modules, name)
                without.setattr(sys, "path", [p for p in sys.path if p != package_dir])
                replies += super().send_and_receive(lacking, timeout=timeout)
            return replies

    grid = NodesOnLoopback(app, len(names))
    grid.node_of = dict(zip(names, grid.contexts))
    for name, node in grid.node_of.items():
        grid.contexts[node].node_config = {
            "data-path": str(tmp_path / "sites" / name), "state-dir": str(tmp_path / "ledgers" / name),
            "max-epsilon": 10.0, "device": "cpu", "allow-models": "" if name == "unlisted" else "hospital_models"}
    outcome = run(cfg, grid, build_run_strategy(cfg))

    errors = {node: {r.error.code for r in grid.received if r.has_error() and r.metadata.src_node_id == node}
              for node in grid.contexts}
    assert errors[grid.node_of["lacking"]] == {MODEL_UNAVAILABLE}
    assert errors[grid.node_of["unlisted"]] == {REQUEST_REFUSED}
    assert not errors[grid.node_of["a"]] and not errors[grid.node_of["b"]]
    operator_lines = capsys.readouterr().err
    assert "module 'hospital_models' is not installed here" in operator_lines
    assert f"import model or task code '{model}'; node-config allow-models does not list it" in operator_lines
    rounds = outcome.history[1:]
    assert [r["replies"] for r in rounds] == [2, 2]
    assert 2.9 <= rounds[-1]["epsilon_max"] <= 3.0
    first, last = outcome.history[0]["eval"], outcome.history[-1]["eval"]
    assert last["accuracy"] >= 0.85 and last["loss"] < 0.8 * first["loss"], (first, last)
    assert (tmp_path / "ledgers" / "a").is_dir()  # each node kept its own ledger, where its operator said


def test_fedsafe_node_hands_allow_models_to_its_node_config(tmp_path):
    from fedsafe.cli import build_parser
    from fedsafe.deploy import NodeOptions, node_config

    args = build_parser().parse_args(["node", "--superlink", "127.0.0.1:8000", "--data-path", str(tmp_path),
                                      "--max-epsilon", "3", "--allow-models", "hospital_models, lab.nets:build"])
    values = node_config(NodeOptions(superlink=args.superlink, root_cert=None, key=None, data_path=tmp_path,
                                     state_dir=tmp_path, max_epsilon=3.0, delta=1e-5, allow_models=args.allow_models))
    policy = NodePolicy.from_node_config({k: v for k, v in values.items() if v is not None})
    assert policy.allow_models == ("hospital_models", "lab.nets:build")
    policy.check_model("hospital_models.nets:build_model")
    with pytest.raises(PolicyError, match="allow-models does not list it"):
        policy.check_model("os:system")
