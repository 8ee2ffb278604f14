"""Your own Flower app, with fedsafe's DP-SGD and privacy ledger on the node side.

The ServerApp is Flower's stock FedAvg; the ClientApp is yours. Its train handler hands each message
to fedsafe.PrivateTrainer, which reserves ε in the node's ledger, trains with DP-SGD at exactly that
noise, settles the steps taken and replies with the trained weights and the node's ε — refusing the
round (code 4001) once the node's lifetime cap would be passed.

    python examples/own_flower_app.py                      # 3 nodes in this process, 3 rounds
    flwr run . / run_simulation(server_app=..., client_app=...) work the same way with these apps.
"""

from __future__ import annotations

import sys
import tempfile

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from torch import nn

import fedsafe

ROUNDS = 3
LEDGERS = tempfile.mkdtemp(prefix="ledgers-")  # a real node: a directory its operator keeps


def build_model() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def node_data(partition_id: int, num_partitions: int, limit: int | None = None):
    """This node's records: here its share of scikit-learn's bundled digits; yours come from its disk."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, y = (digits.data / 16.0).astype(np.float32), digits.target
    if limit:
        x, y = x[:limit], y[:limit]
    return x[partition_id::num_partitions], y[partition_id::num_partitions]


# ---- the ClientApp: yours, plus one call ----------------------------------------------------------
client_app = ClientApp()


@client_app.train()
def train(msg, context: Context):
    partition, partitions = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    limit = int(context.run_config.get("records", 0)) or None
    trainer = fedsafe.PrivateTrainer(
        model=build_model, data=node_data(partition, partitions, limit),
        policy=fedsafe.NodePolicy(state_dir=f"{LEDGERS}/node-{partition}", max_epsilon=5.0),
        epsilon=3.0, rounds=int(context.run_config.get("rounds", ROUNDS)), lr=0.5, batch_size=32, num_classes=10,
    )
    return trainer.train(msg, context)


# ---- the ServerApp: stock Flower -------------------------------------------------------------------
server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    rounds = int(context.run_config.get("rounds", ROUNDS))
    result = FedAvg(fraction_evaluate=0.0).start(grid=grid, initial_arrays=ArrayRecord(build_model().state_dict()),
                                                 num_rounds=rounds, train_config=ConfigRecord({}))
    context.state["final-arrays"] = result.arrays


def run_here(nodes: int = 3, rounds: int = ROUNDS, records: int = 0):
    """Both apps in this process (fedsafe's in-process grid): the quickest way to try them."""
    from flwr.app import RecordDict

    from fedsafe.simulations.local import LocalGrid

    grid = LocalGrid(client_app, nodes)
    for context in grid.contexts.values():
        context.run_config.update({"rounds": rounds, "records": records})
    server_context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                             run_config={"rounds": rounds, "records": records})
    main(grid, server_context)
    epsilons = [r.content["metrics"]["epsilon"] for r in grid.received if not r.has_error()]
    print(f"{len(grid.received)} replies, largest ε spent {max(epsilons):.3f}")
    return grid


if __name__ == "__main__":
    run_here(*(int(a) for a in sys.argv[1:]))
