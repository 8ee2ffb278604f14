"""A .pt file is data, never code: fedsafe loads every .pt with torch.load(weights_only=True) only.

A crafted pickle whose loading would run a command (here: create a marker file) is refused with a clear
one-line error, and the command never runs, whether it is given as init-checkpoint or found as the
checkpoint a run resumes from. fedsafe's own checkpoints still resume: random states and strategy moments
are stored as tensors and plain values.
"""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from fedsafe.server.app import global_model_setup
from fedsafe.server.checkpoint import CHECKPOINT_NAME, CheckpointError, RunState, load_checkpoint, save_checkpoint
from fedsafe.server.config import ConfigError, RunConfig


class _RunsACommand:
    """Unpickling this calls os.system: what an attacker's .pt would do."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _crafted_pt(path, marker) -> None:
    # Looks like a fedsafe checkpoint (a real model_state), plus one object whose loading runs code.
    initial, _, _ = global_model_setup(RunConfig(model="mlp", dataset="breast-cancer"))
    torch.save({"model_state": initial.to_torch_state_dict(), "payload": _RunsACommand(marker)}, path)


def test_crafted_init_checkpoint_is_refused_and_its_code_never_runs(tmp_path):
    crafted, marker = tmp_path / "pretrained.pt", tmp_path / "code-ran"
    _crafted_pt(crafted, marker)
    with pytest.raises(ConfigError) as refused:
        global_model_setup(RunConfig(model="mlp", dataset="breast-cancer", init_checkpoint=str(crafted)))
    message = str(refused.value)
    assert "init-checkpoint" in message and str(crafted) in message and "refused" in message
    assert "system" in message and "\n" not in message  # names what the file asked for, on one line
    assert not marker.exists()


def test_crafted_checkpoint_is_refused_on_resume_and_its_code_never_runs(tmp_path):
    out, marker = tmp_path / "run", tmp_path / "code-ran"
    out.mkdir()
    _crafted_pt(out / CHECKPOINT_NAME, marker)
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(out)
    assert "corrupt or unreadable" in str(refused.value) and "system" in str(refused.value)
    assert not marker.exists()


def test_a_checkpoint_is_plain_tensors_and_values_and_restores_every_state(tmp_path):
    model = {"w": torch.randn(3, 2), "b": torch.zeros(2)}
    strategy_state = {"chain": ["FedAdam"], "links": [{"m_t": {"w": np.arange(6.0).reshape(3, 2)},
                                                       "v_t": {"w": np.ones((3, 2), np.float32)}}]}
    history = [{"round": 1, "train_loss": np.float64(0.5), "node_epsilon": {"1": 0.3}}]
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    save_checkpoint(tmp_path, RunState("key", 1, model, history, {"lr": 0.1}, {"rng": [1, 2]},
                                       strategy_state=strategy_state))
    expected = (random.random(), np.random.rand(), torch.rand(1).item())  # the draws after the save

    # Readable by PyTorch's safe loader alone: no class of fedsafe's, NumPy's or anyone's is unpickled.
    torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    state = load_checkpoint(tmp_path)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    assert all(torch.equal(state.model_state[k], model[k]) for k in model)
    links = state.strategy_state["links"][0]
    assert links["m_t"]["w"].dtype == np.float64 and np.array_equal(links["m_t"]["w"], np.arange(6.0).reshape(3, 2))
    assert links["v_t"]["w"].dtype == np.float32
    assert state.history == [{"round": 1, "train_loss": 0.5, "node_epsilon": {"1": 0.3}}]
    assert state.sampler_state == {"rng": [1, 2]} and state.config == {"lr": 0.1}


def test_an_object_that_cannot_be_stored_safely_is_named_when_saving(tmp_path):
    with pytest.raises(CheckpointError, match=r"checkpoint\.strategy_state\.odd: object values cannot"):
        save_checkpoint(tmp_path, RunState("key", 1, {}, [], {}, strategy_state={"odd": object()}))
    assert not (tmp_path / CHECKPOINT_NAME).exists()
