"""Convolutional network for small images."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from .registry import DataSpec, register_model


@register_model("cnn")
def build_cnn(spec: DataSpec, options: Mapping[str, Any]) -> nn.Module:
    """Two conv blocks and a linear head: small on purpose, since under DP-SGD every extra parameter
    adds noise to the update (on digits at ε=3 this beat a deeper head with GroupNorm, 0.54 vs 0.36)."""
    if len(spec.input_shape) != 3:
        raise ValueError(
            f"model 'cnn' needs image data shaped (channels, height, width); got {spec.input_shape}"
        )
    channels, height, width = spec.input_shape
    if height < 4 or width < 4:
        raise ValueError(f"model 'cnn' needs images of at least 4x4 pixels; got {height}x{width}")
    filters = int(options.get("filters", 16))
    dropout = float(options.get("dropout", 0.0))
    norm = str(options.get("norm", "none"))
    if norm not in ("none", "group"):
        raise ValueError(f"cnn option norm must be 'none' or 'group'; got {norm!r}")

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
    return nn.Sequential(*block(channels, filters), *block(filters, 2 * filters), *head)
