"""Every registered model family: builds, is valid for Opacus, computes correct per-sample
gradients in every grad_sample_mode, has no aliased state, learns, and rejects bad configs.

Run from the repository root: python -m pytest tests/test_model_families.py
"""

from __future__ import annotations

import ast
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fedsafe import models
from fedsafe.client.data import load_builtin
from fedsafe.client.dp_modes import make_private
from fedsafe.models import (
    GRAD_SAMPLE_MODES,
    DataSpec,
    ModelConfigError,
    UnknownModelError,
    build_model,
    default_task,
    model_names,
    preferred_grad_sample_mode,
    register_model,
    task_for,
)
from fedsafe.models.gan import train_step
from fedsafe.models.gru import GRULayer
from fedsafe.models.lstm import LSTMLayer
from fedsafe.models.tasks import GenerationTask, anomaly_auroc, frechet_distance
from fedsafe.models.transformer import SelfAttention

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [
    # Opacus' hooks fire on module outputs when inputs need no grad (always, for data): harmless.
    pytest.mark.filterwarnings("ignore:Full backward hook is firing"),
    pytest.mark.filterwarnings("ignore:In CPU autocast, but the target dtype is not supported"),
]

# The data each family is tested on: digits, as (1, 8, 8) images or 8 steps of 8 features.
SEQUENCE = (8, 8)
IMAGE = (1, 8, 8)
CASES: dict[str, tuple[tuple[int, ...], dict]] = {
    "mlp": (IMAGE, {}),
    "cnn": (IMAGE, {}),
    "lstm": (SEQUENCE, {}),
    "gru": (SEQUENCE, {}),
    "transformer": (SEQUENCE, {}),
    "autoencoder": (IMAGE, {}),
    "gan": (IMAGE, {"output_activation": "sigmoid"}),
}
FAMILIES = sorted(CASES)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def spec_for(family: str) -> DataSpec:
    shape, _ = CASES[family]
    return DataSpec(shape, 10, default_task(family))


def make(family: str, seed: int = 0, **options) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(family, spec_for(family), {**CASES[family][1], **options})


@pytest.fixture(scope="module")
def digits():
    split = load_builtin("digits")
    return split


def inputs(split, family: str, n: int | None = None) -> torch.Tensor:
    x = torch.as_tensor(split.x if n is None else split.x[:n])
    return x.reshape(len(x), *CASES[family][0])


def private_part(model: nn.Module) -> nn.Module:
    """What DP-SGD wraps: a GAN's discriminator, else the whole model."""
    return getattr(model, "discriminator", model)


def per_sample_targets(family: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    task = task_for(default_task(family), 10)
    return torch.ones(len(x)) if family == "gan" else task.targets(x, y)


# ---- the registry knows every family, and the tests cover every registered one ----------------


def test_every_registered_family_is_tested_here():
    assert set(model_names()) == set(CASES), "add new families to CASES in this file"


def test_tests_import_this_worktree():
    assert Path(models.__file__).resolve().parent.parent == ROOT


def test_models_package_never_imports_flower_or_opacus():
    for path in (ROOT / "models").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in ("flwr", "opacus"), f"{path.name} imports {name}"


@pytest.mark.parametrize("family", FAMILIES)
def test_family_declares_a_known_mode_and_task(family):
    assert preferred_grad_sample_mode(family) in GRAD_SAMPLE_MODES
    assert task_for(default_task(family), 10).name == default_task(family)


def test_register_model_rejects_unknown_grad_sample_mode():
    with pytest.raises(ValueError, match="grad_sample_mode 'fast'.*hooks"):
        register_model("never-registered", grad_sample_mode="fast")


# ---- builds, Opacus-valid, no aliased state ---------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_builds_and_opacus_finds_nothing_to_fix(family, digits):
    from opacus.validators import ModuleValidator

    model = make(family)
    assert ModuleValidator.validate(model, strict=False) == []
    x = inputs(digits.train, family, 5)
    out = model(x)
    expected = {"classification": (5, 10), "reconstruction": x.shape, "generation": (5,)}[default_task(family)]
    assert tuple(out.shape) == tuple(expected)
    if family == "gan":
        assert model.latent_dim == 16
        assert tuple(model.sample(3).shape) == (3, *IMAGE)


@pytest.mark.parametrize("family", FAMILIES)
def test_state_dict_has_no_aliased_storage(family):
    state = make(family).state_dict()
    storages = {}
    for key, tensor in state.items():
        pointer = tensor.untyped_storage().data_ptr()
        assert pointer not in storages, f"{key} shares storage with {storages[pointer]}"
        storages[pointer] = key


# ---- per-sample gradients: Opacus vs one sample at a time -------------------------------------


def one_at_a_time(family, model, x, targets):
    part = private_part(model)
    task = task_for(default_task(family), 10)
    params = list(part.parameters())
    rows = [
        torch.autograd.grad(task.per_sample_loss(part(x[i : i + 1]), targets[i : i + 1]).mean(), params)
        for i in range(len(x))
    ]
    return [torch.stack(column) for column in zip(*rows)]


@pytest.mark.parametrize("family,mode", list(itertools.product(FAMILIES, GRAD_SAMPLE_MODES)))
def test_per_sample_gradients_match_one_sample_at_a_time(family, mode, digits):
    """hooks/functorch/ew: Opacus' per-sample gradients equal micro-batches of one. ghost (no
    per-sample gradients exist): its per-sample norms, and its clipped sum, equal the reference."""
    n = 6
    x = inputs(digits.train, family, n)
    targets = per_sample_targets(family, x, torch.as_tensor(digits.train.y[:n]))
    reference = one_at_a_time(family, make(family), x, targets)
    norms = torch.stack([g.reshape(n, -1).norm(dim=1) for g in reference], dim=1).norm(dim=1)
    clip = float(norms.median())  # clipping bites for half the samples

    model = make(family)
    part = private_part(model)
    task = task_for(default_task(family), 10)
    private = make_private(
        part, torch.optim.SGD(part.parameters(), lr=0.0), task.per_sample_loss, mode,
        noise_multiplier=0.0, max_grad_norm=clip, expected_batch_size=n,
    )
    try:
        private.criterion(private.module(x), targets).backward()
        if mode == "ghost":
            torch.testing.assert_close(private.module.per_sample_gradient_norms, norms, rtol=1e-4, atol=1e-6)
            factor = (clip / (norms + 1e-6)).clamp(max=1.0)
            for p, g in zip(part.parameters(), reference):
                torch.testing.assert_close(p.grad, torch.einsum("i,i...->...", factor, g), rtol=1e-4, atol=1e-6)
        else:
            for (name, p), g in zip(part.named_parameters(), reference):
                assert p.grad_sample is not None, f"{name}: no per-sample gradient"
                torch.testing.assert_close(p.grad_sample, g, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    finally:
        private.close()


@pytest.mark.parametrize("family", FAMILIES)
def test_dp_training_steps_run_in_the_preferred_mode(family, digits):
    """Three DP-SGD steps with noise in the family's declared mode: parameters move, stay finite."""
    model = make(family)
    part = private_part(model)
    task = task_for(default_task(family), 10)
    x, y = inputs(digits.train, family, 32), torch.as_tensor(digits.train.y[:32])
    before = [p.detach().clone() for p in part.parameters()]
    if family == "gan":
        private = make_private(part, torch.optim.Adam(part.parameters(), lr=1e-3), task.per_sample_loss,
                               preferred_grad_sample_mode(family), noise_multiplier=1.0, max_grad_norm=1.0,
                               expected_batch_size=64)
        g_opt = torch.optim.Adam(model.generator.parameters(), lr=1e-3)
        for _ in range(3):
            train_step(model, x, private.optimizer, g_opt, discriminator=private.module,
                       d_criterion=private.criterion, fake_count=32)
    else:
        private = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), task.per_sample_loss,
                               preferred_grad_sample_mode(family), noise_multiplier=1.0, max_grad_norm=1.0,
                               expected_batch_size=32)
        for _ in range(3):
            private.optimizer.zero_grad()
            private.criterion(private.module(x), task.targets(x, y)).backward()
            private.optimizer.step()
    private.close()
    after = list(part.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(after, before))


# ---- the hand-written layers compute torch's functions ----------------------------------------


def test_attention_is_torch_multihead_attention_with_the_same_weights():
    torch.manual_seed(0)
    dim, heads = 32, 4
    reference = nn.MultiheadAttention(dim, heads, batch_first=True)
    ours = SelfAttention(dim, heads)
    with torch.no_grad():
        ours.qkv.weight.copy_(reference.in_proj_weight)
        ours.qkv.bias.copy_(reference.in_proj_bias)
        ours.out.weight.copy_(reference.out_proj.weight)
        ours.out.bias.copy_(reference.out_proj.bias)
    x = torch.randn(5, 7, dim)
    for training in (True, False):  # eval takes torch's fused fast path
        reference.train(training)
        ours.train(training)
        want = reference(x, x, x, need_weights=False)[0]
        torch.testing.assert_close(ours(x), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", sorted({"hooks", preferred_grad_sample_mode("transformer")}))
def test_transformer_is_the_same_function_after_opacus_wrapping(mode, digits):
    model = make("transformer")
    x = inputs(digits.train, "transformer", 16)
    before = model(x).detach()
    attention = model.blocks[0].attention
    h = torch.randn(4, 8, attention.dim)
    attention_before = attention(h).detach()
    task = task_for("classification", 10)
    private = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), task.per_sample_loss, mode,
                           noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=16)
    try:
        torch.testing.assert_close(private.module(x), before, rtol=0, atol=0)
        torch.testing.assert_close(attention(h), attention_before, rtol=0, atol=0)
    finally:
        private.close()


@pytest.mark.parametrize("ours_type,torch_type", [(LSTMLayer, nn.LSTM), (GRULayer, nn.GRU)])
def test_recurrent_layers_are_torch_lstm_and_gru_with_the_same_weights(ours_type, torch_type):
    torch.manual_seed(0)
    reference = torch_type(8, 16, batch_first=True)
    ours = ours_type(8, 16)
    with torch.no_grad():
        ours.input.weight.copy_(reference.weight_ih_l0)
        ours.input.bias.copy_(reference.bias_ih_l0)
        ours.recurrent.weight.copy_(reference.weight_hh_l0)
        ours.recurrent.bias.copy_(reference.bias_hh_l0)
    x = torch.randn(5, 9, 8, requires_grad=True)
    want, got = reference(x)[0], ours(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    weights = torch.randn_like(want)  # a loss touching every step
    grads_want = torch.autograd.grad((want * weights).sum(), [x, reference.weight_hh_l0, reference.weight_ih_l0])
    grads_got = torch.autograd.grad((got * weights).sum(), [x, ours.recurrent.weight, ours.input.weight])
    for g, w in zip(grads_got, grads_want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


# ---- each family learns -----------------------------------------------------------------------


def batches(n: int, steps: int, batch: int = 64, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield torch.randint(0, n, (batch,), generator=generator)


@pytest.mark.parametrize("family", ["mlp", "cnn", "lstm", "gru", "transformer"])
def test_classifier_learns_digits(family, digits):
    model = make(family)
    task = task_for("classification", 10)
    x, y = inputs(digits.train, family), torch.as_tensor(digits.train.y)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for index in batches(len(x), 300):
        optimizer.zero_grad()
        task.loss(model(x[index]), y[index]).backward()
        optimizer.step()
    accuracy = models.evaluate(model, task, inputs(digits.test, family).numpy(), digits.test.y)["accuracy"]
    assert accuracy > 0.6, f"{family}: held-out accuracy {accuracy:.2f} (chance 0.10)"


def test_autoencoder_learns_to_reconstruct_and_flags_outliers(digits):
    model = make("autoencoder")
    task = task_for("reconstruction", 10)
    x, test_x = torch.as_tensor(digits.train.x), digits.test.x
    untrained = models.evaluate(model, task, test_x, digits.test.y)["mse"]
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for index in batches(len(x), 300):
        optimizer.zero_grad()
        task.loss(model(x[index]), x[index]).backward()
        optimizer.step()
    trained = models.evaluate(model, task, test_x, digits.test.y)["mse"]
    assert trained < 0.3 * untrained, f"reconstruction MSE {untrained:.4f} -> {trained:.4f}"
    noise = np.random.default_rng(0).uniform(0, 1, size=(100, *IMAGE)).astype(np.float32)
    assert anomaly_auroc(model, test_x, noise) > 0.95


def test_gan_score_improves_with_training(digits):
    model = make("gan")
    task = GenerationTask()
    x = torch.as_tensor(digits.train.x)
    before = task.quality(model, x, n=500)
    d_opt = torch.optim.Adam(model.discriminator.parameters(), lr=2e-3, betas=(0.5, 0.999))
    g_opt = torch.optim.Adam(model.generator.parameters(), lr=2e-3, betas=(0.5, 0.999))
    generator = torch.Generator().manual_seed(0)
    for index in batches(len(x), 400):
        train_step(model, x[index], d_opt, g_opt, generator=generator)
    after = task.quality(model, x, n=500)
    # digits_is: higher is better (1 = no recognisable variety); frechet_distance: lower is better
    assert after["digits_is"] > before["digits_is"] + 0.5, (before, after)
    assert after["frechet_distance"] < 0.7 * before["frechet_distance"], (before, after)


def test_quality_scores_rank_real_digits_above_noise(digits):
    from fedsafe.models.tasks import digits_score

    real, noise = digits.test.x, np.random.default_rng(0).uniform(0, 1, size=(450, 64))
    assert digits_score(real)["digits_is"] > 3 * digits_score(noise)["digits_is"]
    assert frechet_distance(real, digits.train.x) < 0.1 * frechet_distance(noise, digits.train.x)


# ---- bad configs fail early and say why -------------------------------------------------------


def test_unknown_family_lists_the_known_ones():
    with pytest.raises(UnknownModelError, match=r"unknown model 'lsmt'; choose one of: .*lstm"):
        build_model("lsmt", DataSpec(SEQUENCE, 10))
    assert issubclass(UnknownModelError, ValueError)


@pytest.mark.parametrize(
    "family,options,message",
    [
        ("lstm", {"hidden": "64"}, r"model 'lstm': option 'hidden' must be an integer; got '64' \(str\)"),
        ("gru", {"layers": 1.5}, r"option 'layers' must be an integer; got 1.5"),
        ("transformer", {"heads": True}, r"option 'heads' must be an integer; got True \(bool\)"),
        ("transformer", {"heads": 5}, r"'hidden' \(64\) must be divisible by option 'heads' \(5\)"),
        ("autoencoder", {"latent_dim": 0}, r"option 'latent_dim' must be at least 1; got 0"),
        ("gan", {"dropout": "0.1"}, r"option 'dropout' must be a number"),
        ("gan", {"output_activation": "relu"}, r"option 'output_activation' must be one of: linear, sigmoid, tanh"),
        ("mlp", {"hiden": 32}, r"unknown option\(s\) 'hiden'; it takes: .*hidden"),
    ],
)
def test_bad_option_names_the_problem(family, options, message):
    with pytest.raises(ModelConfigError, match=message):
        build_model(family, spec_for(family), options)


@pytest.mark.parametrize(
    "family,spec,message",
    [
        ("lstm", DataSpec(IMAGE, 10), r"'lstm' needs sequences shaped \(seq_len, features\); got input shape \(1, 8, 8\)"),
        ("transformer", DataSpec((64,), 10), r"'transformer' needs sequences shaped"),
        ("cnn", DataSpec(SEQUENCE, 10), r"'cnn' needs image data shaped \(channels, height, width\)"),
        ("autoencoder", DataSpec(IMAGE, 10), r"'autoencoder' serves task\(s\) reconstruction; the data spec asks for 'classification'"),
        ("gan", DataSpec(IMAGE, 10, "reconstruction"), r"'gan' serves task\(s\) generation"),
        ("mlp", DataSpec((0, 4), 10), r"input shape must be positive integers"),
    ],
)
def test_spec_that_does_not_fit_the_family_names_the_problem(family, spec, message):
    with pytest.raises(ModelConfigError, match=message):
        build_model(family, spec)


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown task 'segmentation'; choose one of: classification, regression, reconstruction, generation"):
        task_for("segmentation", 10)


def test_sequence_models_reject_inputs_of_the_wrong_shape():
    for family in ("lstm", "transformer"):
        with pytest.raises(ValueError, match=r"expected sequences shaped \(batch, "):
            make(family)(torch.zeros(2, 1, 8, 8))


def test_regression_metrics():
    task = task_for("regression", 1)
    metrics = task.metrics(torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([1.0, 2.0, 4.0]))
    assert metrics["mse"] == pytest.approx(1 / 3)
    assert metrics["mae"] == pytest.approx(1 / 3)
    assert metrics["r2"] == pytest.approx(1 - 1 / (14 / 3))
    assert math.isclose(float(task.loss(torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([1.0, 2.0, 4.0]))), 1 / 3, rel_tol=1e-6)


def test_regression_head_from_num_classes(digits):
    model = build_model("gru", DataSpec(SEQUENCE, 1, "regression"))
    assert tuple(model(inputs(digits.train, "gru", 4)).shape) == (4, 1)
