"""What the node operator allows, and what the coordinator asks: parsed once, validated at the edge."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fedsafe import protocol
from fedsafe.settings import (
    NODE_SETTINGS, RUN_SETTINGS, SentSettings, SettingError, by_key, check_settings, parse_settings,
)

NODE_DEFAULTS = {s.key: s.default for s in NODE_SETTINGS}
DEFAULT_STATE_DIR = NODE_DEFAULTS["state-dir"]
DEFAULT_MAX_EPSILON = NODE_DEFAULTS["max-epsilon"]
DEFAULT_DELTA = NODE_DEFAULTS["delta"]
POISONS = ("nan", "shape", "norm")  # debug-poison kinds (tests of the coordinator's update validation)


class PolicyError(ValueError):
    """A node-config or run request value that cannot be used; the message names the key."""


class RequestError(PolicyError):
    """A train request that is malformed in itself. Its message is a function of the request alone (the
    keys and values the coordinator sent, and the public settings schema), never of the node's data or
    policy: the one refusal whose text the node sends back (fedsafe.client.gate)."""


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

    def __post_init__(self) -> None:
        try:
            check_settings(NODE_SETTINGS, {"max-epsilon": self.max_epsilon, "delta": self.delta})
        except SettingError as err:
            raise PolicyError(str(err)) from None
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise PolicyError(f"device must be auto, cpu, cuda or cuda:N; got {self.device!r}")
        bad = [p for p in self.debug_poison if p not in POISONS]
        if bad:
            raise PolicyError(f"debug-poison takes a comma list of {', '.join(POISONS)}; got {bad}")

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> NodePolicy:
        """From Flower node-config keys (fedsafe.settings.NODE_SETTINGS); a key not set takes its default."""
        try:
            given = parse_settings(NODE_SETTINGS, node_config, "node-config")
        except SettingError as err:
            raise PolicyError(str(err)) from None
        values = {**{s.name: s.default for s in NODE_SETTINGS}, **given}
        return cls(
            data_path=values["data_path"] or None,
            dataset_id=values["dataset_id"] or None,
            state_dir=values["state_dir"],
            max_epsilon=values["max_epsilon"],
            delta=values["delta"],
            device=values["device"],
            allow_non_private=values["allow_non_private"],
            seed_noise=values["seed_noise"],
            debug_poison=tuple(p.strip() for p in values["debug_poison"].split(",") if p.strip()),
        )

    def with_overrides(self, **changes: Any) -> NodePolicy:
        return replace(self, **changes)

    def data_key(self, request: TrainRequest, partition: tuple[int, int] | None = None) -> str:
        """Which data the ledger protects: the operator's dataset id, the data file, or — for a
        simulated node, `partition` = (id, count) — exactly the records of its partition."""
        if self.dataset_id:
            return self.dataset_id
        if self.data_path:
            return "file:" + str(Path(self.data_path).expanduser().resolve())
        if partition is None:
            raise PolicyError("this node has no data: set node-config data-path=<file>")
        partition_id, num_partitions = partition
        scheme = {
            "iid": "iid", "dirichlet": f"dirichlet-a{request.alpha:g}",
            "pathological": f"pathological-k{request.classes_per_node}", "natural": f"natural-{request.partition_by}",
        }.get(request.partitioner, request.partitioner)
        from .data import records_of

        return f"sim:{records_of(request.dataset)}:{scheme}:n{num_partitions}:s{request.seed}:p{partition_id}"


@dataclass(frozen=True)
class TrainRequest(SentSettings):
    """What the coordinator asks of a node in one round: the run settings a train message carries
    (fedsafe.settings.SentSettings), and the round, the run and the global model's spec."""

    run_id: str
    server_round: int
    input_shape: tuple[int, ...]
    num_classes: int
    task: str

    @classmethod
    def from_config(cls, config: Mapping[str, Any], run_id: str) -> TrainRequest:
        """The train message's config, every key known and every value checked. A key this node does not
        know, or a run setting it needs that is missing, refuses the round with its name: the node never
        fills in a value of its own where the coordinator's was meant."""
        settings = tuple(s for s in RUN_SETTINGS if s.sent)
        unknown = sorted(set(config) - set(by_key(settings)) - set(protocol.MESSAGE_KEYS))
        if unknown:
            raise RequestError(f"train request has unknown keys {unknown}: this node does not know them "
                              f"(is the coordinator's fedsafe newer than this node's?)")
        required = [*by_key(settings), protocol.SERVER_ROUND, protocol.INPUT_SHAPE, protocol.NUM_CLASSES, protocol.TASK]
        missing = [key for key in required if key not in config]
        if missing:
            raise RequestError(f"train request lacks keys {missing}")
        try:
            values = parse_settings(settings, {k: v for k, v in config.items() if k in by_key(settings)}, "run")
            server_round = _whole_number(config[protocol.SERVER_ROUND], protocol.SERVER_ROUND)
            input_shape = tuple(_whole_number(v, protocol.INPUT_SHAPE) for v in _items(config[protocol.INPUT_SHAPE]))
            num_classes = _whole_number(config[protocol.NUM_CLASSES], protocol.NUM_CLASSES, minimum=0)
        except SettingError as err:
            raise RequestError(f"train request: {err}") from None
        return cls(
            **values,
            # The coordinator's run key survives its restarts; Flower's run id does not.
            run_id=str(config.get(protocol.RUN_KEY, run_id)),
            server_round=server_round,
            input_shape=input_shape,
            num_classes=num_classes,
            task=str(config[protocol.TASK]),
        )


def _items(raw: Any) -> list[Any]:
    if isinstance(raw, (str, bytes)) or not hasattr(raw, "__iter__"):
        raise SettingError(f"{protocol.INPUT_SHAPE}={raw!r} is not a list of sizes")
    return list(raw)


def _whole_number(raw: Any, key: str, minimum: int = 1) -> int:
    """An int of the message's envelope (not a bool, nor a float), at least `minimum`."""
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < minimum:
        raise SettingError(f"{key} must be an integer >= {minimum}; got {raw!r}")
    return raw


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
