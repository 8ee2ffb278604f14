"""Local training on a node: DP-SGD through Opacus (Poisson sampling, per-sample clipping, noise),
or plain SGD when the run is not private."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import warnings

from models.tasks import ClassificationTask

from .data import ArrayDataset

OPTIMIZERS = ("sgd", "adam", "rmsprop")

# Opacus' hooks fire on module outputs when inputs need no grad (always, for data): expected, harmless.
warnings.filterwarnings("ignore", message="Full backward hook is firing")


@dataclass(frozen=True)
class TrainSettings:
    local_epochs: int = 1
    batch_size: int = 32
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    noise_multiplier: float | None = None  # None: not private
    proximal_mu: float = 0.0  # FedProx: μ of the proximal term μ/2·||w − w_global||²; 0: none
    grad_sample_mode: str = "hooks"


@dataclass(frozen=True)
class TrainOutcome:
    steps: int  # optimizer steps taken (each one a DP-SGD step when private)
    mean_loss: float
    num_examples: int


def make_optimizer(name: str, params, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS)}")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but this machine has no CUDA GPU")
    return torch.device(device)


def _tensor_dataset(data: ArrayDataset) -> TensorDataset:
    return TensorDataset(torch.as_tensor(data.x), torch.as_tensor(data.y))


def poisson_loader(data: ArrayDataset, batch_size: int, generator: torch.Generator | None = None):
    """Opacus' Poisson-sampling loader: each sample joins each batch with probability q.

    Its `sample_rate` and `len()` (batches per epoch) are what the accountant must be told; they come
    from the loader itself, not from n / batch_size, which is what mis-calibration looks like.
    """
    from opacus.data_loader import DPDataLoader

    plain = DataLoader(_tensor_dataset(data), batch_size=min(batch_size, len(data)))
    return DPDataLoader.from_data_loader(plain, generator=generator)


def poisson_schedule(num_examples: int, batch_size: int) -> tuple[float, int]:
    """(sample rate, batches per epoch) of the Poisson loader for `num_examples` samples."""
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    batches = len(DataLoader(range(num_examples), batch_size=min(batch_size, num_examples)))
    sampler = UniformWithReplacementSampler(num_samples=num_examples, sample_rate=1 / batches)
    return sampler.sample_rate, len(sampler)


def train(
    model: nn.Module,
    task: ClassificationTask,
    data: ArrayDataset,
    settings: TrainSettings,
    device: torch.device,
    generator: torch.Generator | None = None,
) -> TrainOutcome:
    """Train `model` in place for `settings.local_epochs` epochs over `data`.

    With `proximal_mu` > 0 (FedProx) the objective gains μ/2·||w − w_global||², w_global being the
    weights the model holds when called. Without DP it is added to the loss. Under DP-SGD it cannot be:
    Opacus builds the update from per-sample gradients only, so a data-independent term in the loss
    would be silently dropped. Its gradient μ(w − w_global) is added to the privatised gradient after
    clipping and noise instead (post-processing: it costs no ε).
    """
    model.to(device)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(settings.optimizer, trainable, settings.lr, settings.momentum, settings.weight_decay)
    mu = float(settings.proximal_mu)
    anchors = [p.detach().clone() for p in trainable] if mu > 0 else []
    if settings.noise_multiplier is None:
        loader = DataLoader(_tensor_dataset(data), batch_size=settings.batch_size, shuffle=True, generator=generator)
        wrapped, steps_taken = model, None
    else:
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        loader = poisson_loader(data, settings.batch_size, generator)
        wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True,
                                   force_functorch=settings.grad_sample_mode == "functorch")
        optimizer = DPOptimizer(
            optimizer,
            noise_multiplier=settings.noise_multiplier,
            max_grad_norm=settings.max_grad_norm,
            expected_batch_size=max(1, round(len(data) * loader.sample_rate)),
            loss_reduction="mean",
            generator=generator,
        )
        steps_taken = [0]

        def after_noise(_opt) -> None:
            steps_taken[0] += 1
            for param, anchor in zip(trainable, anchors):
                if param.grad is not None:
                    param.grad.add_(param.detach() - anchor, alpha=mu)

        optimizer.attach_step_hook(after_noise)

    losses: list[float] = []
    plain_steps = 0
    try:
        for _ in range(settings.local_epochs):
            for x, y in loader:
                x, y = x.to(device), y.to(device)
                optimizer.zero_grad(set_to_none=True)
                outputs = wrapped(x)
                if len(y) == 0:
                    # An empty Poisson batch is still a DP-SGD step (noise alone): run it through the
                    # model so Opacus sees zero per-sample gradients, not missing ones.
                    loss = outputs.sum() * 0.0
                else:
                    loss = task.loss(outputs, y)
                    losses.append(float(loss.detach()))
                if anchors and settings.noise_multiplier is None:
                    loss = loss + (mu / 2) * sum(((p - a) ** 2).sum() for p, a in zip(trainable, anchors))
                loss.backward()
                optimizer.step()
                plain_steps += 1
    finally:
        if settings.noise_multiplier is not None:
            wrapped._close()
    steps = plain_steps if steps_taken is None else steps_taken[0]
    return TrainOutcome(steps=steps, mean_loss=float(np.mean(losses)) if losses else float("nan"),
                        num_examples=len(data))
