"""The deployment path with real processes on 127.0.0.1: `fedsafe superlink`, `fedsafe node`, `flwr run`.

One federation (a SuperLink with TLS and SuperNode authentication, nodes `a` and `b` holding halves of
breast-cancer's training split) serves the module; each test leaves it with the SuperLink up and `a`,
`b` connected. Every process is killed at the end (tests/deploy_harness.py); every wait is bounded.
Nodes run with the test-only `--test-seed-noise`, so two runs with the same seeds train the same model.
"""

from __future__ import annotations

import json
import math
import re
import signal
import time
from pathlib import Path

import pytest
import torch

from tests.deploy_harness import CONNECTION, Federation, flower_available, read, wait_for_text, write_node_data

pytestmark = [
    pytest.mark.deploy,
    pytest.mark.skipif(not flower_available(), reason="Flower binaries not next to this interpreter, or no /proc"),
]

RUN = {"num-rounds": 3, "local-epochs": 1, "min-nodes": 2, "seed": 7}
RUN_TIMEOUT = 240  # seconds for one `flwr run` of a few rounds, on 2 busy cores


def _model(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)["model_state"]


def _rounds(out: Path) -> list[dict]:
    return json.loads((out / "metrics.json").read_text())["rounds"]


def _finite(model: dict[str, torch.Tensor]) -> bool:
    return all(torch.isfinite(v).all() for v in model.values())


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("federation")
    federation = Federation(root)
    try:
        federation.data = write_node_data(root / "data", 3)
        federation.start_superlink()
        for name in ("a", "b"):
            federation.register(name)
        for i, name in enumerate(("a", "b")):
            federation.start_node(name, federation.data[i], extra=["--test-seed-noise"])
        for name in ("a", "b"):
            assert federation.wait_connected(name) == federation.node_ids[name]
            federation.wait_warm(name)
        yield federation
    finally:
        federation.close()


@pytest.fixture(scope="module")
def reference(fed: Federation) -> Path:
    """An uninterrupted 2-node run of RUN."""
    out = fed.root / "reference"
    status, output = fed.run({**RUN, "out-dir": str(out)}, timeout=RUN_TIMEOUT, name="reference")
    assert status == 0, output[-4000:]
    return out


def test_two_node_run_completes_over_tls_with_node_auth(fed: Federation, reference: Path) -> None:
    rounds = _rounds(reference)
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]
    for r in rounds[1:]:
        assert r["aggregated"] and r["replies"] == 2 and r["failures"] == r["rejected"] == 0, r
        assert set(r["node_epsilon"]) == {str(fed.node_ids["a"]), str(fed.node_ids["b"])}
    assert 2.9 <= rounds[-1]["epsilon_max"] <= 3.0  # the run's ε=3 grant, composed over all rounds
    assert rounds[-1]["eval"]["accuracy"] >= 0.85
    assert _finite(_model(reference))
    # Each node said what it would spend, in its own output, before training.
    for name in ("a", "b"):
        assert len(re.findall(r"fedsafe node: round \d: .* will spend ε", read(fed.logs[name]))) >= 3
    # Each node's ledger on its own disk holds the spend (3 rounds of DP-SGD).
    for name in ("a", "b"):
        ledgers = list((fed.root / "ledgers" / name).glob("*.json"))
        assert len(ledgers) == 1 and len(json.loads(ledgers[0].read_text())["rounds"]) >= 3


def test_unregistered_node_is_refused_with_a_clear_error(fed: Federation) -> None:
    fed.make_keys("stranger")
    proc = fed.start_node("stranger", fed.data[2], extra=["--max-retries", "0", "--cold-start"])
    proc.wait(timeout=90)
    log = read(fed.logs["stranger"])
    assert proc.returncode == 3, log[-3000:]
    assert "its public key is not registered" in log and "flwr supernode register" in log
    assert "SHA256:" in log  # the fingerprint to read out to the coordinator

    # A node that does not trust the federation's CA: TLS verification fails, also named.
    from fedsafe import credentials as cr

    other_ca, _ = cr.make_ca(fed.root / "other-ca")
    fed.keys["wrong-ca"] = fed.keys["a"]  # a registered key, but the SuperLink is not verified
    proc = fed.start_node("wrong-ca", fed.data[0], root_cert=other_ca, extra=["--max-retries", "0", "--cold-start"])
    proc.wait(timeout=90)
    log = read(fed.logs["wrong-ca"])
    assert proc.returncode == 3 and "TLS verification of the SuperLink failed" in log, log[-3000:]


def test_coordinator_killed_mid_run_resumes_to_the_identical_model(fed: Federation, reference: Path) -> None:
    out = fed.root / "crashed"
    start = len(read(fed.logs["a"]))
    run = fed.start_run({**RUN, "out-dir": str(out)}, name="crashed")
    # Mid-round: node a is training round 2 (round 1 is checkpointed).
    wait_for_text(fed.logs["a"], r"fedsafe node: round 2: .*will spend", run, time.monotonic() + RUN_TIMEOUT, start)
    ledgers = {n: sorted((fed.root / "ledgers" / n).glob("*.json")) for n in ("a", "b")}
    fed.kill_superlink()  # SuperLink, its SuperExec and the ServerApp: SIGKILL, all at once
    run.wait(timeout=60)
    assert run.returncode != 0
    assert json.loads((out / "metrics.json").read_text())["rounds"][-1]["round"] == 1

    fed.start_superlink()  # same database: registered nodes are known; the nodes reconnect by themselves
    # Forgetting resume=true does not overwrite the checkpoint: the run stops at once and says why.
    status, output = fed.run({**RUN, "out-dir": str(out)}, timeout=RUN_TIMEOUT, name="forgot-resume")
    assert "fedsafe: run FAILED:" in output and "continue that run with resume=true" in output, output[-3000:]
    status, output = fed.run({**RUN, "out-dir": str(out), "resume": True}, timeout=RUN_TIMEOUT, name="resumed")
    assert status == 0, output[-4000:]
    assert "resuming run" in output and "fedsafe: run finished after round 3 of 3" in output

    rounds = _rounds(out)
    assert [r["round"] for r in rounds] == [0, 1, 2, 3] and all(r["aggregated"] for r in rounds[1:])
    resumed, uninterrupted = _model(out), _model(reference)
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed), "resumed run ended elsewhere"
    # The nodes' ledgers survived the crash untouched (files still there, nothing reset), and the round the
    # crash interrupted was answered from the node's replay cache rather than trained and charged twice.
    for name in ("a", "b"):
        assert sorted((fed.root / "ledgers" / name).glob("*.json")) == ledgers[name]
    assert "re-sent by the coordinator" in read(fed.logs["a"])[start:]


def test_poisoned_updates_are_rejected_and_the_node_excluded(fed: Federation) -> None:
    fed.register("poison")
    fed.start_node("poison", fed.data[2], extra=["--test-seed-noise", "--test-poison", "nan,shape,norm"])
    node = fed.wait_connected("poison")
    fed.wait_warm("poison")
    out = fed.root / "poisoned"
    try:
        status, output = fed.run(
            {**RUN, "num-rounds": 4, "min-nodes": 3, "max-strikes": 3, "max-update-norm": 1000.0,
             "out-dir": str(out)}, timeout=RUN_TIMEOUT + 60, name="poisoned")
    finally:
        fed.kill("poison")
        fed.flwr("supernode", "unregister", str(node), CONNECTION)
    assert status == 0, output[-4000:]
    rounds = _rounds(out)[1:]
    reasons = [[p["reason"] for p in r["problems"] if p["node"] == node] for r in rounds]
    assert "NaN" in reasons[0][0] and "shape" in reasons[1][0] and "norm" in reasons[2][0], reasons
    assert [r["rejected"] for r in rounds] == [1, 1, 1, 0]
    assert [r["sent"] for r in rounds] == [3, 3, 3, 2]  # excluded after 3 rejected updates in a row
    assert all(r["aggregated"] and r["replies"] == 2 for r in rounds)
    assert rounds[-1]["excluded"] == [node]
    assert _finite(_model(out)) and rounds[-1]["eval"]["accuracy"] >= 0.85
    assert f"node {node} excluded from sampling" in output


def test_node_killed_mid_round_does_not_stop_the_run(fed: Federation) -> None:
    fed.register("fragile")
    start = 0
    fed.start_node("fragile", fed.data[2], extra=["--test-seed-noise"])
    node = fed.wait_connected("fragile")
    fed.wait_warm("fragile")
    out = fed.root / "node-died"
    try:
        run = fed.start_run({**RUN, "num-rounds": 2, "min-nodes": 3, "round-timeout": 30.0, "out-dir": str(out)},
                            name="node-died")
        wait_for_text(fed.logs["fragile"], r"fedsafe node: round 2: .*will spend", run,
                      time.monotonic() + RUN_TIMEOUT, start)
        fed.kill("fragile", signal.SIGKILL)  # mid-round: its ClientApp is training
        run.wait(timeout=RUN_TIMEOUT)
    finally:
        fed.flwr("supernode", "unregister", str(node), CONNECTION)
    output = read(fed.logs["node-died"])
    assert run.returncode == 0, output[-4000:]
    rounds = _rounds(out)[1:]
    assert [r["replies"] for r in rounds] == [3, 2] and all(r["aggregated"] for r in rounds)
    assert [p["node"] for p in rounds[1]["problems"]] == [node]
    assert _finite(_model(out)) and not math.isnan(rounds[-1]["eval"]["loss"])
