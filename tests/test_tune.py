"""`fedsafe tune` (issue 12.2): the privacy cost it reports for a search is what the nodes' ledgers compose
to over every trial, equal to an accountant fed every trial's spend; the proxy path charges the private
ledgers for the one final run only."""

import numpy as np
import pytest
from opacus.accountants import RDPAccountant

from fedsafe.client.data import load_dataset
from fedsafe.client.ledger import audit_state_dir
from fedsafe.server.config import ConfigError, RunConfig
from fedsafe.simulations.run import SimulationOptions
from fedsafe.simulations.tune import TuneGrid, summary_lines, tune

NODES = 3
BASE = dict(model="mlp", dataset="breast-cancer", num_rounds=2, local_epochs=1, epsilon=1.0, seed=5)


def _accountant_epsilon(ledger, delta):
    """An Opacus accountant fed every run planned on this ledger: each round's (σ, q, steps), as planned."""
    accountant = RDPAccountant()
    for plan in ledger.state_dict()["runs"].values():
        accountant.history.append((plan["noise_multiplier"], plan["sample_rate"],
                                   plan["steps_per_round"] * plan["planned_rounds"]))
    return accountant.get_epsilon(delta)


def test_the_reported_cost_of_a_search_is_every_trial_composed_on_the_same_ledgers(tmp_path):
    base = RunConfig(**BASE, out_dir=str(tmp_path))
    lines = []
    report = tune(base, TuneGrid.parse(["lr=0.1,0.5"]), SimulationOptions(num_nodes=NODES), tmp_path,
                  progress=lines.append)
    assert len(report.trials) == 2 and all(t["status"] == "ran" for t in report.trials)
    assert report.best in ({"lr": 0.1}, {"lr": 0.5})
    audit = audit_state_dir(tmp_path / "ledgers")
    assert not audit.problems and len(audit.ledgers) == NODES
    for ledger in audit.ledgers:
        assert len(ledger.state_dict()["runs"]) == 2  # both trials charged this node's one ledger
        assert all(r["status"] == "spent" for r in ledger.state_dict()["rounds"])
        expected = _accountant_epsilon(ledger, base.delta)
        assert report.search_epsilon[ledger.data_key] == pytest.approx(expected, rel=1e-9)
        # Composed: more than one trial's grant, less than their sum.
        assert base.epsilon < expected < 2 * base.epsilon
    assert report.search_epsilon_max == max(report.search_epsilon.values())
    said = "\n".join(summary_lines(report))
    assert f"ε={report.search_epsilon_max:.3f}" in said and "every one of the 2 trials charged in full" in said
    assert (tmp_path / "tune.json").is_file()


def test_tuning_on_proxy_data_charges_the_private_ledgers_for_the_final_run_only(tmp_path):
    records = load_dataset("breast-cancer").train
    rng = np.random.default_rng(0)
    proxy = tmp_path / "proxy.npz"  # public stand-in data of the same shape
    np.savez(proxy, x=(records.x + rng.normal(0, 0.1, records.x.shape)).astype(np.float32), y=records.y)
    base = RunConfig(**BASE, out_dir=str(tmp_path / "out"))
    report = tune(base, TuneGrid.parse(["lr=0.1,0.5"]), SimulationOptions(num_nodes=NODES), tmp_path / "out",
                  proxy=str(proxy), progress=lambda _line: None)
    assert report.final is not None and report.final["status"] == "ran"
    assert report.charged_to_private == [report.final["out_dir"]]
    private = audit_state_dir(tmp_path / "out" / "ledgers")
    assert not private.problems and len(private.ledgers) == NODES
    for ledger in private.ledgers:
        assert len(ledger.state_dict()["runs"]) == 1  # the final run only
        assert report.search_epsilon[ledger.data_key] == pytest.approx(_accountant_epsilon(ledger, base.delta))
        assert report.search_epsilon[ledger.data_key] <= base.epsilon + 1e-9
        assert "records-" not in ledger.data_key  # the private data's ledgers, not the proxy's
    proxy_ledgers = audit_state_dir(tmp_path / "out" / "proxy-ledgers").ledgers
    assert proxy_ledgers and all(len(l.state_dict()["runs"]) == 2 for l in proxy_ledgers)
    assert "nothing to the private ones" in "\n".join(summary_lines(report))


@pytest.mark.parametrize("spec, problem", [
    (["colour=1,2"], "not a tunable setting"),
    (["lr=fast"], "lr='fast' is not a valid float"),
    (["lr"], "key=value"),
    ([], "at least one --tune"),
])
def test_a_bad_tune_grid_is_one_line_naming_it(spec, problem):
    with pytest.raises(ConfigError, match=problem):
        TuneGrid.parse(spec)
