"""Convolutional network for small images."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .registry import DataSpec, ModelConfigError, float_option, int_option, register_model


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


@register_model("cnn", grad_sample_mode="ew", tasks=("classification", "regression"))
def build_cnn(spec: DataSpec, options: Mapping[str, Any]) -> nn.Module:
    if len(spec.input_shape) != 3:
        raise ModelConfigError(
            f"model 'cnn' needs image data shaped (channels, height, width); got {spec.input_shape}"
        )
    channels, height, width = spec.input_shape
    filters = int_option(options, "filters", 16, minimum=1)
    dropout = float_option(options, "dropout", 0.0, minimum=0.0, below=1.0)
    # GroupNorm, not BatchNorm: BatchNorm mixes samples of a batch, which per-sample DP-SGD forbids.
    features = nn.Sequential(
        nn.Conv2d(channels, filters, 3, padding=1),
        nn.GroupNorm(min(4, filters), filters),
        nn.Tanh(),
        nn.MaxPool2d(2),
        nn.Conv2d(filters, 2 * filters, 3, padding=1),
        nn.GroupNorm(min(4, 2 * filters), 2 * filters),
        nn.Tanh(),
        nn.AdaptiveAvgPool2d((2, 2)),
        nn.Flatten(),
    )
    head: list[nn.Module] = []
    if dropout > 0:
        head.append(nn.Dropout(dropout))
    head += [nn.Linear(2 * filters * 4, 64), nn.Tanh(), nn.Linear(64, max(spec.num_classes, 1))]
    del height, width  # any size: the adaptive pool fixes the head's input
    return CNN(features, *head)
