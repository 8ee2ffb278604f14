"""Mixed precision for local training (run setting `precision`): bf16 autocast for the forward pass,
with every per-sample gradient, its clipping and the DP noise in fp32.

Why the fp32 boundary: Opacus computes a layer's per-sample gradients in the dtype of the gradient
flowing into that layer's output (opacus/grad_sample/linear.py, conv.py: ``activations.to(backprops.dtype)``),
and clips them in that dtype (DPOptimizer.clip_and_accumulate). Under plain autocast a Linear's output
is bf16, so the per-sample gradients, their norms and the clip factors would be bf16: 8 bits of
mantissa, a clipped norm up to ~0.4 % above C, i.e. a sensitivity the accountant does not know.
Casting each trainable layer's output back to fp32 (a forward hook, `fp32_outputs`) keeps the layer's
own matmul in bf16 while the gradient Opacus sees, and so everything it computes from it, is fp32.

Which Opacus modes are correct under it (measured with opacus 1.6, tests/test_precision.py):
hooks and functorch give fp32 per-sample gradients; ExpandedWeights (ew) fails under autocast
("expected m1 and m2 to have the same dtype"); ghost clipping computes fp32 per-sample *norms* but
takes the clipped sum from a second backward pass whose weight gradients autocast computes in bf16,
so the clipped contributions are not the ones whose norms were bounded. A family whose preferred mode
is ew trains in hooks under bf16; ghost-only training (the GAN) is refused.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from fedsafe.settings import RUN_SETTINGS, by_key

PRECISIONS = by_key(RUN_SETTINGS)["precision"].choices
BF16_MODES = ("hooks", "functorch")  # Opacus modes whose per-sample gradients stay fp32 under autocast
BF16_FALLBACK_MODE = "hooks"


class PrecisionError(ValueError):
    """A precision the model or its DP mode cannot train in correctly; the message says why."""


def grad_sample_mode(preferred: str, precision: str, task: str) -> str:
    """The Opacus mode to train in at `precision`: the family's `preferred` one, unless it is not correct
    under bf16 (then hooks); PrecisionError where no mode is correct (check_precision)."""
    mode = preferred if precision != "bf16" or preferred in BF16_MODES else BF16_FALLBACK_MODE
    check_precision(precision, mode, task)
    return mode


def check_precision(precision: str, dp_mode: str | None, task: str) -> None:
    """PrecisionError unless training at `precision` in Opacus mode `dp_mode` (None: not private) is correct."""
    if precision not in PRECISIONS:
        raise PrecisionError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return
    if task == "generation":
        raise PrecisionError("precision=bf16 is not supported for GANs: their discriminator trains with ghost "
                             "clipping, whose clipped gradients autocast would compute in bf16; use precision=fp32")
    if dp_mode is not None and dp_mode not in BF16_MODES:
        raise PrecisionError(f"precision=bf16 needs per-sample gradients in fp32, which Opacus mode {dp_mode!r} "
                             f"does not give under autocast; modes that do: {', '.join(BF16_MODES)}")


def _fp32(output):
    if isinstance(output, torch.Tensor):
        return output.float() if output.is_floating_point() else output
    if isinstance(output, tuple):
        return tuple(_fp32(o) for o in output)
    return output


@contextlib.contextmanager
def fp32_outputs(model: nn.Module) -> Iterator[None]:
    """Within: every module holding a trainable parameter of its own returns fp32 outputs (see the
    module docstring). Registered before Opacus wraps the model; the gradient Opacus' backward hook sees
    is that of the hooked output, so it is fp32 whatever order the hooks were registered in."""
    handles = [m.register_forward_hook(lambda _m, _in, out: _fp32(out)) for m in model.modules()
               if any(p.requires_grad for p in m.parameters(recurse=False))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The forward pass' context: bf16 autocast on `device` for precision bf16, nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _grad_samples(param: torch.Tensor) -> list[torch.Tensor]:
    found = getattr(param, "grad_sample", None)  # a list where Opacus kept one per call of the layer
    return [] if found is None else list(found) if isinstance(found, list) else [found]


def check_fp32_grad_samples(params: Iterable[torch.Tensor]) -> None:
    """Before a DP step under bf16: Opacus clips the per-sample gradients in their own dtype, so any
    that are not fp32 would be clipped imprecisely. A layer that escaped the boundary stops the round
    here, before the step is taken (and so before it is released)."""
    loose = sorted({str(g.dtype) for p in params for g in _grad_samples(p) if g.dtype != torch.float32})
    if loose:
        raise PrecisionError(f"precision=bf16: per-sample gradients in {', '.join(loose)}, not fp32; "
                             "this model cannot be clipped exactly under bf16: use precision=fp32")
