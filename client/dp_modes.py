"""Opacus' four ways of computing per-sample gradients behind one call.

``make_private(model, optimizer, per_sample_loss, mode, ...)`` returns the wrapped module, the DP
optimizer and the loss to call, for `mode` in models.GRAD_SAMPLE_MODES:

* ``hooks``: GradSampleModule, per-layer formulas from module hooks (Opacus' default);
* ``functorch``: GradSampleModule(force_functorch=True), torch.func.vmap per layer;
* ``ew``: GradSampleModuleExpandedWeights, torch's ExpandedWeights;
* ``ghost``: GradSampleModuleFastGradientClipping with ghost clipping: per-sample gradient *norms*
  without per-sample gradients, then a second backward pass on the rescaled loss. The loss it
  returns is Opacus' DP loss, whose ``backward()`` runs both passes.

The model family's preferred mode is ``models.preferred_grad_sample_mode(name)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

PerSampleLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class _Criterion:
    """A loss callable with the `reduction` attribute Opacus' ghost-clipping loss switches."""

    def __init__(self, per_sample_loss: PerSampleLoss) -> None:
        self.per_sample_loss = per_sample_loss
        self.reduction = "mean"

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        losses = self.per_sample_loss(outputs, targets)
        if self.reduction == "none":
            return losses
        return losses.mean() if self.reduction == "mean" else losses.sum()


class _MeanValueSumGradient(_Criterion):
    """Reads as the mean loss but backpropagates the sum of the per-sample losses.

    With ExpandedWeights in loss_reduction "sum" mode this yields per-sample gradients of the
    per-sample losses directly, i.e. what "mean" mode computes, without "mean" mode's extra pass
    over all per-sample gradients (multiplying them by the batch size). The DP optimizer still
    averages ("mean"): it divides the noised sum by the expected batch size.
    """

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        losses = self.per_sample_loss(outputs, targets)
        total = losses.sum()
        return losses.mean().detach() + (total - total.detach())


@dataclass
class PrivateModel:
    module: nn.Module  # the Opacus wrapper: call it instead of the model
    optimizer: torch.optim.Optimizer  # a DPOptimizer (clips, noises, scales)
    criterion: Callable[[torch.Tensor, torch.Tensor], object]  # (outputs, targets) -> loss with .backward()
    mode: str

    def close(self) -> None:
        """Remove Opacus' hooks from the model."""
        remove = getattr(self.module, "_close", None)
        if remove is not None:
            remove()

    def noise_only_step(self) -> None:
        """The DP-SGD step of an empty Poisson batch: no per-sample gradient, so the update is the
        Gaussian noise alone (scaled, hooked and applied as any step). Not every mode can run a
        batch of zero samples through the model (ew: "Batch size must be positive"; functorch and
        ghost fail on some layers), so the empty per-sample gradients are set here directly."""
        self.optimizer.zero_grad(set_to_none=True)
        for p in self.optimizer.params:
            if self.mode == "ghost":
                p.grad = torch.zeros_like(p)  # ghost clipping's optimizer reads the clipped sum from .grad
            else:
                p.grad_sample = p.new_zeros((0, *p.shape))
        self.optimizer.step()


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    per_sample_loss: PerSampleLoss,
    mode: str,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: int,
    generator: torch.Generator | None = None,
) -> PrivateModel:
    """Wrap `model` and `optimizer` for DP-SGD with per-sample gradients computed in `mode`.

    `per_sample_loss(outputs, targets)` returns the (B,) losses (e.g. a fedsafe.models.tasks task's
    ``per_sample_loss``); the returned criterion averages them (loss_reduction "mean").
    """
    from opacus import GradSampleModule
    from opacus.grad_sample import GradSampleModuleExpandedWeights, GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    from fedsafe.models.registry import GRAD_SAMPLE_MODES

    dp_args = dict(
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size,
        loss_reduction="mean",
        generator=generator,
    )
    criterion = _Criterion(per_sample_loss)
    if mode in ("hooks", "functorch"):
        module = GradSampleModule(
            model, batch_first=True, loss_reduction="mean", strict=True, force_functorch=mode == "functorch"
        )
        return PrivateModel(module, DPOptimizer(optimizer, **dp_args), criterion, mode)
    if mode == "ew":
        module = GradSampleModuleExpandedWeights(model, batch_first=True, loss_reduction="sum")
        return PrivateModel(module, DPOptimizer(optimizer, **dp_args), _MeanValueSumGradient(per_sample_loss), mode)
    if mode == "ghost":
        module = GradSampleModuleFastGradientClipping(
            model, batch_first=True, loss_reduction="mean", strict=True, max_grad_norm=max_grad_norm,
            use_ghost_clipping=True,
        )
        dp_optimizer = DPOptimizerFastGradientClipping(optimizer, **dp_args)
        return PrivateModel(
            module, dp_optimizer, DPLossFastGradientClipping(module, dp_optimizer, criterion, "mean"), mode
        )
    raise ValueError(f"unknown grad_sample_mode {mode!r}; choose one of: {', '.join(GRAD_SAMPLE_MODES)}")


class NotPrivatisable(ValueError):
    """A model that DP-SGD cannot train as built (a layer Opacus cannot privatise)."""


def check_no_batchnorm(model: nn.Module) -> None:
    """Raise NotPrivatisable, naming each BatchNorm layer: it mixes the samples of a batch, so no
    per-sample gradient (and no DP-SGD guarantee) exists for it. Cheap: nodes check before reserving ε."""
    from fedsafe.models.registry import FIX_BATCHNORM_OPTION

    batchnorms = [f"{name or '(the model)'} ({type(layer).__name__})" for name, layer in model.named_modules()
                  if isinstance(layer, nn.modules.batchnorm._BatchNorm)]
    if batchnorms:
        raise NotPrivatisable(
            f"DP-SGD cannot train this model: BatchNorm layer(s) {', '.join(batchnorms)} mix the samples of a "
            f"batch; use GroupNorm or LayerNorm, or add model option {FIX_BATCHNORM_OPTION}=true to replace them "
            f"with GroupNorm"
        )


def check_privatisable(
    model: nn.Module, per_sample_loss: PerSampleLoss, mode: str, input_shape: tuple[int, ...],
    targets: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], precision: str = "fp32",
) -> None:
    """Raise NotPrivatisable, naming the layers, unless DP-SGD can train `model` in `mode` at `precision`
    (bf16: the trial step runs as a node's does, and its per-sample gradients must come out fp32).

    Opacus' ModuleValidator lists layers that per-sample DP forbids or cannot handle (BatchNorm
    mixes the samples of a batch; nn.LSTM/GRU/MultiheadAttention need Opacus' replacements); a
    step on two zero samples, on a copy, catches what only shows in the chosen mode. Called by the
    coordinator before round 1, so a bad model fails the run at once, not on every node.
    """
    import copy

    from opacus.validators import ModuleValidator

    check_no_batchnorm(model)
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        listed = "; ".join(str(e) for e in errors[:5])
        raise NotPrivatisable(f"DP-SGD cannot train this model: {listed}")
    from .precision import autocast, check_fp32_grad_samples, fp32_outputs

    trial = copy.deepcopy(model)
    trial.train()
    params = [p for p in trial.parameters() if p.requires_grad]
    bf16 = precision == "bf16"
    try:
        with fp32_outputs(trial) if bf16 else contextlib.nullcontext():
            private = make_private(trial, torch.optim.SGD(params, lr=0.0), per_sample_loss, mode,
                                   noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=2)
            try:
                x = torch.zeros(2, *input_shape)
                private.optimizer.zero_grad(set_to_none=True)
                with autocast(torch.device("cpu"), precision):
                    outputs = private.module(x)
                private.criterion(outputs.float(), targets(x, torch.zeros(2, dtype=torch.long))).backward()
                if bf16:
                    check_fp32_grad_samples(params)
                private.optimizer.step()
            finally:
                private.close()
    except Exception as err:  # noqa: BLE001 - whatever Opacus raises, the run cannot use this model
        at = f" at precision {precision}" if bf16 else ""
        raise NotPrivatisable(
            f"DP-SGD cannot train this model in Opacus grad_sample_mode {mode!r}{at}: {type(err).__name__}: {err}"
        ) from None
