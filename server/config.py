"""The coordinator's run configuration: one typed object, validated where it enters."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A run-config value that cannot be used; the message names the key and what is allowed."""


@dataclass(frozen=True)
class RunConfig:
    num_rounds: int = 5
    model: str = "mlp"
    dataset: str = "breast-cancer"
    partitioner: str = "iid"
    alpha: float = 0.5
    num_partitions: int = 0  # simulated nodes; 0 in deployments, where nodes bring their own data
    seed: int = 42
    local_epochs: int = 3
    batch_size: int = 32
    optimizer: str = "sgd"
    lr: float = 0.5
    momentum: float = 0.0
    weight_decay: float = 0.0
    dp: bool = True
    epsilon: float = 3.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: str = "rdp"
    strategy: str = "fedavg"
    fraction_train: float = 1.0
    min_nodes: int = 2  # connected nodes needed before a round starts
    min_replies: int = 1  # valid replies needed to aggregate a round
    max_update_norm: float = 0.0  # L2 bound on an update's distance from the global model; 0: none
    round_timeout: float = 3600.0  # seconds a round waits for replies; a node silent that long is skipped
    poll_interval: float = 0.2  # seconds between polls for replies (Flower's own send_and_receive: 3)
    max_strikes: int = 3  # rejected updates in a row before a node is excluded from the run; 0: never
    eval_path: str = ""  # held-out data file (.npz/.csv) for central evaluation; "": the dataset's test split
    input_shape: str = ""  # model input shape, e.g. "30" or "1x8x8", when the coordinator has no data
    num_classes: int = 0  # number of classes, when the coordinator has no data (0: from the data)
    out_dir: str = "results/run"
    resume: bool = False

    def __post_init__(self) -> None:
        from client.accounting import ACCOUNTANTS
        from client.data import PARTITIONERS
        from client.training import OPTIMIZERS
        from models import model_names
        from strategies import strategy_names

        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        need(self.model in model_names(), f"unknown model {self.model!r}; choose one of: {', '.join(model_names())}")
        need(self.num_rounds >= 1, f"num-rounds must be >= 1; got {self.num_rounds}")
        need(self.local_epochs >= 1, f"local-epochs must be >= 1; got {self.local_epochs}")
        need(self.batch_size >= 1, f"batch-size must be >= 1; got {self.batch_size}")
        need(self.lr > 0, f"lr must be > 0; got {self.lr}")
        need(self.momentum >= 0 and self.weight_decay >= 0, "momentum and weight-decay must be >= 0")
        need(self.optimizer in OPTIMIZERS, f"unknown optimizer {self.optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}")
        need(self.partitioner in PARTITIONERS,
             f"unknown partitioner {self.partitioner!r}; choose one of: {', '.join(PARTITIONERS)}")
        need(self.alpha > 0, f"alpha must be > 0; got {self.alpha}")
        need(self.num_partitions >= 0, f"nodes must be >= 1; got {self.num_partitions}")
        need(not self.dp or self.epsilon > 0, f"epsilon must be > 0; got {self.epsilon}")
        need(0 < self.delta < 1, f"delta must be in (0, 1); got {self.delta}")
        need(self.max_grad_norm > 0, f"max-grad-norm must be > 0; got {self.max_grad_norm}")
        need(self.accountant in ACCOUNTANTS,
             f"unknown accountant {self.accountant!r}; choose one of: {', '.join(ACCOUNTANTS)}")
        need(self.strategy in strategy_names(),
             f"unknown strategy {self.strategy!r}; choose one of: {', '.join(strategy_names())}")
        need(0 < self.fraction_train <= 1, f"fraction-train must be in (0, 1]; got {self.fraction_train}")
        need(self.min_replies >= 1, f"min-replies must be >= 1; got {self.min_replies}")
        need(self.min_nodes >= 1, f"min-nodes must be >= 1; got {self.min_nodes}")
        need(self.max_update_norm >= 0, f"max-update-norm must be >= 0; got {self.max_update_norm}")
        need(self.round_timeout > 0, f"round-timeout must be > 0; got {self.round_timeout}")
        need(0 < self.poll_interval <= 60, f"poll-interval must be in (0, 60] seconds; got {self.poll_interval}")
        need(self.max_strikes >= 0, f"max-strikes must be >= 0 (0: never exclude); got {self.max_strikes}")
        need(self.num_classes >= 0, f"num-classes must be >= 0; got {self.num_classes}")
        need(not self.input_shape or all(p.strip().isdigit() and int(p) > 0 for p in self.input_shape.split("x")),
             f"input-shape must look like 30 or 1x8x8; got {self.input_shape!r}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> RunConfig:
        """From Flower run-config keys (`num-rounds`, `local-epochs`, …)."""
        by_key = {f.name.replace("_", "-"): f for f in fields(cls)}
        unknown = sorted(set(values) - set(by_key))
        if unknown:
            raise ConfigError(f"unknown run-config keys {unknown}; known: {sorted(by_key)}")
        kwargs: dict[str, Any] = {}
        for key, raw in values.items():
            field = by_key[key]
            kind = type(field.default)
            try:
                if kind is bool and isinstance(raw, str):
                    if raw.lower() not in ("true", "false"):
                        raise ValueError
                    kwargs[field.name] = raw.lower() == "true"
                else:
                    kwargs[field.name] = kind(raw)
            except (TypeError, ValueError):
                raise ConfigError(f"{key}={raw!r} is not a valid {kind.__name__}") from None
        return cls(**kwargs)

    def to_mapping(self) -> dict[str, Any]:
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}

    @property
    def out_path(self) -> Path:
        return Path(self.out_dir).expanduser()

    @property
    def model_input_shape(self) -> tuple[int, ...] | None:
        return tuple(int(p) for p in self.input_shape.split("x")) if self.input_shape else None

    # Keys that define what a run computes: a resumed run must not change them (see check_resumable).
    IDENTITY_KEYS = (
        "num-rounds", "model", "dataset", "partitioner", "alpha", "num-partitions", "seed", "local-epochs",
        "batch-size", "optimizer", "lr", "momentum", "weight-decay", "dp", "epsilon", "delta",
        "max-grad-norm", "accountant", "strategy", "fraction-train", "max-update-norm", "max-strikes",
        "input-shape", "num-classes",
    )

    def differences(self, other: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
        """Identity keys whose value in `other` (a saved config mapping) differs from this config's."""
        mine = self.to_mapping()
        return {k: (other.get(k), mine[k]) for k in self.IDENTITY_KEYS if k in other and other[k] != mine[k]}

    def train_config(self) -> dict[str, Any]:
        """What every train message carries: the coordinator's request to the nodes."""
        keys = (
            "num-rounds", "model", "dataset", "partitioner", "alpha", "num-partitions", "seed",
            "local-epochs", "batch-size", "optimizer", "lr", "momentum", "weight-decay", "dp",
            "epsilon", "delta", "max-grad-norm", "accountant",
        )
        mapping = self.to_mapping()
        return {k: mapping[k] for k in keys}
