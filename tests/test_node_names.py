"""Nodes by name (issue 16.4): results, log lines and the progress line name a node as the coordinator
registered it (a simulated node by its partition), the id kept beside the name in machine-readable
outputs; a name is shown only in safe characters, and a name two nodes share, or one of digits, never
passes for one node."""

from __future__ import annotations

import csv
import json
import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from flwr.proto.node_pb2 import NodeInfo

from fedsafe.server.loop import progress_line
from fedsafe.server.node_names import NodeNames, shown_name
from tests.test_coordinator_faults import FakeGrid, _config, _run, good, nan


@pytest.mark.parametrize("raw, shown", [
    ("hospital-a", "hospital-a"),
    ("  St. Mary's  ", "St._Mary_s"),
    ("a\nround 3: node b failed", "a_round_3__node_b_failed"),  # no forged log line
    ("x (id …123456)", "x__id__123456_"),  # cannot mimic another node's label
    ("n" * 100, "n" * 64),
    ("é€", None), ("", None), (None, None), (42, None),
])
def test_a_registered_name_is_shown_in_safe_characters_only(raw, shown):
    assert shown_name(raw) == shown


def test_a_shared_or_numeric_name_carries_the_end_of_the_id():
    names = NodeNames({11111111111111111111: "hospital-a", 22222222222222222222: "hospital-a",
                       33333333333333333333: "clinic", 44444444444444444444: "55555555555555555555"})
    assert names.label(11111111111111111111) == "hospital-a (id …111111)"
    assert names.label(22222222222222222222) == "hospital-a (id …222222)"
    assert names.label(33333333333333333333) == "clinic"
    assert names.label(44444444444444444444) == "55555555555555555555 (id …444444)"  # digits: not an id
    assert names.label(66666666666666666666) == "66666666666666666666"  # no name: its id
    assert names.of([33333333333333333333, 66666666666666666666]) == {"33333333333333333333": "clinic"}


@pytest.fixture()
def identity(flower_task_identity):
    yield


class RegisteredGrid(FakeGrid):
    """A grid whose nodes carry the names the coordinator registered them under, as Flower's does."""

    def __init__(self, nodes, names: dict[int, str]) -> None:
        super().__init__(nodes)
        self.names = names

    def get_nodes(self):
        return [NodeInfo(node_id=node, name=self.names.get(node, "")) for node in self.nodes]


def test_results_and_log_lines_name_nodes_by_their_registration(tmp_path, caplog, identity):
    grid = RegisteredGrid({1: good(), 2: good(), 3: nan(), 4: good()},
                          {1: "hospital-a", 2: "hospital-a", 3: "bank\nround 9: node hospital-a failed"})
    caplog.set_level(logging.INFO, logger="fedsafe.server")
    cfg = _config(tmp_path, num_rounds=3, min_nodes=4)
    outcome = _run(cfg, grid)

    document = json.loads((cfg.out_path / "metrics.json").read_text())
    first = document["rounds"][0]
    # Machine-readable: ids stay the keys; the names sit beside them.
    assert first["node_names"] == {"1": "hospital-a", "2": "hospital-a", "3": "bank_round_9__node_hospital-a_failed"}
    assert set(first["node_epsilon"]) == {"1", "2", "4"}
    assert first["problems"] == [{"node": 3, "node_name": "bank_round_9__node_hospital-a_failed",
                                  "reason": first["problems"][0]["reason"]}]
    assert document["summary"]["node_names"]["3"] == "bank_round_9__node_hospital-a_failed"
    with open(cfg.out_path / "node_epsilon.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {(r["node"], r["node_name"]) for r in rows} == {("1", "hospital-a"), ("2", "hospital-a"), ("4", "")}
    # Human-readable: the name, never a raw newline from it; the id's end where a name is shared.
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("round 1: node bank_round_9__node_hospital-a_failed update rejected") for line in lines)
    assert any(line.startswith("node bank_round_9__node_hospital-a_failed excluded from sampling") for line in lines)
    assert all("\n" not in line for line in lines)
    assert "| 0 failed, 1 rejected (bank_round_9__node_hospital-a_failed) |" in progress_line(first, cfg)
    assert outcome.history[-1]["excluded"] == [3]


def test_nodes_with_a_shared_name_are_told_apart_in_the_log(tmp_path, caplog, identity):
    grid = RegisteredGrid({1: nan(), 2: good()}, {1: "hospital-a", 2: "hospital-a"})
    caplog.set_level(logging.WARNING, logger="fedsafe.server")
    _run(_config(tmp_path, num_rounds=1), grid)
    assert any("node hospital-a (id …1) update rejected" in r.getMessage() for r in caplog.records)


def test_simulated_nodes_are_named_after_their_partition(tmp_path, caplog):
    """In-process federation (the real ClientApp): node-<partition> in the results, the log and progress."""
    from fed_harness import federation, run

    cfg, grid, strategy = federation(tmp_path, nodes=3, num_rounds=1, max_strikes=1)
    nodes = sorted(grid.get_node_ids())
    bad = nodes[0]
    app = grid.client_app

    def client(message, context):  # partition 0 sends NaN
        reply = app(message, context)
        if context.node_id == bad:
            reply.content["arrays"] = ArrayRecord({k: Array.from_numpy_ndarray(np.full_like(v.numpy(), np.nan))
                                                   for k, v in reply.content["arrays"].items()})
        return reply

    grid.client_app = client
    caplog.set_level(logging.WARNING, logger="fedsafe.server")
    lines = []
    run(cfg, grid, strategy, progress=lambda record, c: lines.append(progress_line(record, c)))
    record = json.loads((cfg.out_path / "metrics.json").read_text())["rounds"][-1]
    assert record["node_names"] == {str(n): f"node-{i}" for i, n in enumerate(nodes)}
    assert record["problems"][0]["node_name"] == "node-0"
    assert any(r.getMessage().startswith("node node-0 excluded from sampling") for r in caplog.records)
    assert "1 rejected (node-0)" in lines[-1]
    # The model card's per-node table names them too.
    card = json.loads((cfg.out_path / "model_card.json").read_text())["privacy"]["nodes_reported"]
    assert {node: entry["name"] for node, entry in card.items()} == {str(nodes[1]): "node-1", str(nodes[2]): "node-2"}
    assert f"| node-1 ({nodes[1]}) |" in (cfg.out_path / "MODEL_CARD.md").read_text()


def test_the_simulation_engine_names_its_virtual_nodes():
    """Flower's simulation registers virtual nodes without names; fedsafe names them as partitions."""
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.superlink.federation import NoOpFederationManager

    from fedsafe.flower.simulation import named_virtual_nodes

    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    with named_virtual_nodes():
        mapping = vce_api._register_nodes(num_nodes=3, state_factory=factory)
    names = NodeNames()
    names.learn(type("Grid", (), {"get_nodes": lambda self: factory.state().get_node_info(node_ids=list(mapping))})())
    assert {names.name(node) for node in mapping} == {"node-0", "node-1", "node-2"}
    assert all(names.name(node) == f"node-{partition}" for node, partition in mapping.items())
