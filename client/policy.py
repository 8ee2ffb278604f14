"""What the node operator allows, and what the coordinator asks: parsed once, validated at the edge."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fedsafe import protocol
from fedsafe.settings import (
    NODE_SETTINGS, RUN_SETTINGS, SentSettings, SettingError, by_key, check_device_name, check_settings, parse_settings,
)

NODE_DEFAULTS = {s.key: s.default for s in NODE_SETTINGS}
DEFAULT_STATE_DIR = NODE_DEFAULTS["state-dir"]
DEFAULT_MAX_EPSILON = NODE_DEFAULTS["max-epsilon"]
DEFAULT_DELTA = NODE_DEFAULTS["delta"]
DEFAULT_MAX_NOISE_MULTIPLIER = NODE_DEFAULTS["max-noise-multiplier"]
# debug-poison kinds (tests of the coordinator's update validation); no-dp: the reply without the DP fields
# (ε, δ, steps, σ), as a node training without DP (a stock Flower client) sends it
POISONS = ("nan", "shape", "norm", "no-dp")


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
    max_noise_multiplier: float = DEFAULT_MAX_NOISE_MULTIPLIER  # a run needing a larger σ is refused
    # Distributed DP: which ε counts against max_epsilon (fedsafe.client.ledger.CAP_BASES).
    cap_basis: str = NODE_DEFAULTS["cap-basis"]
    device: str = "auto"
    allow_non_private: bool = False  # a run may turn DP off only where the operator said so
    seed_noise: bool = False  # seeded DP noise is reproducible, and so predictable: simulations and tests only
    # Simulations only: the driver's pre-partitioned training split (fedsafe.client.data.save_partitions).
    partition_store: str | None = None
    debug_poison: tuple[str, ...] = ()  # TEST ONLY: send deliberately bad updates (nan, shape, norm), by round
    # A virtual node of a simulation (set by the simulation driver in code, never from node-config, which a
    # deployed node's operator writes): only then may a run name a data file for the node to load.
    simulated: bool = False
    # User model factories (package.module:function, or a package whose factories all are) this node may
    # import: a coordinator names the code a node runs, so only the operator's list may widen it.
    allow_models: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        try:
            check_settings(NODE_SETTINGS, {"max-epsilon": self.max_epsilon, "delta": self.delta,
                                           "max-noise-multiplier": self.max_noise_multiplier,
                                           "cap-basis": self.cap_basis})
        except SettingError as err:
            raise PolicyError(str(err)) from None
        try:
            check_device_name(self.device)
        except ValueError as err:
            raise PolicyError(str(err)) from None
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
            max_noise_multiplier=values["max_noise_multiplier"],
            cap_basis=values["cap_basis"],
            device=values["device"],
            allow_non_private=values["allow_non_private"],
            seed_noise=values["seed_noise"],
            debug_poison=tuple(p.strip() for p in values["debug_poison"].split(",") if p.strip()),
            allow_models=tuple(m.strip() for m in values["allow_models"].split(",") if m.strip()),
        )

    def check_model(self, model: str) -> None:
        """PolicyError unless this node may build `model`: built-in families and those installed
        packages register (entry points, installed by the operator) always; a ``module:function``
        reference only where node-config allow-models lists it or a package above it."""
        from fedsafe.models.registry import is_user_model_ref

        if not is_user_model_ref(model):
            return
        module = model.partition(":")[0]
        if any(model == allowed or module == allowed or module.startswith(allowed + ".")
               for allowed in self.allow_models):
            return
        raise PolicyError(
            f"the run asks this node to import model or task code {model!r}; node-config allow-models does not list it "
            f"(add '{model}' or its package there if the operator has installed and reviewed that code)"
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
            # The one refusal of what a node does not take, a privacy-audit canary request included: audits
            # run in simulation only (fedsafe.simulations.audit), so no deployed node knows such a key.
            raise RequestError(f"train request has unknown keys {unknown}: this node trains on no setting it does "
                               f"not know (a newer fedsafe's, or one no deployed node takes, such as privacy-audit "
                               f"canaries: audits run in simulation only)")
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


def check_distributed_dp(request: TrainRequest) -> None:
    """RequestError unless a distributed-DP request trains what the sum-of-noise-shares accounting proves:
    one DP-SGD step per round (DP-FedSGD), each node's update linear in its noisy gradient sum (plain SGD,
    no L1 soft-thresholding after the noise), a classifier-style task (not a GAN, whose generator is a
    non-linear function of the noised discriminator)."""
    if not request.distributed_dp:
        return
    problems = [why for bad, why in (
        (not request.dp, "it needs dp=true"),
        (request.local_steps != 1, f"each round must be one DP-SGD step (local-steps=1; got {request.local_steps}): "
                                   "the sum of noise shares is proven per step, not for several local steps"),
        (request.optimizer != "sgd", f"optimizer must be sgd (got {request.optimizer}): the sum must be linear in "
                                     "each node's noisy gradient"),
        (request.l1 > 0, "l1 must be 0: its soft-thresholding after the noise is not linear"),
        (request.task == "generation", "a GAN's generator is not linear in the noised gradient"),
    ) if bad]
    if problems:
        raise RequestError(f"distributed-dp refused: {'; '.join(problems)}")


def resolve_terms(policy: NodePolicy, request: TrainRequest) -> PrivacyTerms:
    check_distributed_dp(request)
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
