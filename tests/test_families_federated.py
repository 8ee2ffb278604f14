"""Every model family learns in a federated DP run, judged by the server with the function the nodes
trained: 3 nodes, 3 rounds, ε = 3 (δ = 1e-5) per node, each family against its baseline.

Two families run on Flower's simulation engine (Ray): lstm and autoencoder. The others run through
tests/inprocess.py: the same round loop and the same node handler (fedsafe.client.app.train_round) with
real Flower messages, without the engine's start-up. Also: early stopping keeps the best global
model; transfer learning leaves frozen parameters untouched and out of every upload.
"""

from __future__ import annotations

import pytest
import torch

from fedsafe.client.data import PartitionScheme, load_partition
from fedsafe.client.training import poisson_schedule
from fedsafe.server.config import RunConfig
from fedsafe.simulations.run import SimulationOptions, simulate
from tests.inprocess import federate

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("flower_task_identity")]

EPSILON = 3.0
NODES = 3


def _dp_steps_taken_by_each_node(cfg: RunConfig) -> list[int]:
    """What each node's ledger must hold after the run: every round's DP-SGD steps, computed from
    its partition and Opacus' Poisson schedule."""
    scheme = PartitionScheme(cfg.partitioner, NODES, seed=cfg.seed)
    steps = []
    for node in range(NODES):
        _, batches = poisson_schedule(len(load_partition(cfg.dataset, node, scheme)), cfg.batch_size)
        steps.append(cfg.num_rounds * cfg.local_epochs * batches)
    return sorted(steps)


def _check_privacy(cfg, outcome, grid=None):
    rounds = outcome.history[1:]
    assert [r["replies"] for r in rounds] == [NODES] * cfg.num_rounds, [r["problems"] for r in rounds]
    assert EPSILON - 0.05 <= rounds[-1]["epsilon_max"] <= EPSILON
    if grid is not None:
        last = grid.replies[-NODES:]
        assert sorted(int(r.content["metrics"]["dp-steps"]) for r in last) == _dp_steps_taken_by_each_node(cfg)


# family -> (run config, headline metric, check against the baseline)
IN_PROCESS = {
    # classifiers on digits: chance is 0.10
    "mlp": (dict(model="mlp", dataset="digits"), "accuracy", lambda first, last: last >= 0.6),
    "cnn": (dict(model="cnn", dataset="digits"), "accuracy", lambda first, last: last >= 0.4),
    "gru": (dict(model="gru", dataset="digits"), "accuracy", lambda first, last: last >= 0.3),
    "transformer": (dict(model="transformer", dataset="digits", model_options="hidden=32,layers=1"),
                    "accuracy", lambda first, last: last >= 0.25),
    # regression: r2 = 0 is the mean predictor
    "mlp-regression": (dict(model="mlp", dataset="diabetes", lr=0.1), "r2", lambda first, last: last >= 0.2),
    # GAN: the Fréchet distance of its samples to held-out digits falls (lower is better)
    "gan": (dict(model="gan", dataset="digits", optimizer="adam", lr=0.002,
                 model_options="output_activation=sigmoid,hidden=64,layers=1"),
            "frechet_distance", lambda first, last: last <= 0.75 * first),
}


@pytest.mark.parametrize("name", sorted(IN_PROCESS))
def test_family_learns_in_a_dp_federation(name, tmp_path):
    overrides, metric, beats_baseline = IN_PROCESS[name]
    cfg, outcome, grid = federate(tmp_path, nodes=NODES, epsilon=EPSILON, **overrides)
    _check_privacy(cfg, outcome, grid)
    first, last = outcome.history[0]["eval"][metric], outcome.history[-1]["eval"][metric]
    assert beats_baseline(first, last), f"{name}: {metric} {first:.3f} -> {last:.3f}"
    if name == "gan":
        # both networks are federated: every upload holds the generator and the discriminator
        keys = set(grid.replies[-1].content["arrays"].keys())
        assert any(k.startswith("generator.") for k in keys) and any(k.startswith("discriminator.") for k in keys)


def test_lstm_and_autoencoder_learn_on_the_simulation_engine(tmp_path):
    cfg = RunConfig(model="lstm", dataset="digits", num_rounds=3, epsilon=EPSILON, out_dir=str(tmp_path / "lstm"))
    outcome = simulate(cfg, SimulationOptions(num_nodes=NODES), progress=None)
    _check_privacy(cfg, outcome)
    assert outcome.history[-1]["eval"]["accuracy"] >= 0.3  # chance: 0.10
    assert (tmp_path / "lstm" / "metrics.csv").read_text().startswith("round,accuracy,loss")

    # anomaly detection: trained on nine digits, the server scores held-out 4s by reconstruction error
    cfg = RunConfig(model="autoencoder", dataset="digits-anomaly", num_rounds=3, epsilon=EPSILON,
                    optimizer="adam", lr=0.01, out_dir=str(tmp_path / "ae"))
    outcome = simulate(cfg, SimulationOptions(num_nodes=NODES), progress=None)
    _check_privacy(cfg, outcome)
    untrained, trained = outcome.history[0]["eval"], outcome.history[-1]["eval"]
    assert trained["mse"] <= 0.5 * untrained["mse"], (untrained, trained)  # baseline: the untrained model
    assert trained["anomaly_auroc"] >= 0.75 and trained["anomaly_auroc"] >= untrained["anomaly_auroc"] + 0.2
    assert (tmp_path / "ae" / "metrics.csv").read_text().startswith("round,anomaly_auroc,mse")


def test_early_stopping_stops_and_keeps_the_best_global_model(tmp_path):
    """Diabetes at lr 0.5: r2 peaks after round 1 and then falls; patience 1 stops at round 2."""
    from fedsafe.server.app import global_model_setup
    from flwr.app import ArrayRecord

    cfg, outcome, _ = federate(tmp_path, nodes=NODES, model="mlp", dataset="diabetes", lr=0.5, epsilon=EPSILON,
                               num_rounds=5, early_stopping_patience=1)
    history = outcome.history
    best = outcome.best
    assert best["metric"] == "val_r2" and best["stopped_early"]
    assert history[-1]["early_stopped"] and history[-1]["round"] == best["round"] + 1 < cfg.num_rounds
    val = [h["eval"]["val_r2"] for h in history]
    assert best["round"] == max(range(len(val)), key=val.__getitem__) and best["value"] == max(val)
    assert history[best["round"]]["eval"]["r2"] > history[-1]["eval"]["r2"]
    # best_model.pt holds the best round's global model: evaluated again, it gives that round's figures
    saved = torch.load(tmp_path / "run" / "best_model.pt", weights_only=True)
    assert saved["round"] == best["round"]
    _, _, evaluator = global_model_setup(cfg)
    again = evaluator(ArrayRecord(saved["model_state"]))
    assert again["r2"] == pytest.approx(history[best["round"]]["eval"]["r2"], abs=1e-6)
    # the nodes spent ε for the rounds that ran only
    assert history[-1]["epsilon_max"] < EPSILON


def test_transfer_learning_keeps_frozen_parameters_and_never_uploads_them(tmp_path):
    federate(tmp_path / "pretrain", nodes=NODES, model="mlp", dataset="digits", epsilon=EPSILON,
                          num_rounds=2)
    checkpoint = tmp_path / "pretrain" / "run" / "checkpoint.pt"
    pretrained = torch.load(checkpoint, weights_only=True)["model_state"]

    cfg, outcome, grid = federate(tmp_path / "transfer", nodes=NODES, model="mlp", dataset="digits", epsilon=EPSILON,
                                  num_rounds=2, init_checkpoint=str(checkpoint), freeze="1")
    final = outcome.arrays.to_torch_state_dict()
    for key in ("1.weight", "1.bias"):  # the hidden layer: loaded, frozen, untouched
        assert torch.equal(final[key], pretrained[key])
    assert not torch.equal(final["3.weight"], pretrained["3.weight"])  # the head trained on
    uploads = [set(r.content["arrays"].keys()) for r in grid.replies]
    assert len(uploads) == NODES * cfg.num_rounds and all(keys == {"3.weight", "3.bias"} for keys in uploads)
    assert outcome.history[0]["eval"]["accuracy"] >= 0.5  # starts from the pretrained model
    assert outcome.history[-1]["eval"]["accuracy"] >= 0.5
    assert [h["rejected"] for h in outcome.history[1:]] == [0, 0]
