"""Node training for every task and the run-config keys of training practice (quick: no federation).

Data views per family, empty Poisson batches in every family's grad_sample_mode, GAN steps,
augmentation, L1, model options, freeze and init-checkpoint errors, updates without frozen
parameters, headline metrics. Federated runs of every family are in test_families_federated.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord
from torch import nn

from fedsafe.client.data import ArrayDataset, DataError, fit_view, load_dataset
from fedsafe.client.regularize import l1_proximal_step, random_shifts
from fedsafe.client.training import RandomStreams, TrainSettings, poisson_loader, train
from fedsafe.models import DataSpec, build_model, parse_model_options, preferred_grad_sample_mode, resolve_spec, task_for
from fedsafe.models.registry import ModelConfigError, ModelFamily, _FAMILIES
from fedsafe.server.app import global_model_setup
from fedsafe.server.config import ConfigError, RunConfig
from fedsafe.server.results import headline_text, metric_columns
from fedsafe.strategies import UpdateRejected, complete_update, keep_frozen, validate_update

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")

FAMILY_DATA = {  # family -> the built-in dataset it is federated on
    "mlp": "digits", "cnn": "digits", "lstm": "digits", "gru": "digits", "transformer": "digits",
    "autoencoder": "digits-anomaly", "gan": "digits",
}


# ---- data views -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "family,dataset,shape,task",
    [
        ("lstm", "digits", (8, 8), "classification"),  # a (1, 8, 8) image read as 8 steps of 8 features
        ("transformer", "digits", (8, 8), "classification"),
        ("cnn", "digits-seq", (1, 8, 8), "classification"),  # and back
        ("gru", "digits-seq", (8, 8), "classification"),
        ("mlp", "digits", (1, 8, 8), "classification"),
        ("autoencoder", "digits", (1, 8, 8), "reconstruction"),  # labels unused
        ("autoencoder", "digits-anomaly", (1, 8, 8), "reconstruction"),
        ("gan", "digits", (1, 8, 8), "generation"),
        ("mlp", "diabetes", (10,), "regression"),
        ("lstm", "breast-cancer", (30,), "classification"),  # left as it is: build_model names the problem
    ],
)
def test_each_family_gets_its_view_of_the_data(family, dataset, shape, task):
    spec = resolve_spec(family, load_dataset(dataset).train.spec)
    assert (spec.input_shape, spec.task) == (shape, task)


def test_node_data_is_fitted_to_the_spec_or_refused():
    digits = load_dataset("digits").train
    assert fit_view(digits, (8, 8)).x.shape == (len(digits), 8, 8)
    assert fit_view(fit_view(digits, (8, 8)), (1, 8, 8)).x.shape == digits.x.shape
    with pytest.raises(DataError, match=r"shaped \(1, 8, 8\); the model expects \(64,\)"):
        fit_view(digits, (64,))


def test_anomaly_set_trains_on_normal_digits_and_holds_out_the_outliers():
    split = load_dataset("digits-anomaly")
    digits = load_dataset("digits")
    assert split.outliers and split.train.spec.task == "reconstruction"
    assert len(split.train) == int((digits.train.y != 4).sum()) and not split.train.y.any()
    assert int(split.test.y.sum()) == int((digits.train.y == 4).sum() + (digits.test.y == 4).sum())


def test_regression_set_has_standardised_real_targets_and_refuses_label_partitioners():
    from fedsafe.client.data import PartitionScheme, make_partitioner

    data = load_dataset("diabetes").train
    assert data.y.dtype == np.float32 and abs(float(data.y.mean())) < 0.2 and 0.8 < float(data.y.std()) < 1.2
    with pytest.raises(DataError, match="real-valued targets"):
        make_partitioner(data, PartitionScheme("dirichlet", 3))


# ---- node training: every family, empty Poisson batches, exact step counts ---------------------


def _family_data(family: str, n: int) -> tuple[nn.Module, object, ArrayDataset]:
    split = load_dataset(FAMILY_DATA[family])
    spec = resolve_spec(family, split.train.spec)
    options = {"output_activation": "sigmoid", "hidden": 32, "layers": 1} if family == "gan" else {}
    torch.manual_seed(0)
    model = build_model(family, spec, options)
    data = fit_view(split.train, spec.input_shape)
    data = ArrayDataset(data.x[:n], data.y[:n], spec)
    return model, task_for(spec.task, spec.num_classes), data


@pytest.mark.parametrize("family", sorted(FAMILY_DATA))
def test_dp_training_counts_every_step_empty_poisson_batches_included(family):
    """20 samples, expected batch 1: about a third of the Poisson batches are empty. Each is still a
    DP-SGD step (noise only), in the family's own grad_sample_mode, and is counted."""
    model, task, data = _family_data(family, 20)
    settings = TrainSettings(local_epochs=2, batch_size=1, lr=0.05, noise_multiplier=1.0,
                             grad_sample_mode=preferred_grad_sample_mode(family),
                             optimizer="adam" if family == "gan" else "sgd")
    before = [p.detach().clone() for p in model.parameters()]
    sampling = RandomStreams.seeded(0, torch.device("cpu")).sampling
    sizes = [len(y) for _, y in poisson_loader(data, 1, sampling)]
    assert 0 in sizes  # the first epoch, as the training loop will draw it, has empty batches
    outcome = train(model, task, data, settings, torch.device("cpu"), seed=0)
    assert outcome.steps == 2 * len(poisson_loader(data, 1)) == 40
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), before))
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None for p in model.parameters())


def test_gan_node_trains_the_discriminator_privately_and_the_generator_from_it():
    model, task, data = _family_data("gan", 64)
    d_before = [p.detach().clone() for p in model.discriminator.parameters()]
    g_before = [p.detach().clone() for p in model.generator.parameters()]
    settings = TrainSettings(local_epochs=1, batch_size=16, optimizer="adam", lr=1e-3, noise_multiplier=1.0,
                             grad_sample_mode="ghost")
    outcome = train(model, task, data, settings, torch.device("cpu"), seed=1)
    assert outcome.steps == len(poisson_loader(data, 16)) == 4  # the discriminator's DP-SGD steps
    assert all(not torch.equal(a, b) for a, b in zip(model.discriminator.parameters(), d_before))
    assert all(not torch.equal(a, b) for a, b in zip(model.generator.parameters(), g_before))


@pytest.mark.parametrize("family", ["mlp", "autoencoder"])
def test_plain_training_uses_the_tasks_targets(family):
    model, task, data = _family_data(family, 200)
    x, y = torch.as_tensor(data.x), torch.as_tensor(data.y)
    with torch.no_grad():
        loss_before = float(task.loss(model(x), task.targets(x, y)))
    outcome = train(model, task, data, TrainSettings(local_epochs=3, batch_size=16, optimizer="adam", lr=3e-3),
                    torch.device("cpu"), seed=0)
    assert outcome.mean_loss < loss_before


# ---- augmentation and L1 ----------------------------------------------------------------------


def test_shift_augmentation_moves_each_image_by_at_most_one_pixel():
    x = torch.zeros(200, 1, 8, 8)
    x[:, :, 3:5, 3:5] = 1.0  # a centred block: shifts of one pixel keep it whole
    shifted = random_shifts(x, torch.Generator().manual_seed(0))
    assert torch.equal(shifted.sum(dim=(1, 2, 3)), x.sum(dim=(1, 2, 3)))
    positions = {tuple(torch.nonzero(s[0])[0].tolist()) for s in shifted}
    assert positions == {(r, c) for r in (2, 3, 4) for c in (2, 3, 4)}  # all nine offsets, nothing further
    again = random_shifts(x, torch.Generator().manual_seed(0))
    assert torch.equal(shifted, again)
    assert random_shifts(torch.zeros(0, 8, 8)).shape == (0, 8, 8)


def test_l1_proximal_step_zeroes_small_weights_and_shrinks_the_rest():
    w = nn.Parameter(torch.tensor([[0.05, -0.02, 0.5, -0.3]]))
    l1_proximal_step([w], 0.1)
    assert w[0].tolist() == pytest.approx([0.0, 0.0, 0.4, -0.2])


def test_l1_training_gives_sparser_weights():
    zeros = {}
    for l1 in (0.0, 0.02):
        model, task, data = _family_data("mlp", 300)
        settings = TrainSettings(local_epochs=3, batch_size=32, lr=0.5, l1=l1, noise_multiplier=1.0,
                                 grad_sample_mode="ew")
        train(model, task, data, settings, torch.device("cpu"), seed=0)
        zeros[l1] = float((model[1].weight == 0).float().mean())
    assert zeros[0.0] == 0.0 and zeros[0.02] > 0.2


# ---- run config: model options, freeze, init checkpoint, bad configs ---------------------------


def test_model_options_string_is_parsed_into_typed_values():
    assert parse_model_options("hidden=128, dropout=0.2,output_activation=sigmoid,norm=group") == {
        "hidden": 128, "dropout": 0.2, "output_activation": "sigmoid", "norm": "group"}
    assert parse_model_options("") == {}
    with pytest.raises(ModelConfigError, match="key=value"):
        parse_model_options("hidden128")
    with pytest.raises(ModelConfigError, match="given twice"):
        parse_model_options("hidden=1,hidden=2")


def test_model_options_reach_the_model(tmp_path):
    initial, _, _ = global_model_setup(RunConfig(model="mlp", dataset="digits", model_options="hidden=24,depth=2",
                                                 out_dir=str(tmp_path)))
    assert tuple(initial["1.weight"].shape) == (24, 64) and "5.weight" in initial


class _BatchNormNet(nn.Sequential):
    pass


@pytest.fixture
def batchnorm_family(monkeypatch):
    """A family with a layer DP-SGD cannot train (BatchNorm mixes the samples of a batch)."""

    def build(spec, options):
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.Linear(16, spec.num_classes))

    monkeypatch.setitem(_FAMILIES, "bn-net", ModelFamily("bn-net", build, ("classification",), "hooks"))
    return "bn-net"


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(model="resnet"), "unknown model 'resnet'; choose one of:"),
        (dict(model="mlp", model_options="hiden=3"), r"unknown option\(s\) 'hiden'; it takes: .*hidden"),
        (dict(model="mlp", model_options="dropout=1.5"), "option 'dropout' must be below 1.0"),
        (dict(model="mlp", model_options="hidden"), "expected key=value"),
        (dict(model="mlp", freeze="encoder"), "freeze: no parameter of model 'mlp' is named 'encoder'; its parameters live in: 1, 3"),
        (dict(model="mlp", freeze="1,3"), "would freeze every parameter"),
        (dict(model="lstm", freeze="layers.1"), "no parameter of model 'lstm' is named 'layers.1'"),
        (dict(model="mlp", dataset="breast-cancer", augment=True), "augment=true shifts image pixels"),
        (dict(model="mlp", init_checkpoint="/no/such/weights.pt"), "init-checkpoint: file not found"),
        (dict(model="mlp", early_stopping_metric="acuracy"), "early-stopping-metric: unknown metric 'acuracy'"),
        (dict(model="cnn", dataset="diabetes"), r"'cnn' needs image data"),
        (dict(model="mlp", dataset="digits-anomaly"), r"'mlp' serves task\(s\) classification, regression"),
        (dict(model="mlp", l1=-1.0), "l1 must be >= 0"),
    ],
)
def test_bad_config_is_named_before_any_round(overrides, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        global_model_setup(RunConfig(**{"dataset": "digits", "out_dir": str(tmp_path), **overrides}))


def test_a_layer_opacus_cannot_privatise_is_named(batchnorm_family, tmp_path):
    cfg = RunConfig(model=batchnorm_family, dataset="digits", out_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="DP-SGD cannot train this model: .*BatchNorm"):
        global_model_setup(cfg)
    global_model_setup(RunConfig(**{**cfg.__dict__, "dp": False}))  # fine without DP


def test_init_checkpoint_loads_what_fits_and_names_what_does_not(tmp_path):
    torch.manual_seed(3)
    source = build_model("mlp", DataSpec((1, 8, 8), 10))
    torch.save(source.state_dict(), tmp_path / "weights.pt")
    initial, _, _ = global_model_setup(RunConfig(model="mlp", dataset="digits", init_checkpoint=str(tmp_path / "weights.pt"),
                                                 out_dir=str(tmp_path / "a")))
    for key, value in source.state_dict().items():
        assert torch.equal(torch.as_tensor(initial[key].numpy()), value)
    torch.save(build_model("mlp", DataSpec((30,), 2), {"hidden": 8}).state_dict(), tmp_path / "other.pt")  # no shape in common
    with pytest.raises(ConfigError, match="no tensor fits the model"):
        global_model_setup(RunConfig(model="mlp", dataset="digits", init_checkpoint=str(tmp_path / "other.pt"),
                                     out_dir=str(tmp_path / "b")))
    (tmp_path / "junk.pt").write_bytes(b"not torch")
    with pytest.raises(ConfigError, match="is not a PyTorch file"):
        global_model_setup(RunConfig(model="mlp", dataset="digits", init_checkpoint=str(tmp_path / "junk.pt"),
                                     out_dir=str(tmp_path / "c")))


# ---- updates without frozen parameters ----------------------------------------------------------


def _record(**arrays):
    return ArrayRecord({k: torch.as_tensor(v, dtype=torch.float32) for k, v in arrays.items()})


def test_update_without_frozen_parameters_is_valid_and_completed_from_the_global_model():
    global_arrays = _record(a=[1.0, 2.0], b=[3.0])
    update = _record(b=[4.0])
    validate_update(global_arrays, update, frozen=["a"])
    whole = complete_update(global_arrays, update, ["a"])
    assert list(whole.keys()) == ["a", "b"] and whole["a"].numpy().tolist() == [1.0, 2.0]
    with pytest.raises(UpdateRejected, match="frozen parameters \\['a'\\], which must not be uploaded"):
        validate_update(global_arrays, _record(a=[0.0, 0.0], b=[4.0]), frozen=["a"])
    with pytest.raises(UpdateRejected, match="keys differ"):
        validate_update(global_arrays, update)  # nothing frozen: a subset is an incomplete update
    kept = keep_frozen(global_arrays, _record(a=[1.0000001, 2.0], b=[5.0]), ["a"])
    assert kept["a"].numpy().tolist() == [1.0, 2.0] and kept["b"].numpy().tolist() == [5.0]


# ---- the headline metric of each task -------------------------------------------------------------


@pytest.mark.parametrize(
    "metrics,text",
    [
        ({"loss": 0.31, "accuracy": 0.912, "f1": 0.9}, "acc 0.912 loss 0.310"),
        ({"loss": 0.58, "mse": 0.58, "mae": 0.6, "r2": 0.412}, "r2 0.412 mse 0.580"),
        ({"mse": 0.02, "anomaly_auroc": 0.9, "outlier_mse": 0.05}, "anomaly-auroc 0.900 mse 0.020"),
        ({"mse": 0.02, "mae": 0.1, "loss": 0.02}, "mse 0.020"),
        ({"frechet_distance": 6.1, "digits_is": 1.2}, "FD 6.100 digits-IS 1.200"),
        ({}, "no evaluation"),
    ],
)
def test_progress_shows_the_tasks_headline_metric(metrics, text):
    assert headline_text(metrics) == text


def test_csv_columns_put_the_headline_first_and_validation_last():
    history = [{"round": 0, "eval": {"loss": 1.0, "mse": 1.0, "r2": 0.1, "val_r2": 0.0, "mae": 0.5}}]
    assert metric_columns(history) == ["r2", "mse", "loss", "mae", "val_r2"]


# ---- early stopping state, ledger keys of views, CLI flags -------------------------------------


def test_early_stopping_picks_the_best_round_and_a_resumed_run_picks_it_up(tmp_path):
    from fedsafe.server.early_stopping import EarlyStopping

    arrays = ArrayRecord({"w": torch.zeros(2)})
    history = [{"round": r, "eval": {"mse": 1.0, "r2": 0.0, "val_mse": v, "val_r2": 0.0}} for r, v in
               enumerate([0.9, 0.5, 0.6, 0.55])]
    stopper = EarlyStopping(tmp_path, patience=2, metric="mse")
    stops = [stopper.observe(h["round"], h["eval"], arrays) for h in history]
    assert stops == [False, False, False, True] and (stopper.best_round, stopper.best_value) == (1, 0.5)
    assert torch.load(tmp_path / "best_model.pt", weights_only=True)["round"] == 1
    resumed = EarlyStopping(tmp_path, patience=2, metric="mse")
    resumed.replay(history[:3])
    assert (resumed.best_round, resumed.should_stop) == (1, False)
    default = EarlyStopping(tmp_path, patience=1)  # the task's headline metric: r2 before mse
    default.observe(0, history[0]["eval"])
    assert default.key == "val_r2"
    with pytest.raises(ConfigError, match="'accuracy' is not among this task's metrics: mse, r2"):
        EarlyStopping(tmp_path, patience=1, metric="accuracy").observe(0, history[0]["eval"])


@pytest.mark.usefixtures("flower_task_identity")
def test_a_view_of_the_same_records_shares_their_ledger():
    from fedsafe.client.policy import NodePolicy, TrainRequest
    from tests.node_harness import train_message

    keys = []
    for dataset in ("digits", "digits-seq"):
        cfg = RunConfig(model="lstm", dataset=dataset, num_partitions=3)
        request = TrainRequest.from_config(train_message(cfg, 1).content["config"], "run")
        keys.append(NodePolicy().data_key(request, (0, 3)))
    assert keys[0] == keys[1]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--model-options", "hiden=3"], "unknown option(s) 'hiden'"),
        (["--dropout", "1.5"], "option 'dropout' must be below 1.0"),
        (["--freeze", "encoder"], "freeze: no parameter of model 'mlp' is named 'encoder'"),
        (["--dataset", "diabetes", "--partitioner", "dirichlet"], "real-valued targets"),
        (["--augment"], "augment=true shifts image pixels"),
        (["--early-stopping-metric", "acc"], "unknown metric 'acc'"),
    ],
)
def test_cli_names_bad_training_options_in_one_line(argv, message, capsys):
    from fedsafe.cli import main

    assert main(["simulate", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_cli_dropout_is_a_model_option():
    from fedsafe.cli import _model_options, build_parser

    args = build_parser().parse_args(["simulate", "--model-options", "hidden=32,dropout=0.1", "--dropout", "0.3"])
    assert _model_options(args) == "hidden=32,dropout=0.3"
