"""GRU sequence classifier, its cell written from nn.Linear layers (see recurrent.py for why)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .recurrent import GatedRecurrentLayer, build_recurrent
from .registry import DataSpec, register_model


class GRULayer(GatedRecurrentLayer):
    """nn.GRU's function (gates in its order: reset, update, new) with plain Linears:
    `input` holds weight_ih/bias_ih, `recurrent` weight_hh/bias_hh."""

    gates = 3

    def cell(self, x_proj, h_proj, state):
        (h,) = state
        x_r, x_z, x_n = x_proj.chunk(3, dim=-1)
        h_r, h_z, h_n = h_proj.chunk(3, dim=-1)
        r = torch.sigmoid(x_r + h_r)
        z = torch.sigmoid(x_z + h_z)
        n = torch.tanh(x_n + r * h_n)
        return ((1 - z) * n + z * h,)


@register_model("gru", grad_sample_mode="hooks", tasks=("classification", "regression"), inputs="sequence")
def build_gru(spec: DataSpec, options: Mapping[str, Any]) -> nn.Module:
    """Options: hidden (64), layers (1), dropout (0.0). Input (seq_len, features)."""
    return build_recurrent("gru", GRULayer, spec, options)
