"""The coordinator's checkpoint: everything needed to resume a run after a crash, written atomically."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsafe.client.files import atomic_write

from .run_dir import CHECKPOINT_NAME  # noqa: F401 - where the checkpoint lives in a run's out-dir


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


def save_checkpoint(directory: Path, state: RunState) -> Path:
    """Write `state` so that a crash leaves the previous checkpoint or this one, never a torn file."""
    directory.mkdir(parents=True, exist_ok=True)
    state.python_rng = random.getstate()
    state.numpy_rng = np.random.get_state(legacy=False)
    state.torch_rng = torch.get_rng_state()
    path = directory / CHECKPOINT_NAME
    with atomic_write(path, "wb") as handle:
        torch.save(state.__dict__, handle)
    return path


def load_checkpoint(directory: Path, restore_rng: bool = True) -> RunState:
    path = directory / CHECKPOINT_NAME
    if not path.exists():
        raise CheckpointError(f"no checkpoint to resume from: {path} does not exist")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=False)
        state = RunState(**raw)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means the file is not usable
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable ({type(err).__name__}: {err})") from None
    if restore_rng:
        if state.python_rng is not None:
            random.setstate(state.python_rng)
        if state.numpy_rng is not None:
            np.random.set_state(state.numpy_rng)
        if state.torch_rng is not None:
            torch.set_rng_state(state.torch_rng)
    return state
