"""The product's promise: the ε a node reports is true, persisted, and enforced before it is exceeded."""

import json
import shutil
from pathlib import Path
import subprocess
import sys

import pytest
from opacus.accountants import RDPAccountant

from fedsafe.client.app import BUDGET_EXHAUSTED, REQUEST_REFUSED, train_round
from fedsafe.client.data import PartitionScheme, load_partition
from fedsafe.client.ledger import BudgetExhausted, LedgerError, PrivacyLedger
from fedsafe.client.policy import NodePolicy, TrainRequest
from fedsafe.client.training import poisson_loader
from fedsafe.server.config import RunConfig
from tests.node_harness import node_context, train_message

CFG = RunConfig(num_rounds=4, model="mlp", dataset="breast-cancer", num_partitions=3, epsilon=2.0,
                local_epochs=2, batch_size=16, seed=3)


def _policy(tmp_path, **kw):
    return NodePolicy(state_dir=str(tmp_path / "ledgers"), seed_noise=True, **kw)


def _eps(reply):
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    return float(reply.content["metrics"]["epsilon"])


@pytest.mark.usefixtures("flower_task_identity")
def test_reported_epsilon_composes_every_step_of_every_round(tmp_path):
    policy = _policy(tmp_path)
    reported = [_eps(train_round(train_message(CFG, r), node_context(), policy)) for r in range(1, 5)]

    # Independently: the node's data, Opacus' own Poisson loader, and the σ the ledger fixed once.
    data = load_partition("breast-cancer", 0, PartitionScheme("iid", 3, seed=3))
    loader = poisson_loader(data, CFG.batch_size)
    steps_per_round = len(loader) * CFG.local_epochs
    request = TrainRequest.from_config(train_message(CFG, 1).content["config"], "flower-run-id")
    ledger = PrivacyLedger.open(policy.state_dir, policy.data_key(request, (0, 3)))
    sigma = ledger.run_plan("run-a").noise_multiplier
    for k, eps in enumerate(reported, start=1):
        accountant = RDPAccountant()
        for _ in range(k * steps_per_round):
            accountant.step(noise_multiplier=sigma, sample_rate=loader.sample_rate)
        assert eps == pytest.approx(accountant.get_epsilon(CFG.delta), rel=1e-9)
    assert reported == sorted(reported) and reported[0] < reported[-1] / 1.5
    # Calibrated once for rounds × epochs × the loader's real batches: the last round lands on target.
    assert CFG.epsilon - 0.02 <= reported[-1] <= CFG.epsilon


@pytest.mark.usefixtures("flower_task_identity")
def test_node_at_budget_refuses_the_next_round_and_spends_nothing(tmp_path, capsys):
    policy = _policy(tmp_path)
    for r in range(1, 5):
        last = _eps(train_round(train_message(CFG, r), node_context(), policy))
    ledger_files = list((tmp_path / "ledgers").glob("*.json"))
    before = ledger_files[0].read_text()

    reply = train_round(train_message(CFG, 5), node_context(), policy)
    assert reply.has_error() and reply.error.code == BUDGET_EXHAUSTED
    # The coordinator gets the fixed category; the node's operator gets the figures.
    assert reply.error.reason == "privacy budget exhausted"
    assert "ε=2 it was granted" in capsys.readouterr().err
    assert ledger_files[0].read_text() == before
    # A new run on the same data is bound by the node's lifetime cap over all runs.
    reply = train_round(train_message(CFG, 1, run_key="run-b"), node_context(), _policy(tmp_path, max_epsilon=last))
    assert reply.has_error() and reply.error.code == BUDGET_EXHAUSTED
    assert reply.error.reason == "privacy budget exhausted" and "node cap" in capsys.readouterr().err


@pytest.mark.usefixtures("flower_task_identity")
def test_coordinator_asking_more_than_the_node_cap_gets_the_cap(tmp_path):
    greedy = RunConfig(**{**CFG.__dict__, "epsilon": 50.0})
    policy = _policy(tmp_path, max_epsilon=1.0)
    reported = [_eps(train_round(train_message(greedy, r), node_context(), policy)) for r in range(1, 5)]
    assert 0.98 <= reported[-1] <= 1.0


@pytest.mark.usefixtures("flower_task_identity")
def test_non_private_request_is_refused_unless_the_operator_allows_it(tmp_path, capsys):
    plain = RunConfig(**{**CFG.__dict__, "dp": False})
    reply = train_round(train_message(plain, 1), node_context(), _policy(tmp_path))
    assert reply.has_error() and reply.error.code == REQUEST_REFUSED
    assert reply.error.reason == "refused by the node's policy"
    assert "without differential privacy" in capsys.readouterr().err
    reply = train_round(train_message(plain, 1), node_context(), _policy(tmp_path, allow_non_private=True))
    assert not reply.has_error() and "epsilon" not in reply.content["metrics"]


def test_ledger_survives_a_process_restart(tmp_path):
    ledger = PrivacyLedger.open(tmp_path, "hospital-a")
    ledger.plan_run("r1", sample_rate=0.1, steps_per_round=20, planned_rounds=3, run_epsilon=2.0,
                    max_epsilon=5.0, delta=1e-5)
    sigma = ledger.run_plan("r1").noise_multiplier
    ledger.reserve("r1", 1, (sigma, 0.1, 20), max_epsilon=5.0, delta=1e-5)
    ledger.settle("r1", 1, 20)
    expected = ledger.epsilon(1e-5)
    code = (
        "from fedsafe.client.ledger import PrivacyLedger; import sys; "
        "l = PrivacyLedger.open(sys.argv[1], 'hospital-a'); print(l.epsilon(1e-5), l.run_plan('r1').noise_multiplier)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
    eps, sigma_again = map(float, out.stdout.split())
    assert eps == pytest.approx(expected, rel=1e-12) and sigma_again == sigma and eps > 0


def test_spend_is_on_disk_before_training_so_a_crash_never_under_counts(tmp_path):
    ledger = PrivacyLedger.open(tmp_path, "bank-b")
    after = ledger.reserve("r1", 1, (1.0, 0.05, 100), max_epsilon=10.0, delta=1e-5)
    # The process dies here, mid-training: no settle, no reply.
    reopened = PrivacyLedger.open(tmp_path, "bank-b")
    assert reopened.epsilon(1e-5) == pytest.approx(after) and after > 0
    state = reopened.state_dict()
    assert state["accountant"]["mechanism"] == "rdp" and state["rounds"][0]["status"] == "reserved"
    # The file is an Opacus accountant state_dict: Opacus alone recomputes the same ε from it.
    accountant = RDPAccountant()
    accountant.load_state_dict({"history": [tuple(h) for h in state["accountant"]["history"]],
                                "mechanism": "rdp"})
    assert accountant.get_epsilon(1e-5) == pytest.approx(after, rel=1e-9)


def test_each_spend_is_written_durably_and_a_plan_read_back_is_not_rewritten(tmp_path, monkeypatch):
    import os

    from fedsafe.client import files

    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(files.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    ledger = PrivacyLedger.open(tmp_path, "k")
    plan = dict(sample_rate=0.1, steps_per_round=20, planned_rounds=3, run_epsilon=2.0, max_epsilon=5.0, delta=1e-5)
    sigma = ledger.plan_run("r1", **plan).noise_multiplier
    assert len(synced) >= 2  # the new plan (file and directory), and the identity file it creates
    synced.clear()
    inode = ledger.path.stat().st_ino
    assert ledger.plan_run("r1", **plan).noise_multiplier == sigma  # every round reads the plan back
    assert synced == [] and ledger.path.stat().st_ino == inode  # nothing changed, nothing rewritten
    ledger.reserve("r1", 1, (sigma, 0.1, 20), max_epsilon=5.0, delta=1e-5)
    assert len(synced) == 2 and ledger.path.stat().st_ino != inode  # the spend: on disk before training
    synced.clear()
    ledger.settle("r1", 1, 20)
    assert len(synced) == 1  # the settlement's file, whole; its rename need not survive a power cut
    assert [r["status"] for r in PrivacyLedger.open(tmp_path, "k").rounds_of("r1")] == ["spent"]


def test_a_settlement_lost_in_a_power_cut_leaves_the_round_charged_and_the_ledger_usable(tmp_path):
    ledger = PrivacyLedger.open(tmp_path, "k")
    plan = dict(sample_rate=0.1, steps_per_round=20, planned_rounds=3, run_epsilon=2.0, max_epsilon=5.0, delta=1e-5)
    sigma = ledger.plan_run("r1", **plan).noise_multiplier
    ledger.reserve("r1", 1, (sigma, 0.1, 20), max_epsilon=5.0, delta=1e-5)
    durable = ledger.path.read_bytes()  # what a power cut after the settlement can bring back
    charged = ledger.epsilon(1e-5)
    ledger.settle("r1", 1, 20)
    ledger.path.write_bytes(durable)  # the settlement's rename undone
    after_cut = PrivacyLedger.open(tmp_path, "k")
    assert after_cut.epsilon(1e-5) == charged > 0  # the round still counts, in full
    assert [r["status"] for r in after_cut.rounds_of("r1")] == ["reserved"]
    after_cut.plan_run("r1", **plan)
    after_cut.reserve("r1", 2, (sigma, 0.1, 20), max_epsilon=5.0, delta=1e-5)  # the run goes on
    assert after_cut.epsilon(1e-5) > charged


def test_refused_reservation_leaves_the_ledger_untouched(tmp_path):
    ledger = PrivacyLedger.open(tmp_path, "k")
    ledger.reserve("r1", 1, (0.8, 0.1, 100), max_epsilon=20.0, delta=1e-5)
    before = ledger.path.read_text()
    with pytest.raises(BudgetExhausted, match="over the node's cap"):
        ledger.reserve("r1", 2, (0.8, 0.1, 1000), max_epsilon=ledger.epsilon(1e-5) + 0.1, delta=1e-5)
    assert ledger.path.read_text() == before


def test_corrupt_ledger_is_an_error_not_a_fresh_budget(tmp_path):
    ledger = PrivacyLedger.open(tmp_path, "k")
    ledger.reserve("r1", 1, (1.0, 0.1, 10), max_epsilon=20.0, delta=1e-5)
    ledger.path.write_text(ledger.path.read_text()[:40])
    with pytest.raises(LedgerError, match="unreadable"):
        PrivacyLedger.open(tmp_path, "k")
    ledger.path.write_text(json.dumps({"version": 99, "data_key": "k"}))
    with pytest.raises(LedgerError, match="version"):
        PrivacyLedger.open(tmp_path, "k")


def test_the_sigma_search_computes_the_accountants_epsilon_bit_for_bit():
    """The search evaluates each σ's RDP curve only where the minimum can be; the ε it gets is Opacus'
    full-curve ε, the same float, with and without prior spend."""
    import numpy as np

    import fedsafe.client.accounting as acc

    rng = np.random.default_rng(7)
    for _ in range(12):
        spend = (float(np.exp(rng.uniform(np.log(0.4), np.log(20)))), float(rng.choice([1.0, rng.uniform(0.005, 0.5)])),
                 int(rng.integers(1, 2000)))
        prior = [(float(rng.uniform(0.6, 8)), float(rng.uniform(0.01, 1)), int(rng.integers(0, 300)))
                 for _ in range(int(rng.integers(0, 3)))]
        delta = float(10 ** rng.uniform(-8, -4))
        assert acc._rdp_epsilon_with(prior, spend, delta) == acc.epsilon([*prior, spend], delta)


@pytest.mark.parametrize("prior, rate, steps, target, delta", [
    ([], 0.2, 25, 3.0, 1e-5),  # the digits workload of benchmarks/vs_pfl.py: 10 nodes × 5 rounds
    ([], 0.125, 64, 2.5, 1e-5),
    ([(1.2, 0.1, 100)], 0.1, 100, 6.0, 1e-5),
])
def test_calibrated_sigma_is_the_plain_bisections_and_keeps_the_target(prior, rate, steps, target, delta):
    """The σ calibrate_noise returns is the one a bisection over the accountant's full ε returns (the
    search as it was before its evaluations were pruned): the same noise, the same ε, for every seed."""
    import math

    import fedsafe.client.accounting as acc

    def plain_bisection(tolerance=0.005):
        eps_at = lambda sigma: acc.epsilon([*prior, (sigma, rate, steps)], delta)  # noqa: E731
        low, high = 0.1, acc.MAX_NOISE_MULTIPLIER
        for _ in range(60):
            mid = math.sqrt(low * high)
            eps = eps_at(mid)
            if eps <= target:
                high = mid
                if target - eps <= tolerance:
                    break
            else:
                low = mid
        return high

    acc._calibrate.cache_clear()
    sigma = acc.calibrate_noise(prior, rate, steps, target, delta)
    assert sigma == plain_bisection()
    assert target - 0.005 <= acc.epsilon([*prior, (sigma, rate, steps)], delta) <= target


def test_calibration_is_cached_in_memory_and_on_the_nodes_disk(tmp_path):
    import fedsafe.client.accounting as acc

    acc._calibrate.cache_clear()
    acc.use_disk_cache(tmp_path / "accounting.json")
    try:
        sigma = acc.calibrate_noise([], 0.125, 64, 2.5, 1e-5)
        assert acc.calibrate_noise([], 0.125, 64, 2.5, 1e-5) == sigma
        assert acc._calibrate.cache_info().hits == 1  # the bisection ran once
        saved = json.loads((tmp_path / "accounting.json").read_text())
        assert list(saved["calibration"].values()) == [sigma]  # a fresh ClientApp process reads it back
        assert f"{sigma!r}|0.125" in saved["rdp"]
        acc._calibrate.cache_clear()
        acc.use_disk_cache(tmp_path / "accounting.json")
        assert acc.calibrate_noise([], 0.125, 64, 2.5, 1e-5) == sigma
    finally:
        acc.use_disk_cache(None)


PLAN = dict(sample_rate=0.1, steps_per_round=20, planned_rounds=4, run_epsilon=2.0, max_epsilon=5.0, delta=1e-5)


def _counting_audits(monkeypatch) -> list[int]:
    """Every full audit of a ledger file (hash chain, entries, views) appends to the list returned."""
    from fedsafe.client import ledger as ledger_module

    audits, real = [], ledger_module.audit_bytes
    monkeypatch.setattr(ledger_module, "audit_bytes", lambda *a, **k: (audits.append(1), real(*a, **k))[1])
    return audits


def test_a_transaction_re_audits_the_file_only_when_its_bytes_changed(tmp_path, monkeypatch):
    """A node-round (open, plan, reserve, settle) audits its ledger once; a write by another ledger object or
    another process, and a hand edit, between two transactions of one object are still seen or refused."""
    audits = _counting_audits(monkeypatch)
    first = PrivacyLedger.open(tmp_path, "k")
    sigma = first.plan_run("r1", **PLAN).noise_multiplier
    first.reserve("r1", 1, (sigma, 0.1, 20), max_epsilon=5.0, delta=1e-5)
    first.settle("r1", 1, 20)
    assert audits == []  # a new ledger: everything it holds, this object wrote
    ledger = PrivacyLedger.open(tmp_path, "k")
    ledger.plan_run("r1", **PLAN)
    ledger.reserve("r1", 2, (sigma, 0.1, 20), max_epsilon=5.0, delta=1e-5)
    ledger.settle("r1", 2, 20)
    assert len(audits) == 1  # the open; each transaction found the bytes it had read or written

    # Another object on the same file (what a second SuperNode process on this data would be), then another
    # process: each spend is seen by the first object's next transaction, and counted.
    PrivacyLedger.open(tmp_path, "k").reserve("r1", 3, (sigma, 0.1, 20), max_epsilon=5.0, delta=1e-5)
    code = ("from fedsafe.client.ledger import PrivacyLedger; import sys; PrivacyLedger.open(sys.argv[1], 'k')"
            ".reserve('r2', 1, (1.5, 0.1, 10), max_epsilon=5.0, delta=1e-5)")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True)
    ledger.settle("r1", 3, 20)
    assert ledger.history == [(sigma, 0.1, 20)] * 3 + [(1.5, 0.1, 10)]
    assert [r["status"] for r in PrivacyLedger.open(tmp_path, "k").rounds_of("r1")] == ["spent"] * 3
    accountant = RDPAccountant()
    accountant.history = [(sigma, 0.1, 60), (1.5, 0.1, 10)]
    assert ledger.epsilon(1e-5) == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)

    # A hand edit between two transactions of one object: refused, nothing written.
    state = json.loads(ledger.path.read_text())
    state["entries"][1]["spend"][2] = 1  # a reservation's steps cut to 1
    ledger.path.write_text(json.dumps(state, indent=1))
    edited = ledger.path.read_bytes()
    with pytest.raises(LedgerError, match="hash chain broken"):
        ledger.reserve("r1", 4, (sigma, 0.1, 20), max_epsilon=5.0, delta=1e-5)
    assert ledger.path.read_bytes() == edited


def test_a_replaced_identity_file_is_seen_between_transactions(tmp_path):
    from fedsafe.client.identity import IDENTITY_FILE

    ledger = PrivacyLedger.open(tmp_path, "k")
    sigma = ledger.plan_run("r1", **PLAN).noise_multiplier
    ledger.reserve("r1", 1, (sigma, 0.1, 20), max_epsilon=5.0, delta=1e-5)
    PrivacyLedger.open(tmp_path / "elsewhere", "other").reserve("r", 1, (1.0, 0.1, 5), max_epsilon=5.0, delta=1e-5)
    shutil.copy(tmp_path / "elsewhere" / IDENTITY_FILE, tmp_path / IDENTITY_FILE)  # another node's identity
    with pytest.raises(LedgerError, match="hash chain broken at entry 0"):
        ledger.settle("r1", 1, 20)


def test_a_runs_plan_and_first_reservation_are_one_durable_write(tmp_path, monkeypatch):
    """The gate plans and reserves in one transaction: on a run's first round the file is replaced once
    (file and directory synced) with both entries; a refused reservation still leaves a new plan recorded."""
    import os

    from fedsafe.client import files

    ledger = PrivacyLedger.open(tmp_path, "k")
    ledger.reserve("r0", 1, (1.0, 0.1, 10), max_epsilon=50.0, delta=1e-5)  # the identity file exists already
    synced, replaced = [], []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(files.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    monkeypatch.setattr(files.os, "replace", lambda a, b: (replaced.append(b), real_replace(a, b))[1])
    with ledger.transaction():
        sigma = ledger.plan_run("r1", **{**PLAN, "max_epsilon": 50.0}).noise_multiplier
        ledger.reserve("r1", 1, (sigma, 0.1, 20), max_epsilon=50.0, delta=1e-5, run_epsilon=2.0)
        assert replaced == [] and synced == []  # nothing written before the transaction ends
    assert replaced == [ledger.path] and len(synced) == 2
    reread = PrivacyLedger.open(tmp_path, "k")
    assert reread.run_plan("r1").noise_multiplier == sigma and len(reread.rounds_of("r1")) == 1

    with pytest.raises(BudgetExhausted), ledger.transaction():
        ledger.plan_run("r2", **{**PLAN, "max_epsilon": 50.0})
        ledger.reserve("r2", 1, (ledger.run_plan("r2").noise_multiplier, 0.1, 20), max_epsilon=0.01, delta=1e-5)
    reread = PrivacyLedger.open(tmp_path, "k")
    assert reread.run_plan("r2") is not None and reread.rounds_of("r2") == []  # the plan kept, no spend


def test_a_rounds_epsilons_are_the_accountants_however_often_asked(tmp_path):
    """ε figures a ledger object has composed once are kept for the same history: still Opacus' own."""
    ledger = PrivacyLedger.open(tmp_path, "k")
    sigma = ledger.plan_run("r1", **PLAN).noise_multiplier
    for rnd in (1, 2):
        after = ledger.reserve("r1", rnd, (sigma, 0.1, 20), max_epsilon=5.0, delta=1e-5, run_epsilon=2.0)
        accountant = RDPAccountant()
        accountant.history = [(sigma, 0.1, 20 * rnd)]
        assert after == ledger.epsilon(1e-5) == ledger.epsilon(1e-5) == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
        following = ledger.project("r1", (sigma, 0.1, 20), 1e-5)
        accountant.history = [(sigma, 0.1, 20 * (rnd + 1))]
        assert following[0] == following[1] == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
    with pytest.raises(ValueError, match="step count"):
        ledger.project("r1", (sigma, 0.1, 20.0), 1e-5)  # refused as the accountant refuses it, cached or not


@pytest.mark.usefixtures("flower_task_identity")
def test_a_node_round_writes_its_ledger_twice_and_audits_it_once(tmp_path, monkeypatch):
    """A run's first round on a node: the plan and the reservation in one durable write before training, the
    settlement in one more; the file audited once (its open), each transaction finding its own bytes."""
    import os

    from fedsafe.client import files

    audits, replaced = _counting_audits(monkeypatch), []
    real_replace = os.replace
    monkeypatch.setattr(files.os, "replace", lambda a, b: (replaced.append(Path(b)), real_replace(a, b))[1])
    policy = _policy(tmp_path)
    for rnd in (1, 2):
        replaced.clear(), audits.clear()
        _eps(train_round(train_message(CFG, rnd), node_context(), policy))
        ledger_writes = [p for p in replaced if p.parent == tmp_path / "ledgers" and p.suffix == ".json"]
        assert len(ledger_writes) == 2, ledger_writes  # reservation (with the plan on round 1), settlement
        assert len(audits) == (0 if rnd == 1 else 1)
    (path,) = (tmp_path / "ledgers").glob("*.json")
    assert [e["kind"] for e in json.loads(path.read_text())["entries"]] == ["plan", "reserve", "settle", "reserve", "settle"]
