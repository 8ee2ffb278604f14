"""The ledger cannot be reset, moved or mis-settled (issue 10 items 3-5): hand edits, damage and deletion are
refused with the file named — by the node's round (an error reply, no update), by `fedsafe ledger` and by
`fedsafe ledger verify`; the ledger key follows the records, not the file; a round is settled from what the
DP optimizer did."""

from __future__ import annotations

import contextlib
import csv
import json
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest

from fedsafe.cli import main
from fedsafe.client.app import train_round
from fedsafe.client.data import PartitionScheme, load_partition
from fedsafe.client.identity import IDENTITY_FILE
from fedsafe.client.ledger import LedgerError, PrivacyLedger, SettlementMismatch, audit_state_dir
from fedsafe.client.policy import NodePolicy
from fedsafe.server.config import RunConfig
from tests.node_harness import node_context, train_message

CFG = RunConfig(num_rounds=3, model="mlp", dataset="breast-cancer", num_partitions=3, epsilon=2.0,
                local_epochs=1, batch_size=16, seed=3)


def _policy(state_dir: Path, **kw) -> NodePolicy:
    return NodePolicy(state_dir=str(state_dir), seed_noise=True, **kw)


def _ok(reply):
    assert not reply.has_error(), reply.error.reason
    return reply


def _ledger_files(state_dir: Path) -> list[Path]:
    return sorted(state_dir.glob("*.json"))


@contextlib.contextmanager
def _deadline(seconds: int):
    """Fail, rather than hang the suite, if the block runs longer than `seconds` (a NaN σ used to spin)."""
    def expired(*_):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory) -> Path:
    """A state dir whose simulated node 0 has trained round 1 of run-a (real handler, real ledger)."""
    from fedsafe.flower.task_identity import task_identity

    state_dir = tmp_path_factory.mktemp("trained") / "ledgers"
    with task_identity(run_id=7):
        _ok(train_round(train_message(CFG, 1), node_context(), _policy(state_dir)))
    return state_dir


@pytest.fixture()
def state_dir(trained_once, tmp_path) -> Path:
    copy = tmp_path / "ledgers"
    shutil.copytree(trained_once, copy)
    return copy


def _edit_views(edit):
    def apply(path: Path) -> None:
        state = json.loads(path.read_text())
        edit(state)
        path.write_text(json.dumps(state))
    return apply


def _edit_everywhere(old: str, new: str):
    """A hand edit of every copy of a figure: entries and views alike (the chain then breaks)."""
    def apply(path: Path) -> None:
        text = path.read_text()
        assert old in text
        path.write_text(text.replace(old, new))
    return apply


def _sigma(path: Path) -> float:
    return json.loads(path.read_text())["accountant"]["history"][0][0]


def _steps(path: Path) -> int:
    return json.loads(path.read_text())["accountant"]["history"][0][2]


def _set_spend_everywhere(index: int, value):
    def apply(path: Path) -> None:
        state = json.loads(path.read_text())
        state["accountant"]["history"][0][index] = value
        for entry in state["entries"]:
            if entry["kind"] == "reserve":
                entry["spend"][index] = value
            if entry["kind"] == "settle":
                entry["actual"][0][index] = value
            if entry["kind"] == "plan":
                entry[("noise_multiplier", "sample_rate", "steps_per_round")[index]] = value
        path.write_text(json.dumps(state))
    return apply


TAMPERING = {
    "steps set to 0 in the accountant": (_edit_views(lambda s: s["accountant"]["history"][0].__setitem__(2, 0)),
                                         "accountant"),
    "steps set to 0 everywhere": (_set_spend_everywhere(2, 0), "hash chain broken"),
    "history emptied": (_edit_views(lambda s: s["accountant"].__setitem__("history", [])), "accountant"),
    "entries and views emptied": (_edit_views(lambda s: s.update(entries=[], rounds=[], runs={},
                                                                 accountant={"mechanism": "rdp", "history": []})),
                                  "no entry log"),
    "σ raised in the views": (_edit_views(lambda s: (s["accountant"]["history"][0].__setitem__(0, 50.0),
                                                     next(iter(s["runs"].values())).__setitem__("noise_multiplier", 50.0))),
                              "differs"),
    "σ raised everywhere": (_set_spend_everywhere(0, 50.0), "hash chain broken"),
    "negative steps": (_set_spend_everywhere(2, -1000), "hash chain broken"),
    "negative steps in the accountant": (_edit_views(lambda s: s["accountant"]["history"][0].__setitem__(2, -1000)),
                                         "accountant"),
    "NaN σ": (lambda p: p.write_text(p.read_text().replace(repr(_sigma(p)), "NaN")), "NaN"),
    "garbage bytes": (lambda p: p.write_bytes(b"\x00\xff\xfegarbage"), "not a ledger"),
    "null": (lambda p: p.write_text("null"), "not a ledger"),
    "[]": (lambda p: p.write_text("[]"), "not a ledger"),
    "missing accountant": (_edit_views(lambda s: s.pop("accountant")), "lacks its 'accountant' field"),
    "entry removed from the chain": (_edit_views(lambda s: s["entries"].pop(1)), "hash chain broken at entry 1"),
    "entry edited": (_edit_views(lambda s: s["entries"][1].__setitem__("round", 7)), "hash chain broken at entry 1"),
}


@pytest.mark.usefixtures("flower_task_identity")
@pytest.mark.parametrize("tamper", list(TAMPERING))
def test_a_tampered_ledger_refuses_the_round_and_every_command_names_the_problem(state_dir, tamper, capsys):
    edit, problem = TAMPERING[tamper]
    [ledger_file] = _ledger_files(state_dir)
    edit(ledger_file)
    damaged = ledger_file.read_bytes()

    with _deadline(60):  # a NaN σ used to spin forever here
        reply = train_round(train_message(CFG, 2), node_context(), _policy(state_dir))
    assert reply.has_error() and not reply.has_content()  # no update leaves the node
    err = capsys.readouterr().err
    assert ledger_file.name in err and problem in err, err
    assert ledger_file.read_bytes() == damaged  # refused, not repaired or overwritten

    for argv in (["ledger", "verify", "--state-dir", str(state_dir)], ["ledger", "--state-dir", str(state_dir)]):
        with _deadline(60):
            assert main(argv) == 1
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert lines and all(line.startswith(f"fedsafe: ledger problem: {ledger_file}") for line in lines), err
        assert problem in err and "Traceback" not in err


def test_the_accountant_is_derived_from_the_chain_and_ε_is_opacus(trained_once):
    from opacus.accountants import RDPAccountant

    [path] = _ledger_files(trained_once)
    state = json.loads(path.read_text())
    assert [e["kind"] for e in state["entries"]] == ["plan", "reserve", "settle"]
    assert all(e["prev"] == p["hash"] for p, e in zip(state["entries"], state["entries"][1:]))
    plan = state["entries"][0]
    assert state["accountant"]["history"] == [[plan["noise_multiplier"], plan["sample_rate"], plan["steps_per_round"]]]
    accountant = RDPAccountant()
    accountant.load_state_dict({"history": [tuple(h) for h in state["accountant"]["history"]], "mechanism": "rdp"})
    ledger = PrivacyLedger.open(trained_once, state["data_key"])
    assert ledger.epsilon(1e-5) == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-12)
    assert ledger.epsilon(1e-5) > 0
    assert main(["ledger", "verify", "--state-dir", str(trained_once)]) == 0


@pytest.mark.usefixtures("flower_task_identity")
def test_a_deleted_ledger_is_refused_until_the_operator_knowingly_forgets_it(state_dir, capsys):
    [ledger_file] = _ledger_files(state_dir)
    key = json.loads(ledger_file.read_text())["data_key"]
    ledger_file.unlink()

    reply = train_round(train_message(CFG, 2), node_context(), _policy(state_dir))
    assert reply.has_error() and not reply.has_content()
    err = capsys.readouterr().err
    assert ledger_file.name in err and "missing" in err and "fedsafe ledger forget" in err
    assert not ledger_file.exists()
    assert main(["ledger", "verify", "--state-dir", str(state_dir)]) == 1
    assert f"{ledger_file}: missing" in capsys.readouterr().err

    # The escape is explicit and recorded; afterwards the data starts a new ledger.
    assert main(["ledger", "forget", "--state-dir", str(state_dir), "--data-key", key]) == 0
    assert "starts a new privacy budget at zero" in capsys.readouterr().err
    events = [json.loads(line) for line in (state_dir / IDENTITY_FILE).read_text().splitlines()]
    assert events[-1]["forgot"] == key and events[-1]["by"]
    _ok(train_round(train_message(CFG, 1, run_key="run-b"), node_context(), _policy(state_dir)))
    assert main(["ledger", "verify", "--state-dir", str(state_dir)]) == 0


def test_a_deleted_identity_file_or_a_ledger_from_elsewhere_is_refused(state_dir, tmp_path):
    [ledger_file] = _ledger_files(state_dir)
    key = json.loads(ledger_file.read_text())["data_key"]
    # Another node's state dir: same key, its own identity; the copied ledger does not chain from it.
    elsewhere = tmp_path / "other-node"
    PrivacyLedger.open(elsewhere, "unrelated").reserve("r", 1, (1.0, 0.1, 5), max_epsilon=9.0, delta=1e-5)
    shutil.copy(ledger_file, elsewhere / ledger_file.name)
    with pytest.raises(LedgerError, match="hash chain broken at entry 0"):
        PrivacyLedger.open(elsewhere, key)
    (state_dir / IDENTITY_FILE).unlink()
    with pytest.raises(LedgerError, match="no node identity file"):
        PrivacyLedger.open(state_dir, key)


def test_fedsafe_node_refuses_a_nan_ledger_quickly(tmp_path, capsys):
    data = tmp_path / "data.npz"
    np.savez(data, x=np.random.default_rng(0).normal(size=(40, 30)).astype(np.float32), y=np.arange(40) % 2)
    policy = NodePolicy(data_path=str(data), state_dir=str(tmp_path / "ledgers"))
    ledger = PrivacyLedger.open(policy.state_dir, policy.data_key(None))
    ledger.reserve("r", 1, (1.25, 0.1, 20), max_epsilon=9.0, delta=1e-5)
    ledger.path.write_text(ledger.path.read_text().replace("1.25", "NaN"))
    argv = ["node", "--superlink", "127.0.0.1:8000", "--insecure", "--allow-app", "a" * 64, "--data-path", str(data),
            "--state-dir", policy.state_dir, "--max-epsilon", "3"]
    with _deadline(60):
        assert main(argv) == 2
    err = capsys.readouterr().err
    assert ledger.path.name in err and "NaN" in err and "Traceback" not in err


# ---- item 4: the key follows the records ----------------------------------------------------------------
def _write_csv(path: Path, x: np.ndarray, y: np.ndarray, fmt: str, order: np.ndarray) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*(f"f{i}" for i in range(x.shape[1])), "label"])
        for i in order:
            writer.writerow([*(format(float(v), fmt) for v in x[i]), int(y[i])])


@pytest.mark.usefixtures("flower_task_identity")
def test_a_copied_and_reformatted_data_file_is_charged_to_the_same_ledger(tmp_path):
    part = load_partition("breast-cancer", 0, PartitionScheme("iid", 3, seed=3))
    original, copy = tmp_path / "site" / "records.csv", tmp_path / "elsewhere" / "copy.csv"
    original.parent.mkdir(), copy.parent.mkdir()
    _write_csv(original, part.x, part.y, ".9g", np.arange(len(part)))
    # Another name and directory, every number written differently, the rows in another order.
    _write_csv(copy, part.x, part.y, ".12e", np.random.default_rng(1).permutation(len(part)))
    state_dir = tmp_path / "ledgers"

    first = _ok(train_round(train_message(CFG, 1), node_context(), _policy(state_dir, data_path=str(original))))
    second = _ok(train_round(train_message(CFG, 1, run_key="run-b"), node_context(),
                             _policy(state_dir, data_path=str(copy))))
    [ledger_file] = _ledger_files(state_dir)
    assert len(json.loads(ledger_file.read_text())["accountant"]["history"]) == 2
    assert float(second.content["metrics"]["epsilon"]) > float(first.content["metrics"]["epsilon"])


@pytest.mark.usefixtures("flower_task_identity")
def test_data_sharing_records_with_a_trained_file_is_refused_until_charged_to_its_ledger(tmp_path, capsys):
    part = load_partition("breast-cancer", 0, PartitionScheme("iid", 3, seed=3))
    original, grown = tmp_path / "records.csv", tmp_path / "records-plus-one.csv"
    _write_csv(original, part.x, part.y, ".9g", np.arange(len(part)))
    extra = part.x[:1] + 0.5
    _write_csv(grown, np.concatenate([part.x, extra]), np.concatenate([part.y, part.y[:1]]), ".9g",
               np.arange(len(part) + 1))
    state_dir = tmp_path / "ledgers"
    _ok(train_round(train_message(CFG, 1), node_context(), _policy(state_dir, data_path=str(original))))
    [ledger_file] = _ledger_files(state_dir)
    key = json.loads(ledger_file.read_text())["data_key"]

    # One row added to a copy, or the same file under a new dataset id: not a fresh budget.
    for policy in (_policy(state_dir, data_path=str(grown)),
                   _policy(state_dir, data_path=str(original), dataset_id="renamed")):
        reply = train_round(train_message(CFG, 1, run_key="run-b"), node_context(), policy)
        assert reply.has_error() and not reply.has_content()
        err = capsys.readouterr().err
        assert f"{len(part)} of the" in err and key in err and ledger_file.name in err
        assert _ledger_files(state_dir) == [ledger_file]
    # The operator charges the grown data to the ledger its records already spend.
    _ok(train_round(train_message(CFG, 1, run_key="run-b"), node_context(),
                    _policy(state_dir, data_path=str(grown), dataset_id=key)))
    assert _ledger_files(state_dir) == [ledger_file]
    assert len(json.loads(ledger_file.read_text())["accountant"]["history"]) == 2


@pytest.mark.usefixtures("flower_task_identity")
def test_a_run_naming_a_data_file_is_honoured_only_by_a_simulated_node(tmp_path, capsys):
    part = load_partition("breast-cancer", 1, PartitionScheme("iid", 3, seed=3))
    secret = tmp_path / "secret.csv"
    _write_csv(secret, part.x, part.y, ".9g", np.arange(len(part)))
    cfg = RunConfig(**{**CFG.__dict__, "dataset": str(secret)})
    deployed = train_round(train_message(cfg, 1), node_context(), _policy(tmp_path / "a"))  # partition-id set
    assert deployed.has_error() and not deployed.has_content()
    assert "only a simulated node loads the file a run names" in capsys.readouterr().err
    assert not _ledger_files(tmp_path / "a")
    _ok(train_round(train_message(cfg, 1), node_context(), _policy(tmp_path / "b", simulated=True)))
    # node-config cannot make a node simulated: only the simulation driver's code can.
    with pytest.raises(Exception, match="unknown node-config keys"):
        NodePolicy.from_node_config({"simulated": True})


@pytest.mark.usefixtures("flower_task_identity")
def test_a_new_simulation_seed_on_the_same_records_charges_the_same_ledger(state_dir):
    [ledger_file] = _ledger_files(state_dir)
    before = json.loads(ledger_file.read_text())["accountant"]["history"]
    reseeded = RunConfig(**{**CFG.__dict__, "seed": 4})
    _ok(train_round(train_message(reseeded, 1, run_key="run-b"), node_context(), _policy(state_dir)))
    assert _ledger_files(state_dir) == [ledger_file]
    assert len(json.loads(ledger_file.read_text())["accountant"]["history"]) == len(before) + 1


# ---- item 5: settled from what the optimizer did ---------------------------------------------------------
def _training_that(change):
    """fedsafe.client.training.train, run with `change`d settings (what a bug or a tampered stack would do)."""
    import dataclasses

    from fedsafe.client import training

    real = training.train

    def patched(model, task, data, settings, *args, **kwargs):
        return real(model, task, data, dataclasses.replace(settings, **change(settings)), *args, **kwargs)
    return patched


@pytest.mark.usefixtures("flower_task_identity")
@pytest.mark.parametrize("change", [
    pytest.param(lambda s: {"noise_multiplier": s.noise_multiplier / 2}, id="half the noise"),
    pytest.param(lambda s: {"local_epochs": s.local_epochs + 1}, id="more steps"),
    pytest.param(lambda s: {"batch_size": s.batch_size * 2}, id="another sample rate, fewer steps"),
])
def test_training_that_differs_from_the_reservation_sends_no_update(state_dir, monkeypatch, change, capsys):
    from fedsafe.client import training

    monkeypatch.setattr(training, "train", _training_that(change))
    reply = train_round(train_message(CFG, 2), node_context(), _policy(state_dir))
    assert reply.has_error() and not reply.has_content()
    assert "the update is withheld" in capsys.readouterr().err
    [ledger_file] = _ledger_files(state_dir)
    state = json.loads(ledger_file.read_text())
    assert state["entries"][-1]["kind"] == "settle" and state["entries"][-1]["outcome"] == "withheld"
    assert len(state["accountant"]["history"]) == 2  # the reservation stays charged
    assert not audit_state_dir(state_dir).problems


def test_settlement_compares_every_figure(tmp_path):
    ledger = PrivacyLedger.open(tmp_path, "k")
    ledger.reserve("r", 1, (1.5, 0.1, 20), max_epsilon=9.0, delta=1e-5)
    with pytest.raises(SettlementMismatch, match="reserved 20 steps"):
        ledger.settle("r", 1, [(1.5, 0.1, 19)])
    ledger.reserve("r", 2, (1.5, 0.1, 20), max_epsilon=9.0, delta=1e-5)
    ledger.settle("r", 2, [(1.5, 0.1, 20)])
    assert [r["status"] for r in PrivacyLedger.open(tmp_path, "k").rounds_of("r")] == ["withheld", "spent"]


def test_a_state_dir_that_cannot_be_written_refuses_cleanly(tmp_path):
    state_dir = tmp_path / "ledgers"
    state_dir.write_text("a file where the state directory should be")
    with pytest.raises(LedgerError, match="cannot be written"):
        PrivacyLedger.open(state_dir, "k").reserve("r", 1, (1.0, 0.1, 5), max_epsilon=9.0, delta=1e-5)


def test_a_runs_token_is_stable_within_the_run_and_unique_across_runs_and_nodes(tmp_path):
    def planned(state_dir, run):
        ledger = PrivacyLedger.open(state_dir, "same-records")
        ledger.plan_run(run, sample_rate=0.1, steps_per_round=10, planned_rounds=2, run_epsilon=2.0,
                        max_epsilon=5.0, delta=1e-5)
        return ledger

    ledger = planned(tmp_path / "node-a", "r1")
    token = ledger.run_token("r1")
    ledger.reserve("r1", 1, ledger.run_plan("r1").round_spend(), max_epsilon=5.0, delta=1e-5)
    assert PrivacyLedger.open(tmp_path / "node-a", "same-records").run_token("r1") == token
    assert planned(tmp_path / "node-a", "r2").run_token("r2") not in (None, token)
    assert planned(tmp_path / "node-b", "r1").run_token("r1") != token  # another node, same key and run


def test_fedsafe_node_refuses_to_start_beside_any_damaged_ledger(tmp_path, capsys):
    data = tmp_path / "data.npz"
    np.savez(data, x=np.random.default_rng(0).normal(size=(40, 30)).astype(np.float32), y=np.arange(40) % 2)
    state_dir = tmp_path / "ledgers"
    PrivacyLedger.open(state_dir, "another-dataset").reserve("r", 1, (1.0, 0.1, 5), max_epsilon=9.0, delta=1e-5)
    old = state_dir / "file__srv_data.npz-0123456789ab.json"  # what an older fedsafe wrote
    old.write_text(json.dumps({"version": 1, "data_key": "file:/srv/data.npz", "accountant": {"history": []}}))
    argv = ["node", "--superlink", "127.0.0.1:8000", "--insecure", "--allow-app", "a" * 64, "--data-path", str(data),
            "--state-dir", str(state_dir), "--max-epsilon", "3"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{old}: has version 1" in err and "refusing to start" in err and err.count("\n") == 1


@pytest.mark.usefixtures("flower_task_identity")
def test_a_damaged_identity_file_refuses_the_round_and_is_named_by_verify(state_dir, capsys):
    identity = state_dir / IDENTITY_FILE
    identity.write_text(identity.read_text() + "{not json\n")
    reply = train_round(train_message(CFG, 2), node_context(), _policy(state_dir))
    assert reply.has_error() and not reply.has_content()
    assert f"{identity}: line 3 is not JSON" in capsys.readouterr().err
    assert main(["ledger", "verify", "--state-dir", str(state_dir)]) == 1
    err = capsys.readouterr().err
    assert f"fedsafe: ledger problem: {identity}: line 3 is not JSON" in err and "Traceback" not in err
