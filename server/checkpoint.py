"""The coordinator's checkpoint: everything needed to resume a run after a crash, written atomically.

The file is read with ``torch.load(weights_only=True)`` only: a pickle that names any other Python object
(a crafted .pt whose loading would run code) is refused. So what is saved is made of tensors and plain
Python values alone: NumPy arrays (random states, strategy moments) are stored as tagged tensors
(`safe_tree`) and turned back into arrays on loading (`plain_tree`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsafe.client.files import atomic_write
from fedsafe.models.transfer import TensorFileError, load_tensor_file

CHECKPOINT_NAME = "checkpoint.pt"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable or from another run."""


@dataclass
class RunState:
    run_key: str  # stable identity of the run across coordinator restarts (nodes key their plans on it)
    completed_round: int
    model_state: dict[str, torch.Tensor]
    history: list[dict[str, Any]]
    config: dict[str, Any]
    sampler_state: dict[str, Any] | None = None
    python_rng: Any = None
    numpy_rng: Any = None
    torch_rng: torch.Tensor | None = None
    strategy_state: dict[str, Any] | None = None  # strategies.strategy_state_dict: moments, accountants, strikes


_NDARRAY = "__ndarray__"  # a dict holding only this key is a NumPy array stored as a tensor


def safe_tree(value: Any, where: str = "checkpoint") -> Any:
    """`value` with NumPy arrays and scalars replaced by what `torch.load(weights_only=True)` reads back:
    tensors and plain Python values. CheckpointError names anything else (it could not be loaded safely)."""
    if isinstance(value, np.generic):  # before float: np.float64 is a float, but pickles as a NumPy scalar
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise CheckpointError(f"{where}: an array of Python objects cannot be checkpointed safely")
        return {_NDARRAY: torch.from_numpy(np.ascontiguousarray(value).copy())}
    if isinstance(value, dict):
        return {k: safe_tree(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [safe_tree(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    raise CheckpointError(f"{where}: {type(value).__name__} values cannot be checkpointed safely (tensors and plain values only)")


def plain_tree(value: Any) -> Any:
    """The inverse of `safe_tree`."""
    if isinstance(value, dict):
        if set(value) == {_NDARRAY} and isinstance(value[_NDARRAY], torch.Tensor):
            return value[_NDARRAY].numpy()
        return {k: plain_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [plain_tree(v) for v in value]
        return items if isinstance(value, list) else tuple(items)
    return value


def save_checkpoint(directory: Path, state: RunState) -> Path:
    """Write `state` so that a crash leaves the previous checkpoint or this one, never a torn file."""
    directory.mkdir(parents=True, exist_ok=True)
    state.python_rng = random.getstate()
    state.numpy_rng = np.random.get_state(legacy=False)
    state.torch_rng = torch.get_rng_state()
    path = directory / CHECKPOINT_NAME
    tree = safe_tree(state.__dict__)
    with atomic_write(path, "wb") as handle:
        torch.save(tree, handle)
    return path


def load_checkpoint(directory: Path, restore_rng: bool = True) -> RunState:
    path = directory / CHECKPOINT_NAME
    if not path.exists():
        raise CheckpointError(f"no checkpoint to resume from: {path} does not exist")
    try:
        state = RunState(**plain_tree(load_tensor_file(path)))
    except Exception as err:  # noqa: BLE001 - any loading failure means the file is not usable
        detail = str(err) if isinstance(err, TensorFileError) else f"{type(err).__name__}: {err}"
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable ({detail})") from None
    if restore_rng:
        if state.python_rng is not None:
            random.setstate(state.python_rng)
        if state.numpy_rng is not None:
            np.random.set_state(state.numpy_rng)
        if state.torch_rng is not None:
            torch.set_rng_state(state.torch_rng)
    return state
