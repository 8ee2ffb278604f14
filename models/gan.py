"""GAN over dense records: a generator and a discriminator in one module.

Privacy: only the discriminator ever sees real records, so DP-SGD is applied to the discriminator
alone: wrap ``gan.discriminator`` in Opacus and give the DP optimizer its parameters only. (The
GAN's forward is the discriminator too, so wrapping the whole GAN computes the same per-sample
gradients in hooks/functorch/ew mode; ghost clipping needs the discriminator alone, as it expects
a norm for every trainable parameter of what it wraps.) The generator learns only from the discriminator's outputs on
generated samples; it is a function of the (differentially private) discriminators it trained
against, so it is private by post-processing and its own step needs no clipping or noise. Its
samples carry the discriminator's (epsilon, delta) guarantee and nothing more.

One DP discriminator step forwards real and generated samples together and backpropagates once
(`train_step`). The number of generated samples in that batch must not depend on the real batch:
with Poisson sampling the real batch size is itself data-dependent, and adding fakes "one per
real" would let one record add two clipped gradients (sensitivity 2C instead of C). `train_step`
uses a fixed count (`fake_count`, default the generator's expected batch size).

Plain PyTorch: nothing here imports Opacus; `train_step` takes the wrapped model as a callable.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from .autoencoder import OUTPUT_ACTIVATIONS
from .registry import DataSpec, choice_option, float_option, int_option, register_model


def _mlp(sizes: list[int], dropout: float = 0.0) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.LeakyReLU(0.2))  # never inplace: inplace LeakyReLU breaks Opacus hooks
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
    return layers


class GAN(nn.Module):
    """`generator`: (n, latent_dim) noise -> (n, *input_shape) samples.
    `discriminator`: (n, *input_shape) -> (n,) logits, high for "real".
    forward(x) is the discriminator."""

    def __init__(self, input_shape: tuple[int, ...], latent_dim: int, hidden: int, layers: int,
                 dropout: float, output_activation: str) -> None:
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.latent_dim = latent_dim
        width = math.prod(input_shape)
        self.generator = nn.Sequential(
            *_mlp([latent_dim] + [hidden] * layers + [width]),
            OUTPUT_ACTIVATIONS[output_activation](),
            nn.Unflatten(1, self.input_shape),
        )
        self.discriminator = nn.Sequential(nn.Flatten(), *_mlp([width] + [hidden] * layers + [1], dropout), nn.Flatten(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.discriminator(x)

    def noise(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        device = next(self.parameters()).device
        return torch.randn(n, self.latent_dim, generator=generator, device=device)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """`n` generated records, without autograd."""
        with torch.no_grad():
            return self.generator(self.noise(n, generator))


@register_model("gan", grad_sample_mode="ghost", tasks=("generation",))
def build_gan(spec: DataSpec, options: Mapping[str, Any]) -> nn.Module:
    """Options: latent_dim (16), hidden (128), layers (2 hidden layers in each network), dropout
    (0.0, discriminator only), output_activation ("linear"; "sigmoid" for data in [0, 1])."""
    return GAN(
        spec.input_shape,
        latent_dim=int_option(options, "latent_dim", 16, minimum=1),
        hidden=int_option(options, "hidden", 128, minimum=1),
        layers=int_option(options, "layers", 2, minimum=1),
        dropout=float_option(options, "dropout", 0.0, minimum=0.0, below=1.0),
        output_activation=choice_option(options, "output_activation", "linear", OUTPUT_ACTIVATIONS),
    )


_bce = nn.BCEWithLogitsLoss()


def train_step(
    gan: GAN,
    real: torch.Tensor,
    d_optimizer: torch.optim.Optimizer,
    g_optimizer: torch.optim.Optimizer,
    *,
    discriminator: Callable[[torch.Tensor], torch.Tensor] | None = None,
    d_criterion: Callable[[torch.Tensor, torch.Tensor], Any] | None = None,
    fake_count: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[float, float]:
    """One discriminator step then one generator step (non-saturating loss); returns both losses.

    For DP, pass as `discriminator` the Opacus-wrapped ``gan.discriminator``, as `d_optimizer` a DP
    optimizer over its parameters (expected batch size: real + fake), and (ghost clipping only) Opacus' DP loss as `d_criterion`.
    The discriminator step forwards `real` and `fake_count` generated samples (default: as many
    as `real`; under Poisson sampling pass the expected batch size, see the module docstring)
    through `discriminator` in one batch and backpropagates once. The generator step calls
    ``gan.discriminator`` with its parameters frozen and the wrapper's hooks (if any) paused, so
    the private discriminator gets no per-sample gradients from generated data there.
    """
    discriminator = gan if discriminator is None else discriminator
    d_criterion = _bce if d_criterion is None else d_criterion
    fake_count = len(real) if fake_count is None else fake_count

    fake = gan.sample(fake_count, generator)
    batch = torch.cat([real, fake])
    targets = torch.cat([real.new_ones(len(real)), real.new_zeros(fake_count)])
    d_optimizer.zero_grad(set_to_none=True)
    d_loss = d_criterion(discriminator(batch), targets)
    d_loss.backward()
    d_optimizer.step()

    d_params = list(gan.discriminator.parameters())
    frozen = [p.requires_grad for p in d_params]
    pause = getattr(discriminator, "disable_hooks", None)
    if pause is not None:
        pause()
    try:
        for p in d_params:
            p.requires_grad_(False)
        g_optimizer.zero_grad(set_to_none=True)
        logits = gan.discriminator(gan.generator(gan.noise(fake_count, generator)))
        g_loss = _bce(logits, torch.ones_like(logits))
        g_loss.backward()
        g_optimizer.step()
    finally:
        for p, requires in zip(d_params, frozen):
            p.requires_grad_(requires)
        if pause is not None:
            discriminator.enable_hooks()  # type: ignore[attr-defined]
    return float(d_loss.detach()), float(g_loss.detach())
