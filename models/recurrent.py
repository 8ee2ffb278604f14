"""What the recurrent families (lstm.py, gru.py) share: a gated recurrent layer built from plain
nn.Linear layers, unrolled over time, and the sequence classifier around it.

Why not nn.LSTM / nn.GRU: Opacus cannot compute their per-sample gradients; it swaps in its own
DPLSTM/DPGRU, which live in opacus (this package must not import it), are slow (one per-sample
gradient per time step) and carry duplicate aliased keys in their state dicts.

Here every weight lives in an nn.Linear, so Opacus' standard Linear grad sampler applies, and each
Linear is called exactly once per forward pass:

* ``input``: one call on the whole sequence (B, T, F) gives the input projections of all steps;
* ``recurrent``: one call on the stacked previous hidden states (B, T, H) of all steps.

The second needs the hidden states before they are computed, so the layer unrolls twice: a pass
without autograd computes the hidden states h_{t-1} of every step; the graph pass takes the
recurrent projections of all steps from one ``recurrent`` call on those (detached) states and adds
``W_hh (h_{t-1} - h_{t-1}^detached)``, which is zero in value (and so gives W_hh a zero gradient)
but carries dL/dh_{t-1} = W_hh^T g_t to earlier steps. The function and its gradients are those
of the ordinary recurrence (tests check it against nn.LSTM / nn.GRU): dL/dW_hh = sum_t g_t
h_{t-1}^T arrives through the one call, so Opacus' per-sample gradient for W_hh is one einsum over
(B, T, .) instead of T of them, and, no Linear being called twice, ghost clipping applies too.
The price is paid in plain training too: the no-autograd pass and the zero-valued term made a plain
step ~40 % slower than a one-call-per-step unroll (LSTM 7.9 vs 5.5 ms, GRU 6.8 vs 5.0 ms; batch 64,
8x8 digits, 1 thread), while the DP step (hooks) got 1.3-1.7x faster (LSTM 15.0 vs 24.8 ms,
GRU 13.7 vs 17.2 ms).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .registry import DataSpec, ModelConfigError, float_option, int_option


class GatedRecurrentLayer(nn.Module):
    """One recurrent layer over (B, T, input_size) -> hidden states (B, T, hidden_size).

    Subclasses define the gates: `gates` (how many projections of size hidden_size) and `cell`.
    """

    gates = 1

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.input = nn.Linear(input_size, self.gates * hidden_size)
        self.recurrent = nn.Linear(hidden_size, self.gates * hidden_size)
        bound = 1.0 / math.sqrt(hidden_size)  # the initialisation of nn.LSTM / nn.GRU
        for linear in (self.input, self.recurrent):
            nn.init.uniform_(linear.weight, -bound, bound)
            nn.init.uniform_(linear.bias, -bound, bound)

    def initial_state(self, batch: int, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (like.new_zeros(batch, self.hidden_size),)

    def cell(
        self, x_proj: torch.Tensor, h_proj: torch.Tensor, state: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, ...]:
        """One step: projections of the input and of the previous hidden state -> new state
        (new hidden state first)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, steps, _ = x.shape
        x_proj = self.input(x)  # all steps in one call
        # unbind, not x_proj[:, t]: the backward of each indexing op would zero-fill a full (B, T, .)
        # gradient; unbind's backward stacks the step gradients once.
        x_steps = x_proj.unbind(1)

        # Pass 1, no autograd: the hidden states the recurrence will visit.
        with torch.no_grad():
            state = self.initial_state(batch, x_proj)
            weight, bias = self.recurrent.weight, self.recurrent.bias
            previous = []
            for t in range(steps):
                previous.append(state[0])
                state = self.cell(x_steps[t], F.linear(state[0], weight, bias), state)
            previous_h = torch.stack(previous, dim=1)  # (B, T, H): h_{t-1} for every t

        # Pass 2, with autograd: recurrent projections of all steps in one call.
        h_steps = self.recurrent(previous_h).unbind(1)
        weight = self.recurrent.weight
        state = self.initial_state(batch, x_proj)
        outputs = []
        for t in range(steps):
            h = state[0]
            # zero in value (h equals previous[t]), so W_hh's gradient through it is zero too;
            # routes dL/dh_{t-1} = W_hh^T g_t to earlier steps
            carry = F.linear(h - previous[t], weight) if t > 0 else 0.0
            state = self.cell(x_steps[t], h_steps[t] + carry, state)
            outputs.append(state[0])
        return torch.stack(outputs, dim=1)


class RecurrentClassifier(nn.Module):
    """Stacked recurrent layers over (B, T, F); the last step's hidden state feeds a linear head."""

    def __init__(
        self, layer_type: type[GatedRecurrentLayer], seq_len: int, features: int, hidden: int,
        layers: int, dropout: float, outputs: int,
    ) -> None:
        super().__init__()
        self.seq_len, self.features = seq_len, features
        sizes = [features] + [hidden] * layers
        self.layers = nn.ModuleList(layer_type(sizes[i], hidden) for i in range(layers))
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[2] != self.features:
            raise ValueError(
                f"expected sequences shaped (batch, seq_len, {self.features}); got {tuple(x.shape)}"
            )
        for i, layer in enumerate(self.layers):
            if i > 0:
                x = self.dropout(x)
            x = layer(x)
        return self.head(self.dropout(x[:, -1]))


def sequence_shape(name: str, spec: DataSpec) -> tuple[int, int]:
    """(seq_len, features) of a sequence family's data spec, or a clear error."""
    if len(spec.input_shape) != 2:
        raise ModelConfigError(
            f"model {name!r} needs sequences shaped (seq_len, features); got input shape "
            f"{spec.input_shape} (an image (1, H, W) can be read as H steps of W features)"
        )
    return spec.input_shape  # type: ignore[return-value]


def build_recurrent(
    name: str, layer_type: type[GatedRecurrentLayer], spec: DataSpec, options: Mapping[str, Any]
) -> RecurrentClassifier:
    seq_len, features = sequence_shape(name, spec)
    hidden = int_option(options, "hidden", 64, minimum=1)
    layers = int_option(options, "layers", 1, minimum=1)
    dropout = float_option(options, "dropout", 0.0, minimum=0.0, below=1.0)
    return RecurrentClassifier(layer_type, seq_len, features, hidden, layers, dropout, max(spec.num_classes, 1))
