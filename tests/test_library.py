"""fedsafe as a library: the worked examples under examples/ run (tiny sizes), their ε is what an
independent accountant (Opacus' RDP) says for the noise and steps taken, and a node's ledger refuses a
stock Flower server's round past its cap."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from opacus.accountants import RDPAccountant

import fedsafe
from fedsafe.client.training import poisson_schedule
from fedsafe.protocol import BUDGET_EXHAUSTED, REFUSALS

pytestmark = pytest.mark.usefixtures("flower_task_identity")
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # the example's own factory is imported back by its name
    spec.loader.exec_module(module)
    return module


def _rdp_epsilon(sigma: float, q: float, steps: int, delta: float = 1e-5) -> float:
    accountant = RDPAccountant()
    accountant.history = [(sigma, q, steps)]
    return accountant.get_epsilon(delta)


def test_simulate_trains_a_users_model_on_users_arrays(tmp_path):
    result = _example("own_model_simulation").main(rounds=2, nodes=3, records=450)
    first = result.history[0]["eval"]["accuracy"]
    assert result.metrics["accuracy"] >= 0.3 > first + 0.15, (first, result.metrics)  # chance: 0.1
    assert len(result.node_epsilon) == 3 and 2.9 <= result.epsilon <= 3.0
    assert type(result.model[0]).__name__ == "Conv2d"  # the user's own architecture, final weights


def test_simulate_trains_a_users_model_on_a_folder_of_images(tmp_path):
    example = _example("own_images_simulation")
    folder = example.digits_folder(tmp_path / "digits", records=600)
    result = example.main(str(folder), rounds=2, nodes=3)
    first = result.history[0]["eval"]["accuracy"]
    assert result.metrics["accuracy"] >= 0.3 > first + 0.15, (first, result.metrics)  # chance: 0.1
    assert len(result.node_epsilon) == 3 and 2.9 <= result.epsilon <= 3.0
    assert type(result.model[0]).__name__ == "Conv2d"


def test_a_stock_flower_app_gains_the_ledgers_epsilon():
    app = _example("own_flower_app")
    grid = app.run_here(2, 2, 400)
    replies = [dict(r.content["metrics"]) for r in grid.received]
    assert len(replies) == 4 and not any(r.has_error() for r in grid.received)
    last = replies[-1]
    steps = int(last["dp-steps"])
    q, batches = poisson_schedule(200, 32)  # the Poisson rate Opacus' loader uses for 200 records
    assert steps == 2 * batches
    assert last["epsilon"] == pytest.approx(_rdp_epsilon(last["noise-multiplier"], q, steps), rel=1e-6)
    assert 2.9 <= last["epsilon"] <= 3.0


def test_the_ledger_refuses_a_round_past_the_nodes_cap(tmp_path):
    """A stock server that keeps asking: the node's lifetime cap (here 1.0) holds, whatever it sends."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 4)).astype(np.float32), rng.integers(0, 2, 64)
    from torch import nn

    trainer = fedsafe.PrivateTrainer(model=lambda: nn.Linear(4, 2), data=(x, y), epsilon=3.0, rounds=2,
                                     policy=fedsafe.NodePolicy(state_dir=str(tmp_path), max_epsilon=1.0))
    initial = ArrayRecord(nn.Linear(4, 2).state_dict())
    answers = []
    for server_round in (1, 2, 3):
        msg = Message(RecordDict({"arrays": initial, "config": ConfigRecord({"server-round": server_round})}),
                      dst_node_id=1, message_type="train")
        answers.append(trainer.train(msg, None))
    spent = [a.content["metrics"]["epsilon"] for a in answers if not a.has_error()]
    assert spent and max(spent) <= 1.0
    refused = [a for a in answers if a.has_error()]
    assert refused and all((a.error.code, a.error.reason) == (BUDGET_EXHAUSTED, REFUSALS[BUDGET_EXHAUSTED])
                           for a in refused)
    # a message without Flower's round number is refused before any spend
    bare = Message(RecordDict({"arrays": initial, "config": ConfigRecord({})}), dst_node_id=1, message_type="train")
    assert trainer.train(bare, None).has_error()
