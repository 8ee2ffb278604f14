"""Transformer encoder classifier for sequences (seq_len, features), attention written by hand.

Not nn.MultiheadAttention: Opacus cannot compute its per-sample gradients and swaps in its own
DPMultiheadAttention, whose batch_first=True output is reshaped wrongly (opacus PR #825 unmerged).
`SelfAttention` below is the same function as ``nn.MultiheadAttention(dim, heads,
batch_first=True)`` used as self-attention (tests/test_model_families.py checks it weight for
weight), built from nn.Linear layers that Opacus' standard grad samplers handle. Each Linear is
called once per forward pass, so every Opacus grad_sample_mode, ghost clipping included, applies.

Pre-LayerNorm blocks (LN -> attention -> residual, LN -> feed-forward -> residual), a learned
positional embedding (nn.Embedding over positions), mean pooling over time and a linear head.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .recurrent import sequence_shape
from .registry import DataSpec, ModelConfigError, float_option, int_option, register_model


class SelfAttention(nn.Module):
    """Multi-head self-attention over (B, T, dim).

    `qkv` is nn.MultiheadAttention's ``in_proj_weight``/``in_proj_bias`` (query, key and value
    projections stacked in that order), `out` its ``out_proj``.
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ModelConfigError(f"hidden size {dim} must be divisible by the number of heads {heads}")
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)
        # nn.MultiheadAttention's initialisation
        nn.init.xavier_uniform_(self.qkv.weight)
        nn.init.zeros_(self.qkv.bias)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, steps, _ = x.shape
        # (B, T, 3, heads, head_dim) -> three (B, heads, T, head_dim)
        q, k, v = self.qkv(x).view(batch, steps, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        scores = (q * (1.0 / math.sqrt(self.head_dim))) @ k.transpose(-2, -1)
        weights = self.dropout(torch.softmax(scores, dim=-1))
        context = (weights @ v).transpose(1, 2).reshape(batch, steps, self.dim)
        return self.out(context)


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int, ff: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attention = SelfAttention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.feed_forward = nn.Sequential(nn.Linear(dim, ff), nn.GELU(), nn.Dropout(dropout), nn.Linear(ff, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attention(self.norm1(x)))
        return x + self.dropout(self.feed_forward(self.norm2(x)))


class TransformerClassifier(nn.Module):
    def __init__(
        self, seq_len: int, features: int, dim: int, heads: int, layers: int, ff: int, dropout: float,
        outputs: int,
    ) -> None:
        super().__init__()
        self.seq_len, self.features = seq_len, features
        self.embed = nn.Linear(features, dim)
        self.position = nn.Embedding(seq_len, dim)
        nn.init.normal_(self.position.weight, std=0.02)
        self.blocks = nn.ModuleList(EncoderBlock(dim, heads, ff, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[1] != self.seq_len or x.shape[2] != self.features:
            raise ValueError(
                f"expected sequences shaped (batch, {self.seq_len}, {self.features}); got {tuple(x.shape)}"
            )
        # positions expanded per sample so the embedding sees a batch dimension (per-sample grads)
        # contiguous: Opacus' ghost-clipping embedding norm sampler .view()s the indices
        positions = torch.arange(self.seq_len, device=x.device).repeat(x.shape[0], 1)
        x = self.embed(x) + self.position(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(dim=1))


@register_model("transformer", grad_sample_mode="ew", tasks=("classification", "regression"), inputs="sequence")
def build_transformer(spec: DataSpec, options: Mapping[str, Any]) -> nn.Module:
    """Options: hidden (64, the model width), heads (4), layers (2), ff (2 x hidden, the
    feed-forward width), dropout (0.0). Input (seq_len, features)."""
    seq_len, features = sequence_shape("transformer", spec)
    hidden = int_option(options, "hidden", 64, minimum=1)
    heads = int_option(options, "heads", 4, minimum=1)
    layers = int_option(options, "layers", 2, minimum=1)
    ff = int_option(options, "ff", 2 * hidden, minimum=1)
    dropout = float_option(options, "dropout", 0.0, minimum=0.0, below=1.0)
    if hidden % heads:
        raise ModelConfigError(f"option 'hidden' ({hidden}) must be divisible by option 'heads' ({heads})")
    return TransformerClassifier(seq_len, features, hidden, heads, layers, ff, dropout, max(spec.num_classes, 1))
