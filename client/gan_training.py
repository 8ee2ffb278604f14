"""Local training of a GAN (models.gan.GAN) on a node.

Only the discriminator D ever sees real records, so only D is private: it is wrapped for DP-SGD
(Poisson sampling of the real records, per-sample clipping, noise) in the family's
grad_sample_mode, and each D step forwards the real batch and a fixed number of generated samples
together and backpropagates once (models.gan.train_step; a fixed fake count keeps one record's
influence at one clipped gradient). The generator G learns only from D's outputs on generated
samples: post-processing of the private D, so its step needs no clipping or noise. Both networks
are federated (the node uploads both); the ledger charges D's DP-SGD steps, which is what the
returned `steps` counts.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from fedsafe.models.gan import train_step

from .data import ArrayDataset
from .dp_modes import make_private
from .regularize import l1_proximal_step, l1_weights, random_shifts
from .training import (
    DPSpendRecorder, RandomStreams, TrainOutcome, TrainSettings, _tensor_dataset, make_optimizer, poisson_loader,
    round_batches, scheduled_lr,
)


class _FrozenOptimizer:
    """Stands in for G's optimizer when every generator parameter is frozen."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass

    def step(self) -> None:
        pass


def _optimizer(settings: TrainSettings, params) -> torch.optim.Optimizer:
    """The run's optimizer; Adam with beta1 = 0.5, the usual choice for GANs (Radford et al., 2016):
    the default 0.9 carries momentum across the two players' moves and destabilises them."""
    if settings.optimizer == "adam":
        return torch.optim.Adam(params, lr=scheduled_lr(settings), betas=(0.5, 0.999), weight_decay=settings.weight_decay)
    return make_optimizer(settings.optimizer, params, scheduled_lr(settings), settings.momentum, settings.weight_decay)


def train_gan(gan, task, data: ArrayDataset, settings: TrainSettings, device: torch.device,
              seed: int | None = None) -> TrainOutcome:
    streams = None if seed is None else RandomStreams.seeded(seed, device)
    sampling = None if streams is None else streams.sampling
    on_device = None if streams is None else streams.device
    gan.to(device)
    gan.train()
    d_params = [p for p in gan.discriminator.parameters() if p.requires_grad]
    g_params = [p for p in gan.generator.parameters() if p.requires_grad]
    d_optimizer = _optimizer(settings, d_params)
    g_optimizer = _optimizer(settings, g_params) if g_params else _FrozenOptimizer()

    private = None
    if settings.noise_multiplier is None:
        loader = DataLoader(_tensor_dataset(data), batch_size=settings.batch_size, shuffle=True, generator=sampling)
        fake_count = None  # as many fakes as real records in the batch
        discriminator, d_criterion, recorder = None, None, None
    else:
        loader = poisson_loader(data, settings.batch_size, sampling)
        real_expected = max(1, round(len(data) * loader.sample_rate))
        fake_count = real_expected  # fixed: it must not depend on the (data-dependent) Poisson batch
        private = make_private(
            gan.discriminator, d_optimizer, task.per_sample_loss, settings.grad_sample_mode,
            noise_multiplier=settings.noise_multiplier, max_grad_norm=settings.max_grad_norm,
            expected_batch_size=real_expected + fake_count, generator=on_device,
        )
        d_optimizer, discriminator, d_criterion = private.optimizer, private.module, private.criterion
        recorder = DPSpendRecorder(loader.sample_rate)
        d_optimizer.attach_step_hook(recorder)

    penalised = l1_weights(gan.parameters()) if settings.l1 > 0 else []
    losses: list[float] = []
    plain_steps = 0
    try:
        for x, _y in round_batches(loader, settings.local_epochs, settings.local_steps):
            x = x.to(device)
            if settings.augment:
                x = random_shifts(x, on_device)
            # An empty Poisson batch still makes a DP step of D: on the fixed number of fakes.
            d_loss, _g_loss = train_step(
                gan, x, d_optimizer, g_optimizer, discriminator=discriminator, d_criterion=d_criterion,
                fake_count=fake_count, generator=on_device,
            )
            losses.append(d_loss)
            l1_proximal_step(penalised, scheduled_lr(settings) * settings.l1)
            plain_steps += 1
    finally:
        if private is not None:
            private.close()
    return TrainOutcome.of(plain_steps, recorder, losses, len(data))
