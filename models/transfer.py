"""Transfer learning: start a model from saved weights, and freeze some of its parameters.

A prefix names parameters by module path, as ``model.named_parameters()`` spells them: ``"1"``
matches ``1.weight`` and ``1.bias`` (not ``10.weight``), ``"encoder"`` every parameter of the
encoder, ``"layers.0.input.weight"`` that one tensor. Plain PyTorch: the coordinator and the nodes
call the same functions, so they agree on which parameters are frozen.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .registry import ModelConfigError


def parse_prefixes(text: str | Iterable[str]) -> tuple[str, ...]:
    """``"encoder, 1"`` -> ("encoder", "1"); empty items are dropped."""
    items = text.split(",") if isinstance(text, str) else text
    return tuple(dict.fromkeys(p.strip() for p in items if p.strip()))


def matches(name: str, prefix: str) -> bool:
    """Whether parameter `name` lies under module path `prefix` (or is it)."""
    prefix = prefix.rstrip(".")
    return name == prefix or name.startswith(prefix + ".")


def frozen_names(names: Iterable[str], prefixes: Iterable[str]) -> list[str]:
    """The names (in their order) that some prefix matches."""
    prefixes = tuple(prefixes)
    return [n for n in names if any(matches(n, p) for p in prefixes)]


def check_prefixes(model_name: str, names: Iterable[str], prefixes: Iterable[str]) -> list[str]:
    """The frozen parameter names; ModelConfigError if a prefix matches no parameter (a typo) or
    every parameter would be frozen (nothing left to train)."""
    names, prefixes = list(names), tuple(prefixes)
    unknown = [p for p in prefixes if not any(matches(n, p) for n in names)]
    if unknown:
        raise ModelConfigError(
            f"freeze: no parameter of model {model_name!r} is named {', '.join(map(repr, unknown))}; "
            f"its parameters live in: {', '.join(_module_paths(names))}"
        )
    frozen = frozen_names(names, prefixes)
    if frozen and len(frozen) == len(names):
        raise ModelConfigError(f"freeze {', '.join(prefixes)} would freeze every parameter of model {model_name!r}")
    return frozen


def _module_paths(names: list[str]) -> list[str]:
    """Module paths holding parameters, in model order (what a freeze prefix can name)."""
    paths = dict.fromkeys(n.rsplit(".", 1)[0] if "." in n else n for n in names)
    return list(paths)


def freeze(model: nn.Module, prefixes: Iterable[str], model_name: str = "model") -> list[str]:
    """Set ``requires_grad=False`` on the parameters the prefixes name; returns their names."""
    named = dict(model.named_parameters())
    frozen = check_prefixes(model_name, named, parse_prefixes(prefixes) if isinstance(prefixes, str) else prefixes)
    for name in frozen:
        named[name].requires_grad_(False)
    return frozen


class TensorFileError(ValueError):
    """A .pt file that `load_tensor_file` will not read; `unsafe` when it names Python objects to run."""

    def __init__(self, reason: str, unsafe: bool) -> None:
        super().__init__(reason)
        self.unsafe = unsafe


def load_tensor_file(path: str | Path) -> Any:
    """A .pt file read without running any code from it (``torch.load(weights_only=True)``): tensors
    and plain Python values only. TensorFileError, with a one-line reason, otherwise: a file naming any
    other Python object (loading it would run it; a crafted .pt runs arbitrary code) or no .pt at all."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch explains at length; one line of it names what the file asked for.
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        named = next((line for line in lines if "GLOBAL" in line), None)
        if named is not None:
            raise TensorFileError(
                f"it holds Python objects beyond tensors and plain values, and loading them could run code ({named})",
                unsafe=True) from None
        raise TensorFileError(f"UnpicklingError: {lines[-1] if lines else 'unreadable'}", unsafe=False) from None
    except Exception as err:  # noqa: BLE001 - torch raises many kinds for a file that is not its own
        raise TensorFileError(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
                              unsafe=False) from None


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from `path`: a state dict saved with ``torch.save(model.state_dict())``, or a fedsafe
    ``checkpoint.pt`` / ``best_model.pt`` (their ``model_state``)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelConfigError(f"init-checkpoint: file not found: {path}")
    try:
        raw = load_tensor_file(path)
    except TensorFileError as err:
        problem = f"is refused: {err}" if err.unsafe else f"is not a PyTorch file ({err})"
        raise ModelConfigError(f"init-checkpoint: {path} {problem}") from None
    if isinstance(raw, Mapping) and "model_state" in raw:
        raw = raw["model_state"]
    if not isinstance(raw, Mapping) or not raw or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in raw.items()
    ):
        raise ModelConfigError(
            f"init-checkpoint: {path} holds neither a state dict (parameter name -> tensor) nor a fedsafe checkpoint"
        )
    return dict(raw)


def load_matching(model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "init-checkpoint") -> tuple[list[str], list[str]]:
    """Copy into `model` every tensor of `state` whose name and shape it shares (a new head of
    another size keeps its fresh initialisation). Returns (loaded names, skipped names: in `state`
    but absent from the model or shaped differently). ModelConfigError if nothing fits."""
    own = model.state_dict()
    loaded = [k for k, v in state.items() if k in own and tuple(own[k].shape) == tuple(v.shape)]
    skipped = [k for k in state if k not in loaded]
    if not loaded:
        raise ModelConfigError(
            f"{source}: no tensor fits the model (it has {', '.join(list(own)[:6])}…; the file has "
            f"{', '.join(list(state)[:6])}…)"
        )
    with torch.no_grad():
        for key in loaded:
            own[key].copy_(state[key].to(own[key].dtype))
    return loaded, skipped
