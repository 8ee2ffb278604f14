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
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from tests.deploy_harness import (
    CONNECTION,
    REPO,
    Federation,
    flower_available,
    read,
    repo_app_hash,
    wait_for_text,
    write_node_data,
)

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
    """An uninterrupted 2-node run of RUN. The nodes' state before it is kept under before-reference/:
    seeded (test-only) noise is keyed on each release's place in its ledger, so that a second run on the
    same ledger never redraws a noise stream already charged (issue 10.6), and a run compared bit for bit
    with this one must start from the state this one started from."""
    out = fed.root / "reference"
    for name in ("a", "b"):
        _copy_node_state(fed.root / "ledgers" / name, fed.root / "before-reference" / name)
    status, output = fed.run({**RUN, "out-dir": str(out)}, timeout=RUN_TIMEOUT, name="reference")
    assert status == 0, output[-4000:]
    return out


def _copy_node_state(source: Path, target: Path) -> Path:
    """The node's ledgers, identity file, record hashes and replay cache (not Flower's app store under
    flwr/, which the running SuperNode owns), copied from `source` over `target`."""
    for entry in target.iterdir() if target.exists() else ():
        if entry.name != "flwr":
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    target.mkdir(parents=True, exist_ok=True)
    for entry in source.iterdir() if source.exists() else ():
        if entry.name != "flwr":
            (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, target / entry.name)
    return target


def test_two_node_run_completes_over_tls_with_node_auth(fed: Federation, reference: Path) -> None:
    rounds = _rounds(reference)
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]
    for r in rounds[1:]:
        assert r["aggregated"] and r["replies"] == 2 and r["failures"] == r["rejected"] == 0, r
        assert set(r["node_epsilon"]) == {str(fed.node_ids["a"]), str(fed.node_ids["b"])}
        assert r["node_names"] == {str(fed.node_ids["a"]): "a", str(fed.node_ids["b"]): "b"}  # as registered
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


def test_compressed_updates_over_real_processes_learn_and_the_card_carries_each_nodes_sigma_and_q(
        fed: Federation, reference: Path) -> None:
    """compress-updates through real SuperNodes and SuperLink: the nodes' 8-bit uploads decode, aggregate
    and learn, in fewer bytes than the reference run's; the coordinator, which never sees a ledger, writes
    each node's σ and q into the model card as the node reported them: its own ledger's."""
    from fedsafe.after.card import run_key_of

    out = fed.root / "compressed"
    status, output = fed.run({**RUN, "compress-updates": True, "out-dir": str(out)}, timeout=RUN_TIMEOUT,
                             name="compressed")
    assert status == 0, output[-4000:]
    rounds = _rounds(out)
    for r, plain in zip(rounds[1:], _rounds(reference)[1:]):
        assert r["aggregated"] and r["replies"] == 2 and r["failures"] == r["rejected"] == 0, r
        assert 0 < r["upload_bytes"] < plain["upload_bytes"] / 3, (r["upload_bytes"], plain["upload_bytes"])
    assert rounds[-1]["eval"]["accuracy"] >= 0.85 and _finite(_model(out))
    privacy = json.loads((out / "model_card.json").read_text())["privacy"]
    assert privacy["ledgers"] == []  # a deployed coordinator holds none
    run_key = run_key_of(out)
    for name in ("a", "b"):
        (ledger,) = [json.loads(p.read_text()) for p in (fed.root / "ledgers" / name).glob("*.json")]
        plan = ledger["runs"][run_key]
        reported = privacy["nodes_reported"][str(fed.node_ids[name])]
        assert (reported["noise_multiplier"], reported["sample_rate"]) == (plan["noise_multiplier"],
                                                                          plan["sample_rate"])


def test_an_app_package_one_byte_off_the_pinned_one_is_refused_by_every_node(fed: Federation) -> None:
    """The coordinator ships an app that differs from the one the nodes pinned (`--allow-app`) in one byte:
    no node installs or runs it, each says so on its console, and the coordinator gets their refusals at
    once (not a round timeout). The approved app runs: the `reference` run."""
    tampered = fed.root / "tampered-app"
    shutil.copytree(REPO, tampered, ignore=shutil.ignore_patterns(
        ".git", ".venv", "__pycache__", "*.egg-info", ".pytest_cache", "results"))
    source = bytearray((tampered / "client" / "app.py").read_bytes())
    at = source.index(b'"""') + 3  # the first letter of the module docstring: still valid Python
    source[at] ^= 0x20  # its case flipped: one byte
    (tampered / "client" / "app.py").write_bytes(bytes(source))
    from fedsafe.deploy import app_hash

    tampered_hash = app_hash(tampered)
    assert tampered_hash != repo_app_hash()
    ledgers = {n: {p: p.read_bytes() for p in (fed.root / "ledgers" / n).rglob("*") if p.is_file()} for n in ("a", "b")}
    starts = {n: len(read(fed.logs[n])) for n in ("a", "b")}
    out = fed.root / "tampered-run"
    began = time.monotonic()
    status, output = fed.run({**RUN, "num-rounds": 1, "round-timeout": 120.0, "out-dir": str(out)},
                             timeout=RUN_TIMEOUT, name="tampered", app=tampered)
    assert status == 0 and "fedsafe: run finished" in output, output[-4000:]
    assert time.monotonic() - began < 100  # the refusals came back at once, not after the 120 s round timeout
    (round1,) = _rounds(out)[1:]
    assert round1["replies"] == 0 and not round1["aggregated"]
    refusals = {p["node"]: p["reason"] for p in round1["problems"]}
    assert set(refusals) == {fed.node_ids["a"], fed.node_ids["b"]}, round1
    assert all("not approved by this node" in reason and tampered_hash in reason for reason in refusals.values())
    for name in ("a", "b"):
        log = read(fed.logs[name])[starts[name]:]
        assert f"REFUSED run" in log and f"(sha256 {tampered_hash}) is not one this node may run" in log, log[-3000:]
        assert "will spend" not in log  # nothing of the tampered app ran: no round was planned or trained
        after = {p: p.read_bytes() for p in (fed.root / "ledgers" / name).rglob("*") if p.is_file()}
        assert after == ledgers[name]  # not a byte of any ledger changed


def test_unregistered_node_is_refused_with_a_clear_error(fed: Federation) -> None:
    fed.make_keys("stranger")
    proc = fed.start_node("stranger", fed.data[2], extra=["--max-retries", "0", "--cold-start"])
    proc.wait(timeout=90)
    log = read(fed.logs["stranger"])
    assert proc.returncode == 3, log[-3000:]
    assert "its public key is not registered" in log and "flwr supernode register" in log
    assert "SHA256:" in log  # the fingerprint to read out to the coordinator
    # --max-retries 0: no waiting for a crashed session to expire, so the other possible cause is named too.
    assert "crashed less than a minute ago" in log and "did not admit this node (yet)" not in log

    # A node that does not trust the federation's CA: TLS verification fails, also named.
    from fedsafe import credentials as cr

    other_ca, _ = cr.make_ca(fed.root / "other-ca")
    fed.keys["wrong-ca"] = fed.keys["a"]  # a registered key, but the SuperLink is not verified
    proc = fed.start_node("wrong-ca", fed.data[0], root_cert=other_ca, extra=["--max-retries", "0", "--cold-start"])
    proc.wait(timeout=90)
    log = read(fed.logs["wrong-ca"])
    assert proc.returncode == 4 and "TLS verification of the SuperLink failed" in log, log[-3000:]


def test_coordinator_killed_mid_run_resumes_to_the_identical_model(fed: Federation, reference: Path) -> None:
    out = fed.root / "crashed"
    for name in ("a", "b"):  # the ledgers as the reference run found them: the same seeded noise streams
        _copy_node_state(fed.root / "before-reference" / name, fed.root / "ledgers" / name)
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
    """A node sending a NaN update, a misshapen one, one 1e6 off in every weight (issue 16.2: under the
    default update-norm bound) and one without the DP fields, as a node training without DP would
    (issue 16.1): each is rejected with the node's name and reason and struck; the node is then excluded,
    and the honest nodes' ε is reported all along. Results and the coordinator's log name the nodes as
    they were registered (issue 16.4)."""
    fed.register("poison")
    fed.start_node("poison", fed.data[2], extra=["--test-seed-noise", "--test-poison", "nan,shape,norm,no-dp"])
    node = fed.wait_connected("poison")
    fed.wait_warm("poison")
    out = fed.root / "poisoned"
    try:
        status, output = fed.run(
            {**RUN, "num-rounds": 5, "min-nodes": 3, "max-strikes": 4, "out-dir": str(out)},
            timeout=RUN_TIMEOUT + 90, name="poisoned")
    finally:
        fed.kill("poison")
        fed.flwr("supernode", "unregister", str(node), CONNECTION)
    assert status == 0, output[-4000:]
    rounds = _rounds(out)[1:]
    reasons = [[p["reason"] for p in r["problems"] if p["node"] == node] for r in rounds]
    assert "NaN" in reasons[0][0] and "shape" in reasons[1][0] and "exceeds the bound" in reasons[2][0], reasons
    assert "missing epsilon, delta, dp-steps, noise-multiplier" in reasons[3][0], reasons
    assert all("lower-median update norm" in r["update_norm_bound"]["source"] for r in rounds)  # the default bound
    assert [r["rejected"] for r in rounds] == [1, 1, 1, 1, 0]
    assert [r["sent"] for r in rounds] == [3, 3, 3, 3, 2]  # excluded after 4 rejected updates
    assert all(r["aggregated"] and r["replies"] == 2 for r in rounds)
    assert rounds[-1]["excluded"] == [node]
    honest = {str(fed.node_ids["a"]), str(fed.node_ids["b"])}
    assert all(set(r["node_epsilon"]) == honest and r["epsilon_max"] > 0 for r in rounds)  # never wiped
    assert _finite(_model(out)) and rounds[-1]["eval"]["accuracy"] >= 0.85
    # Names, as registered (`flwr supernode register … --name poison`), beside the ids.
    names = {str(fed.node_ids["a"]): "a", str(fed.node_ids["b"]): "b", str(node): "poison"}
    assert all(r["node_names"] == names for r in rounds), [r["node_names"] for r in rounds]
    assert all(p["node_name"] == "poison" for r in rounds for p in r["problems"])
    assert json.loads((out / "metrics.json").read_text())["summary"]["node_names"] == names
    assert "round 1: node poison update rejected (strike 1 of 4" in output, output[-4000:]
    assert "node poison excluded from sampling" in output and "1 rejected (poison)" in output
    assert f"node {node}" not in output  # no line calls it by its id


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


def test_a_node_restarted_seconds_after_a_crash_gets_back_in_and_trains_the_next_round(fed: Federation) -> None:
    """A node SIGKILLed while it trains round 1 and started again at once gets back in under the same node id
    and trains round 2. Its old session still counts as online on the SuperLink until two heartbeats are
    missed (up to 60 s); a restart that reaches the SuperLink before that is refused with the answer an
    unregistered key gets, and `fedsafe node` must then count down and try again rather than call the key
    unregistered and exit 3. (On a heavily loaded machine the restart may take longer than the old session
    lives; the countdown itself is also checked deterministically in tests/test_node_deploy.py.)"""
    fed.register("phoenix")
    fed.start_node("phoenix", fed.data[2], extra=["--test-seed-noise"])
    node = fed.wait_connected("phoenix")
    fed.wait_warm("phoenix")
    out = fed.root / "phoenix-run"
    superlink_log_start = len(read(fed.logs["superlink"]))
    try:
        # round-timeout: round 1 waits for the killed node's reply that long; the restarted node is back by then.
        run = fed.start_run({**RUN, "num-rounds": 2, "min-nodes": 3, "round-timeout": 150.0, "out-dir": str(out)},
                            name="phoenix-run")
        wait_for_text(fed.logs["phoenix"], r"fedsafe node: round 1: .*will spend", run, time.monotonic() + RUN_TIMEOUT)
        fed.kill("phoenix", signal.SIGKILL)  # SuperNode, SuperExec, zygote and the training ClientApp at once
        killed = time.monotonic()
        restarted = fed.start_node("phoenix", fed.data[2], extra=["--test-seed-noise"])
        assert fed.wait_connected("phoenix", timeout=180) == node  # the same key gets the same node id back
        back_in = time.monotonic() - killed
        run.wait(timeout=150 + RUN_TIMEOUT)
        log = read(fed.logs["phoenix"])  # the restarted node's console
        assert restarted.poll() is None, log[-3000:]  # still running: not sent away with exit 3
    finally:
        fed.kill("phoenix")
        fed.flwr("supernode", "unregister", str(node), CONNECTION)
    refused = read(fed.logs["superlink"])[superlink_log_start:].count("could not be activated")
    print(f"restarted node admitted {back_in:.1f} s after the SIGKILL, after {refused} refusal(s)")
    if refused:  # it reached the SuperLink while its old session was still online
        assert re.search(r"did not admit this node \(yet\).*trying again in 5 s \(\d+ s left", log), log[-3000:]
    assert "not registered" not in log and "error:" not in log
    output = read(fed.logs["phoenix-run"])
    assert run.returncode == 0 and "fedsafe: run finished after round 2 of 2" in output, output[-4000:]
    round1, round2 = _rounds(out)[1:]
    assert str(node) not in round1["node_epsilon"] and round1["aggregated"]  # killed while training it
    assert str(node) in round2["node_epsilon"] and round2["replies"] == 3, round2  # trained after the restart
    assert re.search(r"fedsafe node: round 2: .*will spend", log)


def _ledger_rounds(state_dir: Path) -> list[tuple[str, int]]:
    """(run, round) of every entry in a node's ledgers, as written on its disk."""
    return [(r["run"], r["round"]) for path in sorted(state_dir.glob("*.json"))
            for r in json.loads(path.read_text())["rounds"]]


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a))


def test_resume_with_real_noise_charges_each_round_once_and_repeats_the_sampling(tmp_path: Path) -> None:
    """What `resume=true` promises with real nodes (fresh DP noise, no test seeding): every round is charged
    once in every node's ledger, the same rounds run with the same sampled nodes as an uninterrupted run,
    and the final model differs from the uninterrupted one only as much as two uninterrupted runs differ
    from each other (DP noise and Poisson batches are fresh), never bit for bit."""
    names = ("p", "q", "r")
    run_config = {**RUN, "fraction-train": 0.67, "min-nodes": 3}  # 2 of the 3 nodes per round: sampling matters
    with Federation(tmp_path / "federation") as fed:
        data = write_node_data(tmp_path / "data", 3)
        fed.start_superlink()
        for name in names:
            fed.register(name)
        for name, path in zip(names, data):
            fed.start_node(name, path)  # real nodes: fresh noise every round
        for name in names:
            fed.wait_connected(name)
            fed.wait_warm(name)
        # The crashed and resumed run goes first, on empty ledgers: whatever they hold is its spend.
        out = tmp_path / "crashed"
        run = fed.start_run({**run_config, "out-dir": str(out)}, name="crashed")
        deadline = time.monotonic() + RUN_TIMEOUT
        while not any(re.search(r"fedsafe node: round 2: .*will spend", read(fed.logs[n])) for n in names):
            assert run.poll() is None and time.monotonic() < deadline, read(fed.logs["crashed"])[-3000:]
            time.sleep(0.2)
        fed.kill_superlink()  # mid round 2
        run.wait(timeout=60)
        fed.start_superlink()
        status, output = fed.run({**run_config, "out-dir": str(out), "resume": True}, RUN_TIMEOUT, name="resumed")
        assert status == 0 and "fedsafe: run finished after round 3 of 3" in output, output[-4000:]
        ledgers = {n: _ledger_rounds(fed.root / "ledgers" / n) for n in names}

        references = []
        for i in range(2):
            status, output = fed.run({**run_config, "out-dir": str(tmp_path / f"uninterrupted-{i}")}, RUN_TIMEOUT,
                                     name=f"uninterrupted-{i}")
            assert status == 0, output[-4000:]
            references.append(tmp_path / f"uninterrupted-{i}")

    resumed = _rounds(out)[1:]
    uninterrupted = _rounds(references[0])[1:]
    # The same rounds, each with the same sampled nodes (the coordinator's seeded sampling was restored).
    assert [r["round"] for r in resumed] == [r["round"] for r in uninterrupted] == [1, 2, 3]
    assert [sorted(r["node_epsilon"]) for r in resumed] == [sorted(r["node_epsilon"]) for r in uninterrupted]
    assert all(len(r["node_epsilon"]) == 2 and r["aggregated"] for r in resumed)
    # Every round charged once: a node's ledger holds one entry per round it was sampled for, no more.
    id_of = {str(fed.node_ids[n]): n for n in names}
    for name in names:
        trained = sorted(r["round"] for r in resumed if any(id_of[k] == name for k in r["node_epsilon"]))
        entries = ledgers[name]
        assert len({run for run, _ in entries}) <= 1, entries
        assert sorted(rnd for _, rnd in entries) == trained, (name, entries, trained)
    # Fresh noise: not the same model; but no further from an uninterrupted run than a second one is.
    final = _model(out)
    first, second = _model(references[0]), _model(references[1])
    assert _distance(final, first) > 0 and _distance(second, first) > 0
    assert _distance(final, first) < 3 * _distance(second, first), (_distance(final, first), _distance(second, first))
    for path in (out, *references):
        assert _rounds(path)[-1]["eval"]["accuracy"] >= 0.8
    print(f"|resumed − uninterrupted| = {_distance(final, first):.4f}, "
          f"|uninterrupted − uninterrupted| = {_distance(second, first):.4f}")
