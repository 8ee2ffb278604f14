"""End-to-end federations on Flower's simulation engine (Ray), with DP on the nodes."""

import json

import pytest
import torch

from fedsafe.client.data import load_dataset
from fedsafe.client.ledger import PrivacyLedger
from fedsafe.client.training import TrainSettings, train
from fedsafe.models import build_model, evaluate, task_for
from fedsafe.server.config import RunConfig
from fedsafe.simulations.run import SimulationOptions, simulate

pytestmark = pytest.mark.slow


def _run(tmp_path, **overrides):
    cfg = RunConfig(**{"num_rounds": 3, "out_dir": str(tmp_path / "run"), **overrides})
    return cfg, simulate(cfg, SimulationOptions(num_nodes=3), progress=None)


def test_breast_cancer_with_dp_reaches_090_at_epsilon_3_and_reports_the_ledgers_epsilon(tmp_path):
    cfg, outcome = _run(tmp_path, model="mlp", dataset="breast-cancer", epsilon=3.0)
    final = outcome.history[-1]
    assert final["eval"]["accuracy"] >= 0.90
    assert final["replies"] == 3 and final["budget_refusals"] == 0
    assert 2.9 <= final["epsilon_max"] <= 3.0

    # What the server reported per node is what each node's own ledger on disk says.
    ledgers = sorted((tmp_path / "run" / "ledgers").glob("*.json"))
    on_disk = sorted(PrivacyLedger.open(p.parent, json.loads(p.read_text())["data_key"]).epsilon(cfg.delta)
                     for p in ledgers)
    assert len(ledgers) == 3
    assert on_disk == pytest.approx(sorted(final["node_epsilon"].values()), rel=1e-9)

    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [r["round"] for r in written["rounds"]] == [0, 1, 2, 3]
    csv_lines = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert csv_lines[0].startswith("round,accuracy") and len(csv_lines) == 5
    assert (tmp_path / "run" / "accuracy_epsilon.png").stat().st_size > 10_000
    assert (tmp_path / "run" / "checkpoint.pt").exists()


def test_digits_cnn_with_dp_clearly_beats_chance(tmp_path):
    _, outcome = _run(tmp_path, model="cnn", dataset="digits", epsilon=3.0)
    assert outcome.history[-1]["eval"]["accuracy"] >= 0.35  # chance: 0.10
    assert outcome.history[-1]["epsilon_max"] <= 3.0


def _centralised_accuracy(dataset, model_name, epochs, lr, batch_size):
    split = load_dataset(dataset)
    torch.manual_seed(0)
    model = build_model(model_name, split.train.spec)
    task = task_for("classification", split.train.spec.num_classes)
    train(model, task, split.train, TrainSettings(local_epochs=epochs, batch_size=batch_size, lr=lr),
          torch.device("cpu"))
    return evaluate(model, task, split.test.x, split.test.y)["accuracy"]


def test_without_dp_federation_reaches_the_non_private_level(tmp_path):
    cfg, outcome = _run(tmp_path, model="mlp", dataset="breast-cancer", dp=False)
    central = _centralised_accuracy("breast-cancer", "mlp", cfg.local_epochs * cfg.num_rounds, cfg.lr, cfg.batch_size)
    federated = outcome.history[-1]["eval"]["accuracy"]
    assert federated >= central - 0.03 and federated >= 0.93
    assert outcome.history[-1]["epsilon_max"] is None


def test_same_seed_same_metrics_with_client_sampling(tmp_path):
    runs = []
    for name in ("a", "b"):
        cfg = RunConfig(num_rounds=2, model="mlp", dataset="breast-cancer", fraction_train=0.5,
                        out_dir=str(tmp_path / name), seed=7)
        runs.append(simulate(cfg, SimulationOptions(num_nodes=6), progress=None).history)
    timings = {"seconds", "wait_seconds", "clientapp_startup_seconds"}  # wall clock, not the run's outcome
    strip = [[{k: v for k, v in h.items() if k not in timings} for h in run] for run in runs]
    assert strip[0] == strip[1]
    assert strip[0][-1]["sent"] == 3  # half of 6 nodes sampled per round


def test_a_thousand_virtual_clients_cost_only_what_is_sampled(tmp_path):
    cfg = RunConfig(num_rounds=2, model="mlp", dataset="synthetic", fraction_train=0.005, local_epochs=1,
                    out_dir=str(tmp_path / "run"))
    outcome = simulate(cfg, SimulationOptions(num_nodes=1000), progress=None)
    trained = [h for h in outcome.history if h["round"] > 0]
    assert [h["replies"] for h in trained] == [5, 5] and all(h["failures"] == 0 for h in trained)
    # A ledger exists only for a node that was sampled: a virtual client costs nothing before that.
    ledgers = list((tmp_path / "run" / "ledgers").glob("*.json"))
    assert len(ledgers) == len(outcome.node_epsilon) <= 10
    assert not (tmp_path / "run" / "partitions.png").exists()  # no per-node report at this scale


def test_sweep_writes_a_privacy_utility_table_and_plot_and_records_what_cannot_run(tmp_path, capsys):
    from fedsafe.simulations.sweep import SweepGrid, run_sweep

    # 5000 nodes: more than breast-cancer's training records, so those two settings cannot run.
    grid = SweepGrid(epsilons=(1.0, float("inf")), strategies=("fedavg",), models=("mlp",), alphas=(0.5,),
                     nodes=(3, 5000))
    base = RunConfig(num_rounds=1, dataset="breast-cancer", out_dir=str(tmp_path))
    rows = run_sweep(base, grid, SimulationOptions(num_nodes=3), tmp_path)
    private, too_many, baseline, too_many_baseline = rows
    assert private["status"] == baseline["status"] == "ran"
    assert 0.9 <= private["epsilon_max"] <= 1.0 and baseline["epsilon_max"] is None
    assert baseline["accuracy"] > 0.9 and private["accuracy"] > 0.6
    for row in (too_many, too_many_baseline):
        assert row["status"] == "cannot run: more nodes (5000) than training samples (426) in breast-cancer"
        assert row.get("accuracy") is None
    assert "2 of 4 settings cannot run" in capsys.readouterr().out
    lines = (tmp_path / "privacy_utility.csv").read_text().splitlines()
    assert len(lines) == 5 and lines[1].startswith("1.0,fedavg,mlp,0.5,3,ran,")
    assert lines[2].startswith("1.0,fedavg,mlp,0.5,5000,cannot run: more nodes")
    assert (tmp_path / "privacy_utility.png").stat().st_size > 10_000


def test_fedadam_over_secagg_on_ray_keeps_its_moments_in_the_checkpoint(tmp_path):
    """A non-FedAvg strategy end to end on Flower's simulation engine, over SecAgg+: the nodes' secagg
    state lives in Flower's per-node Context across the protocol's four messages per round."""
    from fedsafe.server.checkpoint import load_checkpoint

    cfg = RunConfig(num_rounds=2, local_epochs=1, strategy="fedadam", secagg=True, budget_aware=True,
                    out_dir=str(tmp_path / "run"))
    outcome = simulate(cfg, SimulationOptions(num_nodes=3), progress=None)
    rounds = outcome.history[1:]
    assert all(r["aggregated"] and r["secagg"]["summed"] == 3 and r["replies"] == 3 for r in rounds)
    assert outcome.history[-1]["eval"]["accuracy"] >= 0.85
    assert 2.9 <= outcome.history[-1]["epsilon_max"] <= 3.0
    state = load_checkpoint(tmp_path / "run", restore_rng=False).strategy_state
    assert state["chain"] == ["BudgetAwareSelection", "SecAggPlusAggregation", "FedAdam"]
    assert state["links"][2]["m_t"] is not None and len(state["links"][0]["ledgers"]) == 3
