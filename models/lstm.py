"""LSTM sequence classifier, its cell written from nn.Linear layers (see recurrent.py for why)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .recurrent import GatedRecurrentLayer, build_recurrent
from .registry import DataSpec, register_model


class LSTMLayer(GatedRecurrentLayer):
    """nn.LSTM's function (gates in its order: input, forget, cell, output) with plain Linears:
    `input` holds weight_ih/bias_ih, `recurrent` weight_hh/bias_hh."""

    gates = 4

    def initial_state(self, batch: int, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
        zeros = like.new_zeros(batch, self.hidden_size)
        return zeros, zeros

    def cell(self, x_proj, h_proj, state):
        _, c = state
        i, f, g, o = (x_proj + h_proj).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c


@register_model("lstm", grad_sample_mode="hooks", tasks=("classification", "regression"), inputs="sequence")
def build_lstm(spec: DataSpec, options: Mapping[str, Any]) -> nn.Module:
    """Options: hidden (64), layers (1), dropout (0.0). Input (seq_len, features)."""
    return build_recurrent("lstm", LSTMLayer, spec, options)
