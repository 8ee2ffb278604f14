"""Per-sample data augmentation and the L1 penalty of node training.

Both keep DP-SGD's accounting as it is:

* augmentation transforms each sample on its own (a random shift of its pixels) before the model
  sees it: one record still changes one per-sample gradient, clipped to C;
* the L1 penalty is a proximal step after each optimizer step, w <- sign(w) max(|w| - lr*l1, 0)
  (ISTA; decoupled from the adaptive scaling under adam/rmsprop, as AdamW decouples weight decay).
  It reads only the weights, never the data, so under DP it is post-processing of the privatised
  update and costs no epsilon. (Adding l1*|w| to the loss instead would put a data-independent
  term into every per-sample gradient, where clipping would distort it.)
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.nn import functional as F

MAX_SHIFT = 1  # pixels: an 8x8 digit moved by more than one pixel starts to lose strokes


def can_augment(input_shape: tuple[int, ...]) -> bool:
    """Shifts apply to images (C, H, W) and to images read as sequences (H, W)."""
    return len(input_shape) in (2, 3) and min(input_shape[-2:]) > 2 * MAX_SHIFT


@torch.no_grad()
def random_shifts(x: torch.Tensor, generator: torch.Generator | None = None, max_shift: int = MAX_SHIFT) -> torch.Tensor:
    """Each sample of `x` (n, ..., H, W) moved by its own random offset of -max_shift..max_shift
    pixels along each of the last two axes; pixels shifted in are 0 (the digits' background).

    No flips: a mirrored 2, 3, 5, 7 or 9 is not the same digit (nor, often, any digit), so flips
    are not label-preserving for digits or handwriting.
    """
    n = len(x)
    if n == 0 or max_shift == 0:
        return x
    h, w, m = x.shape[-2], x.shape[-1], max_shift
    span = 2 * m + 1
    # one offset per sample, drawn where `x` is (a seeded `generator` lives on that device too)
    offsets = torch.randint(0, span * span, (n,), generator=generator, device=x.device)
    padded = F.pad(x, (m, m, m, m))
    out = torch.zeros_like(x)
    shape = (n,) + (1,) * (x.dim() - 1)
    for k in range(span * span):
        dy, dx = divmod(k, span)
        chosen = (offsets == k).reshape(shape).to(x.dtype)
        out += chosen * padded[..., dy : dy + h, dx : dx + w]
    return out


def l1_weights(params: Iterable[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    """The parameters the L1 penalty applies to: trainable weight matrices and kernels (2+ dims),
    not biases or normalisation scales."""
    return [p for p in params if p.requires_grad and p.dim() >= 2]


@torch.no_grad()
def l1_proximal_step(params: Iterable[torch.nn.Parameter], threshold: float) -> None:
    """Soft-threshold each weight by `threshold` (= lr * l1): small weights become exactly 0."""
    if threshold <= 0:
        return
    for p in params:
        p.copy_(p.sign() * (p.abs() - threshold).clamp(min=0))
