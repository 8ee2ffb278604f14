"""An in-process federation for tests: the coordinator's real round loop (fedsafe.server.loop.run_rounds,
strategy, validation, evaluation) and each virtual node's real handler (fedsafe.client.app.train_round, what
the ClientApp runs), with real Flower messages deep-copied on the way in and out as a transport
would. No Ray: the engine's start-up costs more than a tiny run, so one Ray simulation per test
module is enough to cover the engine itself.
"""

from __future__ import annotations

import copy
from pathlib import Path

from flwr.app import Context, Message, RecordDict

from fedsafe.client.app import train_round
from fedsafe.client.policy import DEFAULT_MAX_EPSILON, NodePolicy
from fedsafe.server.app import global_model_setup
from fedsafe.server.config import RunConfig
from fedsafe.server.loop import RunOutcome, run_rounds
from fedsafe.strategies import build_strategy

NODE_ID_BASE = 100


class InProcessGrid:
    """What run_rounds needs of a Flower Grid, delivering each message to train_round."""

    def __init__(self, num_nodes: int, policy: NodePolicy) -> None:
        self.policy = policy
        self.contexts = {
            NODE_ID_BASE + i: Context(run_id=7, node_id=NODE_ID_BASE + i,
                                      node_config={"partition-id": i, "num-partitions": num_nodes},
                                      state=RecordDict(), run_config={})
            for i in range(num_nodes)
        }
        self.replies: list[Message] = []  # every reply as its node sent it, for tests that audit uploads

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None) -> list[Message]:
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            delivered = Message(copy.deepcopy(message.content), dst_node_id=node,
                                message_type=message.metadata.message_type)
            reply = train_round(delivered, self.contexts[node], self.policy)
            self.replies.append(reply)  # as the node sent it; the server gets its own copy
            replies.append(Message(copy.deepcopy(reply.content), reply_to=delivered) if not reply.has_error() else reply)
        return replies


def federate(tmp_path: Path, nodes: int = 3, **overrides) -> tuple[RunConfig, RunOutcome, InProcessGrid]:
    """Run a federation of `nodes` virtual nodes in this process; `overrides` are RunConfig fields.
    Node policy as in fedsafe.simulations.run.simulate: every node grants the run's ε, seeded noise."""
    cfg = RunConfig(**{"num_rounds": 3, "out_dir": str(tmp_path / "run"), **overrides})
    cfg = RunConfig(**{**cfg.__dict__, "num_partitions": nodes, "min_nodes": nodes})
    policy = NodePolicy(
        state_dir=str(Path(cfg.out_dir) / "ledgers"),
        max_epsilon=cfg.epsilon if cfg.dp else DEFAULT_MAX_EPSILON,
        delta=cfg.delta, allow_non_private=not cfg.dp, seed_noise=True, simulated=True, allow_models=(cfg.model, cfg.task),
    )
    grid = InProcessGrid(nodes, policy)
    initial, model_config, evaluator = global_model_setup(cfg)
    strategy = build_strategy(cfg.strategy, fraction_train=1.0, min_train_nodes=1, min_available_nodes=1)
    outcome = run_rounds(grid, cfg, strategy, initial, model_config, evaluator, progress=None)
    return cfg, outcome, grid


def assert_two_nodes_learn_images_under_dp(tmp_path: Path, dataset: str) -> dict:
    """Two nodes, two DP rounds (ε ≤ 3) of the MLP on the two-class images at `dataset` (a folder or a file):
    both reply every round, the ledgers reach ε ≈ 3 and the model learns. The final evaluation."""
    _, outcome, _ = federate(tmp_path, nodes=2, dataset=dataset, model="mlp", num_rounds=2, lr=0.5,
                             epsilon=3.0, batch_size=16)
    rounds = outcome.history[1:]
    assert [r["replies"] for r in rounds] == [2, 2]
    assert 2.9 <= rounds[-1]["epsilon_max"] <= 3.0
    first, last = outcome.history[0]["eval"], outcome.history[-1]["eval"]
    assert last["accuracy"] >= 0.85 and last["loss"] < 0.8 * first["loss"], (first, last)
    return last
