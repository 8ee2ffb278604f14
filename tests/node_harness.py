"""Drive a node's ClientApp handler directly, with real Flower messages and no network."""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from fedsafe.server.app import global_model_setup
from fedsafe.server.config import RunConfig


def train_message(cfg: RunConfig, server_round: int, arrays: ArrayRecord | None = None,
                  run_key: str = "run-a") -> Message:
    initial, model_config, _ = global_model_setup(cfg)
    config = ConfigRecord({**cfg.train_config(), **model_config, "run-key": run_key,
                           "server-round": server_round})
    content = RecordDict({"arrays": arrays or initial, "config": config})
    return Message(content, dst_node_id=1, message_type=MessageType.TRAIN)


def node_context(partition_id: int = 0, num_partitions: int = 3) -> Context:
    return Context(run_id=7, node_id=1, node_config={"partition-id": partition_id, "num-partitions": num_partitions},
                   state=RecordDict(), run_config={})
