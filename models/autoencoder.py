"""Dense autoencoder: flatten -> encoder -> bottleneck -> decoder -> reshape to the input's shape.

For reconstruction and anomaly scoring (fedsafe.models.tasks.ReconstructionTask: per-sample reconstruction
error as the anomaly score). Trained on inputs alone; under DP-SGD each record's influence on the
weights is clipped and noised like any other loss.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .registry import DataSpec, choice_option, float_option, int_option, register_model

OUTPUT_ACTIVATIONS = {"linear": nn.Identity, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}


def dense_stack(sizes: list[int], dropout: float = 0.0) -> list[nn.Module]:
    """Linear layers through `sizes`, Tanh (and dropout) between them, none after the last."""
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
    return layers


class Autoencoder(nn.Module):
    def __init__(self, input_shape: tuple[int, ...], hidden: int, layers: int, latent_dim: int,
                 dropout: float, output_activation: str) -> None:
        super().__init__()
        self.input_shape = tuple(input_shape)
        width = math.prod(input_shape)
        sizes = [width] + [hidden] * layers + [latent_dim]
        self.encoder = nn.Sequential(nn.Flatten(), *dense_stack(sizes, dropout))
        self.decoder = nn.Sequential(
            *dense_stack(sizes[::-1], dropout), OUTPUT_ACTIVATIONS[output_activation](),
            nn.Unflatten(1, self.input_shape),
        )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


@register_model("autoencoder", grad_sample_mode="ew", tasks=("reconstruction",))
def build_autoencoder(spec: DataSpec, options: Mapping[str, Any]) -> nn.Module:
    """Options: hidden (64), layers (1 hidden layer on each side), latent_dim (16, the bottleneck),
    dropout (0.0), output_activation ("linear"; "sigmoid" for data in [0, 1], "tanh" for [-1, 1])."""
    hidden = int_option(options, "hidden", 64, minimum=1)
    layers = int_option(options, "layers", 1, minimum=0)
    latent_dim = int_option(options, "latent_dim", 16, minimum=1)
    dropout = float_option(options, "dropout", 0.0, minimum=0.0, below=1.0)
    output = choice_option(options, "output_activation", "linear", OUTPUT_ACTIVATIONS)
    return Autoencoder(spec.input_shape, hidden, layers, latent_dim, dropout, output)
