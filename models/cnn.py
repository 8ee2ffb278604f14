"""Convolutional network for small images."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .registry import DataSpec, ModelConfigError, choice_option, float_option, int_option, register_model


class CNN(nn.Sequential):
    """The layers in order; inputs are first given the standard (row-major, NCHW) memory layout.

    Why: a (N, 1, H, W) batch can have strides that also read as channels_last (numpy views such as
    ``images[:, None]`` give (H*W, 1, W, 1)); convolutions then keep channels_last, and Opacus 1.6's
    hooks-mode Conv2d grad sampler (``opacus.utils.tensor_utils.unfold2d``: F.pad + as_strided
    assuming row-major layout) silently returns wrong per-sample gradients for the later convs
    (all zeros on the digits set). A standard layout avoids it at the cost of one copy.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4 and x.stride() != _row_major_strides(x.shape):
            x = x.clone(memory_format=torch.contiguous_format)
        return super().forward(x)


def _row_major_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


@register_model("cnn", grad_sample_mode="ew", tasks=("classification", "regression"), inputs="image")
def build_cnn(spec: DataSpec, options: Mapping[str, Any]) -> nn.Module:
    """Two conv blocks and a linear head: small on purpose, since under DP-SGD every extra parameter
    adds noise to the update (on digits at ε=3 this beat a deeper head with GroupNorm, 0.54 vs 0.36)."""
    if len(spec.input_shape) != 3:
        raise ModelConfigError(
            f"model 'cnn' needs image data shaped (channels, height, width); got {spec.input_shape}"
        )
    channels, height, width = spec.input_shape
    if height < 4 or width < 4:
        raise ModelConfigError(f"model 'cnn' needs images of at least 4x4 pixels; got {height}x{width}")
    filters = int_option(options, "filters", 16, minimum=1)
    dropout = float_option(options, "dropout", 0.0, minimum=0.0, below=1.0)
    norm = choice_option(options, "norm", "none", ("none", "group"))

    def block(c_in: int, c_out: int) -> list[nn.Module]:
        # GroupNorm, never BatchNorm: BatchNorm mixes the samples of a batch, which per-sample DP forbids.
        layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, padding=1)]
        if norm == "group":
            layers.append(nn.GroupNorm(min(4, c_out), c_out))
        return [*layers, nn.Tanh(), nn.MaxPool2d(2)]

    head: list[nn.Module] = [nn.AdaptiveAvgPool2d((2, 2)), nn.Flatten()]
    if dropout > 0:
        head.append(nn.Dropout(dropout))
    head.append(nn.Linear(2 * filters * 4, max(spec.num_classes, 1)))
    return CNN(*block(channels, filters), *block(filters, 2 * filters), *head)
