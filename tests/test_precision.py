"""Mixed precision (run setting `precision`, fedsafe.client.precision): bf16 autocast for the forward pass
with per-sample gradients, clipping and noise in fp32. All of it runs on the CPU, where PyTorch's bf16
autocast works as on a GPU (its kernels differ, its dtypes do not)."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from fedsafe.client.data import ArrayDataset
from fedsafe.client.dp_modes import make_private
from fedsafe.client.precision import (
    BF16_MODES, PrecisionError, autocast, check_precision, fp32_outputs, grad_sample_mode,
)
from fedsafe.client.training import TrainSettings, train
from fedsafe.models import DataSpec, build_model, evaluate, task_for

CPU = torch.device("cpu")
SHAPES = {"mlp": (6,), "cnn": (1, 8, 8), "lstm": (8, 4), "transformer": (8, 4)}


def _per_sample_step(family: str, mode: str, bf16: bool, boundary: bool, max_grad_norm: float = 1e-3):
    """One backward pass of a 64-sample batch through Opacus in `mode`; the DP optimizer, not yet stepped."""
    torch.manual_seed(0)
    spec = DataSpec(input_shape=SHAPES[family], num_classes=3, task="classification")
    model, task = build_model(family, spec), task_for("classification", 3)
    with fp32_outputs(model) if boundary else contextlib.nullcontext():
        private = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), task.per_sample_loss, mode,
                               noise_multiplier=0.0, max_grad_norm=max_grad_norm, expected_batch_size=64)
        x, y = torch.randn(64, *SHAPES[family]), torch.randint(0, 3, (64,))
        with autocast(CPU, "bf16" if bf16 else "fp32"):
            outputs = private.module(x)
        private.criterion(outputs.float(), y).backward()
    return private.optimizer


def _clipped_norms(optimizer) -> torch.Tensor:
    """Each sample's gradient norm after Opacus' clipping, in float64: Opacus computes the clip factor
    (DPOptimizer.clip_and_accumulate) in the per-sample gradients' own dtype; this applies that factor
    to the exact norm."""
    exact = torch.stack([g.double().reshape(len(g), -1).norm(dim=1) for g in optimizer.grad_samples], 1).norm(dim=1)
    own = torch.stack([g.reshape(len(g), -1).norm(2, dim=-1) for g in optimizer.grad_samples], 1).norm(2, dim=1)
    factor = (optimizer.max_grad_norm / (own + 1e-6)).clamp(max=1.0)
    return factor.double() * exact


@pytest.mark.parametrize("family", sorted(SHAPES))
@pytest.mark.parametrize("mode", BF16_MODES)
def test_bf16_per_sample_gradients_are_fp32_and_clipped_to_at_most_c(family, mode):
    optimizer = _per_sample_step(family, mode, bf16=True, boundary=True)
    assert {g.dtype for g in optimizer.grad_samples} == {torch.float32}
    clipped = _clipped_norms(optimizer)
    assert clipped.max() <= optimizer.max_grad_norm * (1 + 1e-5)
    assert clipped.min() > optimizer.max_grad_norm * 0.99  # clipping was active: the bound was tested


def test_plain_autocast_would_clip_in_bf16_and_overshoot_c():
    """Why the fp32 boundary exists: without it Opacus' hooks compute and clip per-sample gradients in
    bf16, and some clipped norm lands above C — a sensitivity the accountant does not know."""
    optimizer = _per_sample_step("cnn", "hooks", bf16=True, boundary=False)
    assert {g.dtype for g in optimizer.grad_samples} == {torch.bfloat16}
    assert _clipped_norms(optimizer).max() > optimizer.max_grad_norm * 1.001


def test_the_modes_autocast_breaks_are_replaced_or_refused():
    assert grad_sample_mode("ew", "bf16", "classification") == "hooks"  # ExpandedWeights fails under autocast
    assert grad_sample_mode("functorch", "bf16", "reconstruction") == "functorch"
    assert grad_sample_mode("ew", "fp32", "classification") == "ew"
    with pytest.raises(PrecisionError, match="not supported for GANs"):
        grad_sample_mode("ghost", "bf16", "generation")
    with pytest.raises(PrecisionError, match="Opacus mode 'ghost' does not give under autocast"):
        check_precision("bf16", "ghost", "classification")
    with pytest.raises(PrecisionError, match="unknown precision 'fp16'"):
        check_precision("fp16", "hooks", "classification")


def test_training_refuses_a_mode_that_cannot_clip_in_fp32_before_any_step():
    spec, data = _separable(64)
    model = build_model("mlp", spec)
    before = [p.detach().clone() for p in model.parameters()]
    settings = TrainSettings(batch_size=16, noise_multiplier=1.0, grad_sample_mode="ew", precision="bf16")
    with pytest.raises(PrecisionError, match="mode 'ew'"):
        train(model, task_for("classification", 2), data, settings, CPU, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def _separable(n: int, shape=(1, 8, 8)):
    rng = np.random.default_rng(0)
    spec = DataSpec(input_shape=shape, num_classes=2, task="classification")
    x = rng.normal(size=(n, *shape)).astype(np.float32)
    y = (x.reshape(n, -1)[:, : x[0].size // 2].mean(axis=1) > 0).astype(np.int64)
    return spec, ArrayDataset(x, y, spec)


@pytest.mark.parametrize("family", ["mlp", "cnn"])
def test_a_bf16_dp_round_learns_and_spends_what_fp32_spends(family):
    """Precision is not privacy-relevant: the same σ, q and steps, so the same ε; and bf16 still learns."""
    spec, data = _separable(400)
    task = task_for("classification", 2)
    results = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = build_model(family, spec)
        untrained = evaluate(model, task, data.x, data.y)["accuracy"]
        mode = grad_sample_mode("ew", precision, "classification")
        settings = TrainSettings(local_epochs=2, batch_size=32, lr=0.5, noise_multiplier=1.0,
                                 grad_sample_mode=mode, precision=precision)
        outcome = train(model, task, data, settings, CPU, seed=1)
        results[precision] = (outcome.dp_spend, evaluate(model, task, data.x, data.y)["accuracy"], untrained)
    (spend32, acc32, _), (spend16, acc16, untrained) = results["fp32"], results["bf16"]
    assert spend16 == spend32 and spend16[0][2] > 0
    assert acc16 >= 0.7 and acc16 > untrained + 0.1
    assert abs(acc16 - acc32) <= 0.05


def test_a_bf16_round_restores_the_model_as_it_was_hooked():
    """The fp32 boundary is the round's own: the model leaves training without its hooks."""
    spec, data = _separable(32)
    model = build_model("mlp", spec)
    train(model, task_for("classification", 2), data,
          TrainSettings(local_epochs=1, batch_size=16, noise_multiplier=1.0, grad_sample_mode="hooks",
                        precision="bf16"), CPU, seed=0)
    assert all(not m._forward_hooks for m in model.modules())
    assert model(torch.zeros(2, *spec.input_shape)).dtype == torch.float32


def test_the_coordinator_refuses_bf16_for_a_gan_before_round_one(tmp_path):
    from fedsafe.server.app import global_model_setup
    from fedsafe.server.config import ConfigError, RunConfig

    with pytest.raises(ConfigError, match="precision=bf16 is not supported for GANs"):
        global_model_setup(RunConfig(model="gan", dataset="digits", precision="bf16", out_dir=str(tmp_path)))
    # A family that trains in ew at fp32 is checked in hooks, the mode its nodes will use under bf16.
    global_model_setup(RunConfig(model="cnn", dataset="digits", precision="bf16", out_dir=str(tmp_path)))


def test_a_node_refuses_bf16_for_a_gan_before_reserving_epsilon():
    from fedsafe.client.app import _grad_sample_mode
    from fedsafe.client.policy import PolicyError

    class Request:
        model, precision = "gan", "bf16"

    with pytest.raises(PolicyError, match="not supported for GANs"):
        _grad_sample_mode(Request(), DataSpec(input_shape=(6,), num_classes=0, task="generation"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", ["mlp", "cnn"])
def test_a_bf16_dp_round_on_cuda_clips_in_fp32(family):
    """Where a GPU exists: bf16 autocast on CUDA, seeded noise drawn there, per-sample gradients fp32
    (train() checks them before every step and would raise)."""
    spec, data = _separable(128)
    model = build_model(family, spec)
    settings = TrainSettings(local_epochs=1, batch_size=32, noise_multiplier=1.0, grad_sample_mode="hooks",
                             precision="bf16")
    outcome = train(model, task_for("classification", 2), data, settings, torch.device("cuda"), seed=1)
    assert outcome.steps > 0 and next(model.parameters()).device.type == "cuda"


def test_a_node_refuses_a_precision_it_does_not_know_as_a_malformed_request():
    from fedsafe.client.policy import RequestError, TrainRequest
    from fedsafe.server.config import RunConfig

    config = {**RunConfig().train_config(), "server-round": 1, "input-shape": [30], "num-classes": 2,
              "task": "classification"}
    assert TrainRequest.from_config(config, run_id="1").precision == "fp32"
    with pytest.raises(RequestError, match="unknown precision 'fp16'; choose one of: fp32, bf16"):
        TrainRequest.from_config({**config, "precision": "fp16"}, run_id="1")
