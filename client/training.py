"""Local training on a node: DP-SGD through Opacus (Poisson sampling, per-sample clipping, noise),
or plain SGD when the run is not private.

Any task (fedsafe.models.tasks): the loss compares the model's outputs with ``task.targets(x, y)`` (labels,
or the inputs themselves for reconstruction), and per-sample gradients are computed in the model
family's grad_sample_mode through fedsafe.client.dp_modes.make_private. GANs train in fedsafe.client.gan_training
(DP-SGD on the discriminator only)."""

from __future__ import annotations

import contextlib
import hashlib
import math
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import warnings

from fedsafe.models.tasks import Task
from fedsafe.picked_defaults import FIXED_ROUNDS
from fedsafe.settings import RunSettings, check_device_name

from .data import ArrayDataset
from .image_folder import ImageFolderDataset
from .dp_modes import make_private
from .precision import autocast, check_fp32_grad_samples, check_precision, fp32_outputs
from .regularize import l1_proximal_step, l1_weights, random_shifts

OPTIMIZERS = ("sgd", "adam", "rmsprop")

# Opacus' hooks fire on module outputs when inputs need no grad (always, for data): expected, harmless.
warnings.filterwarnings("ignore", message="Full backward hook is firing")


_RUN = RunSettings()  # the run settings' declared defaults (fedsafe.settings), one source for both sides;
# for the settings the coordinator picks, FIXED_ROUNDS: the per-round values it picks for a run whose rounds
# are set (fedsafe.picked_defaults). A node itself always trains with what the train message carries.


@dataclass(frozen=True)
class TrainSettings:
    """How one round of local training runs: the run's settings as the train message carried them
    (`of`), the noise the ledger fixed, and the model family's per-sample gradient mode."""

    local_epochs: int = FIXED_ROUNDS["local_epochs"]
    local_steps: int = _RUN.local_steps  # > 0: this many steps per round instead of local_epochs epochs
    batch_size: int = FIXED_ROUNDS["batch_size"]
    optimizer: str = _RUN.optimizer
    lr: float = FIXED_ROUNDS["lr"]
    lr_schedule: str = FIXED_ROUNDS["lr_schedule"]  # the lr of round server_round of num_rounds: scheduled_lr
    server_round: int = 1
    num_rounds: int = 1
    momentum: float = _RUN.momentum
    weight_decay: float = _RUN.weight_decay
    max_grad_norm: float = _RUN.max_grad_norm
    noise_multiplier: float | None = None  # None: not private
    proximal_mu: float = _RUN.proximal_mu  # FedProx: μ of the proximal term μ/2·||w − w_global||²; 0: none
    grad_sample_mode: str = "hooks"  # Opacus' per-sample gradient mode (models.preferred_grad_sample_mode)
    l1: float = _RUN.l1  # L1 penalty, a proximal step after each optimizer step (client/regularize.py)
    augment: bool = _RUN.augment  # random one-pixel shifts of each image (client/regularize.py)
    # Distributed DP: the noisy gradient sum is divided by the run's batch size, the same on every node,
    # not by this node's expected batch, so that one record weighs the same in the SecAgg+ sum wherever it is.
    distributed_dp: bool = _RUN.distributed_dp
    precision: str = _RUN.precision  # fp32, or bf16 autocast with fp32 per-sample clipping (client/precision.py)

    @classmethod
    def of(cls, request, **others) -> TrainSettings:
        """The settings `request` (a fedsafe.client.policy.TrainRequest) carries, and `others`."""
        carried = {f.name: getattr(request, f.name) for f in fields(cls) if hasattr(request, f.name)}
        return cls(**{**carried, **others})


@dataclass(frozen=True)
class TrainOutcome:
    steps: int  # optimizer steps taken (each one a DP-SGD step when private)
    mean_loss: float
    num_examples: int
    # Under DP: what the DP optimizer did, as Opacus' accountant recorded it step by step — [(σ, q, steps)]
    # (DPSpendRecorder). The ledger settles the round from this, not from the settings it was asked for.
    dp_spend: tuple[tuple[float, float, int], ...] | None = None

    @classmethod
    def of(cls, plain_steps: int, recorder: DPSpendRecorder | None, losses: list[float],
           num_examples: int) -> TrainOutcome:
        """`recorder` saw every step of the DP optimizer (None when not private): its steps are the ones charged."""
        spend = None if recorder is None else recorder.history
        return cls(steps=plain_steps if spend is None else sum(n for _, _, n in spend),
                   mean_loss=float(np.mean(losses)) if losses else float("nan"), num_examples=num_examples,
                   dp_spend=spend)


class DPSpendRecorder:
    """A DP optimizer's step hook that records each noised step as Opacus' own accountant does: the σ the
    optimizer noised with and the Poisson loader's sample rate (× accumulated batches). Call it from the
    optimizer's one step hook; `then` runs after it (e.g. FedProx's proximal gradient)."""

    def __init__(self, sample_rate: float, then=None) -> None:
        from opacus.accountants import RDPAccountant

        self._accountant = RDPAccountant()
        self._record = self._accountant.get_optimizer_hook_fn(sample_rate)
        self._then = then

    def __call__(self, optimizer) -> None:
        self._record(optimizer)
        if self._then is not None:
            self._then(optimizer)

    @property
    def history(self) -> tuple[tuple[float, float, int], ...]:
        return tuple((float(s), float(q), int(n)) for s, q, n in self._accountant.history)


def scheduled_lr(settings: TrainSettings) -> float:
    """The learning rate of this round: `lr`, or under the cosine schedule lr·(1 + cos(π(r−1)/R))/2 for
    round r of R (round 1 at lr; a round past R, in a run extended at resume, at the last round's)."""
    if settings.lr_schedule == "constant":
        return settings.lr
    if settings.lr_schedule == "cosine":
        done = min(settings.server_round - 1, settings.num_rounds - 1) / max(settings.num_rounds, 1)
        return settings.lr * (1 + math.cos(math.pi * done)) / 2
    raise ValueError(f"unknown lr-schedule {settings.lr_schedule!r}; choose one of: constant, cosine")


def make_optimizer(name: str, params, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS)}")


def resolve_device(device: str) -> torch.device:
    """The training device named `device` (auto: CUDA when there is one); ValueError, in one line, when
    the name is not auto, cpu, cuda or cuda:N or the machine cannot train there."""
    check_device_name(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but this machine has no CUDA GPU "
                             "(torch.cuda.is_available() is False)")
        index = torch.device(device).index
        if index is not None and index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} asked for, but this machine has "
                             f"{torch.cuda.device_count()} CUDA GPU(s) (cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    return torch.device(device)


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from `parts`, different whenever any part differs (a hash, not arithmetic, so
    that no two tuples of parts can land on one seed)."""
    digest = hashlib.sha256(repr(tuple(parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


@dataclass(frozen=True)
class RandomStreams:
    """The seeded random streams of one round of local training (simulations and tests only; a real
    node draws from PyTorch's unseeded default generators).

    A generator draws only for its own device: Opacus draws the DP noise with
    ``torch.normal(..., device=<the parameter's device>, generator=g)``, which raises when `g` lives
    elsewhere. So two streams: record sampling on the host, where the records and Opacus' Poisson
    sampler are, and noise, augmentation and GAN latents on the training device, where the model is.
    """

    sampling: torch.Generator  # the CPU: which records join each batch
    device: torch.Generator  # the training device: DP noise, augmentation shifts, GAN latents

    @classmethod
    def seeded(cls, seed: int, device: torch.device) -> RandomStreams:
        return cls(sampling=torch.Generator(device="cpu").manual_seed(derive_seed(seed, "sampling")),
                   device=torch.Generator(device=device).manual_seed(derive_seed(seed, "device")))


def _tensor_dataset(data: ArrayDataset | ImageFolderDataset):
    """`data` as a torch Dataset: in-memory arrays as tensors; an image folder is one already, reading each
    image when a batch draws it (Poisson sampling draws indices over its length alike)."""
    if isinstance(data, ImageFolderDataset):
        return data
    return TensorDataset(torch.as_tensor(data.x), torch.as_tensor(data.y))


def poisson_loader(data: ArrayDataset, batch_size: int, generator: torch.Generator | None = None):
    """Opacus' Poisson-sampling loader: each sample joins each batch with probability q.

    Its `sample_rate` and `len()` (batches per epoch) are what the accountant must be told; they come
    from the loader itself, not from n / batch_size, which is what mis-calibration looks like.
    """
    from opacus.data_loader import DPDataLoader

    plain = DataLoader(_tensor_dataset(data), batch_size=min(batch_size, len(data)))
    return DPDataLoader.from_data_loader(plain, generator=generator)


def round_steps(num_examples: int, batch_size: int, local_epochs: int, local_steps: int = 0) -> tuple[float, int]:
    """(sample rate, DP-SGD steps) of one round: `local_steps` Poisson batches, or `local_epochs` passes."""
    sample_rate, batches = poisson_schedule(num_examples, batch_size)
    return sample_rate, local_steps or batches * local_epochs


def round_batches(loader, local_epochs: int, local_steps: int = 0):
    """The batches of one round: `local_steps` of them (the loader re-iterated as needed; each Poisson
    batch is drawn afresh, so any count is exact for the accountant), or `local_epochs` passes."""
    if not local_steps:
        for _ in range(local_epochs):
            yield from loader
        return
    taken = 0
    while True:
        for batch in loader:
            yield batch
            taken += 1
            if taken == local_steps:
                return


def poisson_schedule(num_examples: int, batch_size: int) -> tuple[float, int]:
    """(sample rate, batches per epoch) of the Poisson loader for `num_examples` samples."""
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    batches = len(DataLoader(range(num_examples), batch_size=min(batch_size, num_examples)))
    sampler = UniformWithReplacementSampler(num_samples=num_examples, sample_rate=1 / batches)
    return sampler.sample_rate, len(sampler)


def train(
    model: nn.Module,
    task: Task,
    data: ArrayDataset,
    settings: TrainSettings,
    device: torch.device,
    seed: int | None = None,
) -> TrainOutcome:
    """Train `model` in place for `settings.local_epochs` epochs over `data` on `device`; `seed` makes
    the round's sampling and noise reproducible (RandomStreams), None draws them unseeded.

    Under DP the outcome's `steps` counts the DP-SGD steps the optimizer took, an empty Poisson
    batch (a noise-only step) included: exactly what the ledger composes.

    With `proximal_mu` > 0 (FedProx) the objective gains μ/2·||w − w_global||², w_global being the
    weights the model holds when called. Without DP it is added to the loss. Under DP-SGD it cannot be:
    Opacus builds the update from per-sample gradients only, so a data-independent term in the loss
    would be silently dropped. Its gradient μ(w − w_global) is added to the privatised gradient after
    clipping and noise instead (post-processing: it costs no ε).
    """
    check_precision(settings.precision, settings.grad_sample_mode if settings.noise_multiplier is not None else None,
                    task.name)
    if task.name == "generation":
        from .gan_training import train_gan

        return train_gan(model, task, data, settings, device, seed)
    with fp32_outputs(model) if settings.precision == "bf16" else contextlib.nullcontext():
        return _train(model, task, data, settings, device, seed)


def _train(model: nn.Module, task: Task, data: ArrayDataset, settings: TrainSettings, device: torch.device,
           seed: int | None) -> TrainOutcome:
    streams = None if seed is None else RandomStreams.seeded(seed, device)
    sampling = None if streams is None else streams.sampling
    on_device = None if streams is None else streams.device
    model.to(device)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    lr = scheduled_lr(settings)
    optimizer = make_optimizer(settings.optimizer, trainable, lr, settings.momentum, settings.weight_decay)
    mu = float(settings.proximal_mu)
    anchors = [p.detach().clone() for p in trainable] if mu > 0 else []
    if settings.noise_multiplier is None:
        loader = DataLoader(_tensor_dataset(data), batch_size=settings.batch_size, shuffle=True, generator=sampling)
        wrapped, recorder, criterion, private = model, None, task.loss, None
    else:
        loader = poisson_loader(data, settings.batch_size, sampling)
        private = make_private(
            model, optimizer, task.per_sample_loss, settings.grad_sample_mode,
            noise_multiplier=settings.noise_multiplier,
            max_grad_norm=settings.max_grad_norm,
            expected_batch_size=(settings.batch_size if settings.distributed_dp
                                 else max(1, round(len(data) * loader.sample_rate))),
            generator=on_device,
        )
        wrapped, optimizer, criterion = private.module, private.optimizer, private.criterion

        def proximal_gradient(_opt) -> None:  # Opacus calls its one step hook after clipping and noise
            for param, anchor in zip(trainable, anchors):
                if param.grad is not None:
                    param.grad.add_(param.detach() - anchor, alpha=mu)

        recorder = DPSpendRecorder(loader.sample_rate, then=proximal_gradient if anchors else None)
        optimizer.attach_step_hook(recorder)

    penalised = l1_weights(model.parameters()) if settings.l1 > 0 else []
    losses: list[float] = []
    plain_steps = 0
    try:
        for x, y in round_batches(loader, settings.local_epochs, settings.local_steps):
            x, y = x.to(device), y.to(device)
            if len(y) == 0:
                # An empty Poisson batch is still a DP-SGD step: noise alone (see noise_only_step).
                private.noise_only_step()
            else:
                if settings.augment:
                    x = random_shifts(x, on_device)
                optimizer.zero_grad(set_to_none=True)
                with autocast(device, settings.precision):
                    outputs = wrapped(x)
                loss = criterion(outputs.float(), task.targets(x, y))  # the loss in fp32 in either precision
                losses.append(float(loss.detach()))
                if anchors and private is None:
                    loss = loss + (mu / 2) * sum(((p - a) ** 2).sum() for p, a in zip(trainable, anchors))
                loss.backward()
                if private is not None and settings.precision == "bf16":
                    check_fp32_grad_samples(trainable)
                optimizer.step()
            l1_proximal_step(penalised, lr * settings.l1)
            plain_steps += 1
    finally:
        if private is not None:
            private.close()
    return TrainOutcome.of(plain_steps, recorder, losses, len(data))
