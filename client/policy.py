"""What the node operator allows, and what the coordinator asks: parsed once, validated at the edge."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

DEFAULT_STATE_DIR = "~/.fedsafe/ledgers"
DEFAULT_MAX_EPSILON = 10.0
DEFAULT_DELTA = 1e-5
POISONS = ("nan", "shape", "norm")  # debug-poison kinds (tests of the coordinator's update validation)


class PolicyError(ValueError):
    """A node-config or run request value that cannot be used; the message names the key."""


def _number(values: Mapping[str, Any], key: str, default: float, kind=float) -> Any:
    raw = values.get(key, default)
    try:
        return kind(raw)
    except (TypeError, ValueError):
        raise PolicyError(f"{key}={raw!r} is not a valid {kind.__name__}") from None


def _flag(values: Mapping[str, Any], key: str, default: bool) -> bool:
    raw = values.get(key, default)
    if isinstance(raw, bool):
        return raw
    if str(raw).lower() in ("true", "1", "yes"):
        return True
    if str(raw).lower() in ("false", "0", "no"):
        return False
    raise PolicyError(f"{key}={raw!r} is not true or false")


@dataclass(frozen=True)
class NodePolicy:
    """The node operator's rules (Flower node-config). They cap whatever a run asks for."""

    data_path: str | None = None
    dataset_id: str | None = None
    state_dir: str = DEFAULT_STATE_DIR
    max_epsilon: float = DEFAULT_MAX_EPSILON
    delta: float = DEFAULT_DELTA
    device: str = "auto"
    allow_non_private: bool = False  # a run may turn DP off only where the operator said so
    seed_noise: bool = False  # seeded DP noise is reproducible, and so predictable: simulations and tests only
    # Simulations only: the driver's pre-partitioned training split (fedsafe.client.data.save_partitions).
    partition_store: str | None = None
    debug_poison: tuple[str, ...] = ()  # TEST ONLY: send deliberately bad updates (nan, shape, norm), by round
    # A virtual node of a simulation (set by the simulation driver in code, never from node-config, which a
    # deployed node's operator writes): only then may a run name a data file for the node to load.
    simulated: bool = False

    def __post_init__(self) -> None:
        if not self.max_epsilon > 0:
            raise PolicyError(f"max-epsilon must be > 0; got {self.max_epsilon}")
        if not 0 < self.delta < 1:
            raise PolicyError(f"delta must be in (0, 1); got {self.delta}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise PolicyError(f"device must be auto, cpu, cuda or cuda:N; got {self.device!r}")
        bad = [p for p in self.debug_poison if p not in POISONS]
        if bad:
            raise PolicyError(f"debug-poison takes a comma list of {', '.join(POISONS)}; got {bad}")

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> NodePolicy:
        known = {
            "data-path", "dataset-id", "state-dir", "max-epsilon", "delta", "device",
            "allow-non-private", "partition-id", "num-partitions",
            "seed-noise", "debug-poison",  # test and simulation only
        }
        unknown = sorted(set(node_config) - known)
        if unknown:
            raise PolicyError(f"unknown node-config keys {unknown}; known: {sorted(known)}")
        data_path = node_config.get("data-path")
        return cls(
            data_path=str(data_path) if data_path else None,
            dataset_id=str(node_config["dataset-id"]) if node_config.get("dataset-id") else None,
            state_dir=str(node_config.get("state-dir", DEFAULT_STATE_DIR)),
            max_epsilon=_number(node_config, "max-epsilon", DEFAULT_MAX_EPSILON),
            delta=_number(node_config, "delta", DEFAULT_DELTA),
            device=str(node_config.get("device", "auto")),
            allow_non_private=_flag(node_config, "allow-non-private", False),
            seed_noise=_flag(node_config, "seed-noise", False),
            debug_poison=tuple(p.strip() for p in str(node_config.get("debug-poison") or "").split(",") if p.strip()),
        )

    def with_overrides(self, **changes: Any) -> NodePolicy:
        return replace(self, **changes)

    def data_key(self, request: TrainRequest | None, partition: tuple[int, int] | None = None, data=None) -> str:
        """Which data the ledger protects: the operator's dataset id, else the records of the node's data
        file (`data`, as loaded; fedsafe.client.data.records_digest: a copy of the file is the same data), or
        — for a simulated node, `partition` = (id, count) — the dataset's records and the node's partition
        number. Not the seed, partitioner or node count: a new split of the same records charges the same
        virtual nodes' ledgers."""
        from .data import is_builtin, load_dataset, load_file, records_digest, records_of

        if self.dataset_id:
            return self.dataset_id
        if self.data_path:
            return "records:" + records_digest(data if data is not None else load_file(self.data_path))
        if partition is None or request is None:
            raise PolicyError("this node has no data: set node-config data-path=<file>")
        if is_builtin(request.dataset):
            source = records_of(request.dataset)  # bundled, public records: the name says which
        else:
            source = "records-" + records_digest(load_dataset(request.dataset, request.partition_by or None).train)
        return f"sim:{source}:p{partition[0]}"


@dataclass(frozen=True)
class TrainRequest:
    """What the coordinator asks of a node in one round (the train message's config)."""

    run_id: str
    server_round: int
    num_rounds: int
    model: str
    dataset: str
    partitioner: str
    alpha: float
    classes_per_node: int
    partition_by: str
    num_partitions: int
    seed: int
    local_epochs: int
    batch_size: int
    optimizer: str
    lr: float
    momentum: float
    weight_decay: float
    dp: bool
    epsilon: float
    delta: float
    max_grad_norm: float
    accountant: str
    proximal_mu: float = 0.0  # sent by FedProx as `proximal-mu`
    model_options: str = ""  # "hidden=128,dropout=0.2": models.parse_model_options
    l1: float = 0.0  # L1 penalty (a proximal step after each optimizer step)
    augment: bool = False  # random one-pixel shifts of each image, per sample
    freeze: str = ""  # comma-separated parameter-name prefixes not to train (nor upload)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], run_id: str) -> TrainRequest:
        missing = [k for k in ("server-round", "num-rounds", "model", "dataset") if k not in config]
        if missing:
            raise PolicyError(f"train request lacks {missing}")
        request = cls(
            # The coordinator's run key survives its restarts; Flower's run id does not.
            run_id=str(config.get("run-key", run_id)),
            server_round=_number(config, "server-round", 1, int),
            num_rounds=_number(config, "num-rounds", 1, int),
            model=str(config["model"]),
            dataset=str(config["dataset"]),
            partitioner=str(config.get("partitioner", "iid")),
            alpha=_number(config, "alpha", 0.5),
            classes_per_node=_number(config, "classes-per-node", 2, int),
            partition_by=str(config.get("partition-by", "")),
            num_partitions=_number(config, "num-partitions", 0, int),
            seed=_number(config, "seed", 0, int),
            local_epochs=_number(config, "local-epochs", 1, int),
            batch_size=_number(config, "batch-size", 32, int),
            optimizer=str(config.get("optimizer", "sgd")),
            lr=_number(config, "lr", 0.1),
            momentum=_number(config, "momentum", 0.0),
            weight_decay=_number(config, "weight-decay", 0.0),
            dp=_flag(config, "dp", True),
            epsilon=_number(config, "epsilon", 1.0),
            delta=_number(config, "delta", DEFAULT_DELTA),
            max_grad_norm=_number(config, "max-grad-norm", 1.0),
            accountant=str(config.get("accountant", "rdp")),
            proximal_mu=_number(config, "proximal-mu", 0.0),
            model_options=str(config.get("model-options", "")),
            l1=_number(config, "l1", 0.0),
            augment=_flag(config, "augment", False),
            freeze=str(config.get("freeze", "")),
        )
        for name in ("local_epochs", "batch_size", "num_rounds", "server_round"):
            if getattr(request, name) < 1:
                raise PolicyError(f"{name.replace('_', '-')} must be >= 1; got {getattr(request, name)}")
        if not request.proximal_mu >= 0:
            raise PolicyError(f"proximal-mu must be >= 0; got {request.proximal_mu}")
        if not request.l1 >= 0:
            raise PolicyError(f"l1 must be >= 0; got {request.l1}")
        if request.dp and not request.epsilon > 0:
            raise PolicyError(f"epsilon must be > 0; got {request.epsilon}")
        if request.dp and not request.max_grad_norm > 0:
            raise PolicyError(f"max-grad-norm must be > 0; got {request.max_grad_norm}")
        return request


@dataclass(frozen=True)
class PrivacyTerms:
    """The (ε, δ) a node will honour for a run: the request, capped by the node's policy."""

    private: bool
    run_epsilon: float
    max_epsilon: float
    delta: float


def resolve_terms(policy: NodePolicy, request: TrainRequest) -> PrivacyTerms:
    if not request.dp:
        if not policy.allow_non_private:
            raise PolicyError(
                "the run asks to train without differential privacy; this node's policy forbids it "
                "(node-config allow-non-private=false)"
            )
        return PrivacyTerms(False, float("inf"), float("inf"), policy.delta)
    return PrivacyTerms(
        private=True,
        run_epsilon=min(request.epsilon, policy.max_epsilon),
        max_epsilon=policy.max_epsilon,
        delta=min(request.delta, policy.delta),
    )
