"""Multi-layer perceptron for tabular data."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from torch import nn

from .registry import DataSpec, float_option, int_option, register_model


@register_model("mlp", grad_sample_mode="ew", tasks=("classification", "regression"))
def build_mlp(spec: DataSpec, options: Mapping[str, Any]) -> nn.Module:
    hidden = int_option(options, "hidden", 64, minimum=1)
    depth = int_option(options, "depth", 1, minimum=0)
    dropout = float_option(options, "dropout", 0.0, minimum=0.0, below=1.0)
    in_features = math.prod(spec.input_shape)
    out_features = max(spec.num_classes, 1)
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for _ in range(depth):
        # Tanh rather than ReLU: bounded activations keep clipped DP-SGD gradients informative
        # (Papernot et al., "Tempered Sigmoid Activations for Deep Learning with DP", 2021).
        layers += [nn.Linear(width, hidden), nn.Tanh()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = hidden
    layers.append(nn.Linear(width, out_features))
    return nn.Sequential(*layers)
