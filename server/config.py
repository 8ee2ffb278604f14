"""The coordinator's run configuration: one typed object, validated where it enters."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any


CLIENT_DP_MODES = ("off", "fixed", "adaptive")
CLIENT_DP_STRATEGIES = ("fedavg", "fedprox")
STRATEGY_PARAM_FIELDS = (
    "proximal_mu", "server_lr", "server_momentum", "beta_1", "beta_2", "tau", "trim_beta", "num_malicious",
    "krum_selected",
)


class ConfigError(ValueError):
    """A run-config value that cannot be used; the message names the key and what is allowed."""


@dataclass(frozen=True)
class RunConfig:
    num_rounds: int = 5
    model: str = "mlp"
    dataset: str = "breast-cancer"
    partitioner: str = "iid"
    alpha: float = 0.5
    classes_per_node: int = 2  # pathological partitioner
    partition_by: str = ""  # natural partitioner: the data's group column
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
    # Strategy parameters (fedsafe.strategies.registry.PARAM_DEFAULTS says which strategy takes which).
    proximal_mu: float = 0.0
    server_lr: float = 0.0  # 0: the strategy's Flower default
    server_momentum: float = 0.0
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-3
    trim_beta: float = 0.2
    num_malicious: int = 0
    krum_selected: int = 0
    # Client-level DP on the server (DP-FedAvg): off, fixed or adaptive clipping of whole updates.
    client_dp: str = "off"
    client_noise_multiplier: float = 1.0  # z: noise std = z · C / nodes sampled per round
    client_clipping_norm: float = 1.0  # C for fixed clipping; the initial C for adaptive clipping
    client_target_quantile: float = 0.5  # adaptive: fraction of updates left unclipped
    client_clip_lr: float = 0.2  # adaptive: geometric step of C
    client_level_epsilon: float = 0.0  # stop the run before client-level ε would pass this; 0: no budget
    client_level_delta: float = 1e-5
    # Skip nodes whose last reported ledger cannot afford the next round.
    budget_aware: bool = False
    # SecAgg+: the server learns only the sum of the updates.
    secagg: bool = False
    secagg_shares: float = 1.0  # fraction of the sampled nodes each node shares its secrets with
    secagg_threshold: float = 0.5  # fraction of those shares needed to reconstruct a dropped node's mask
    secagg_clipping_range: float = 8.0  # updates are clipped to ±this per coordinate before quantisation
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
    tensorboard: bool = False  # also write TensorBoard event files under <out-dir>/tensorboard
    # model and training practice (sent to the nodes, but init-checkpoint and early stopping)
    model_options: str = ""  # "hidden=128,dropout=0.2": the family's builder options
    l1: float = 0.0  # L1 penalty (a proximal step after each optimizer step); weight-decay is L2
    augment: bool = False  # random one-pixel shifts of each image, per sample, on the nodes
    init_checkpoint: str = ""  # initial weights: a .pt state dict or a fedsafe checkpoint.pt / best_model.pt
    freeze: str = ""  # comma-separated parameter-name prefixes that are neither trained nor uploaded
    early_stopping_patience: int = 0  # stop after this many rounds without a better validation metric; 0: off
    early_stopping_metric: str = ""  # the validation metric to watch; default: the task's headline metric

    def __post_init__(self) -> None:
        from fedsafe.client.accounting import ACCOUNTANTS
        from fedsafe.client.data import PARTITIONERS
        from fedsafe.client.training import OPTIMIZERS
        from fedsafe.models import model_names
        from fedsafe.strategies import StrategyError, check_strategy, strategy_names, strategy_spec

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
        need(self.classes_per_node >= 1, f"classes-per-node must be >= 1; got {self.classes_per_node}")
        need(self.partitioner != "natural" or bool(self.partition_by),
             "the natural partitioner needs partition-by=<group column>")
        need(self.num_partitions >= 0, f"nodes must be >= 1; got {self.num_partitions}")
        need(not self.dp or self.epsilon > 0, f"epsilon must be > 0; got {self.epsilon}")
        need(0 < self.delta < 1, f"delta must be in (0, 1); got {self.delta}")
        need(self.max_grad_norm > 0, f"max-grad-norm must be > 0; got {self.max_grad_norm}")
        need(self.accountant in ACCOUNTANTS,
             f"unknown accountant {self.accountant!r}; choose one of: {', '.join(ACCOUNTANTS)}")
        need(self.strategy in strategy_names(),
             f"unknown strategy {self.strategy!r}; choose one of: {', '.join(strategy_names())}")
        try:
            check_strategy(self.strategy, self.strategy_params(), self.expected_sample_size())
        except StrategyError as err:
            raise ConfigError(str(err)) from None
        need(self.client_dp in CLIENT_DP_MODES,
             f"unknown client-dp {self.client_dp!r}; choose one of: {', '.join(CLIENT_DP_MODES)}")
        if self.client_dp != "off":
            need(self.strategy in CLIENT_DP_STRATEGIES,
                 f"client-dp={self.client_dp} needs an averaging strategy ({', '.join(CLIENT_DP_STRATEGIES)}): "
                 f"its noise is calibrated to the mean of clipped updates; got strategy {self.strategy!r}")
            need(self.client_noise_multiplier > 0,
                 f"client-noise-multiplier must be > 0; got {self.client_noise_multiplier}")
            need(self.client_clipping_norm > 0, f"client-clipping-norm must be > 0; got {self.client_clipping_norm}")
            need(0 <= self.client_target_quantile <= 1,
                 f"client-target-quantile must be in [0, 1]; got {self.client_target_quantile}")
            need(self.client_clip_lr > 0, f"client-clip-lr must be > 0; got {self.client_clip_lr}")
            need(not self.secagg,
                 "client-dp with secagg is not supported: server-side clipping needs each node's update, "
                 "which SecAgg+ hides from the server")
        need(self.client_level_epsilon >= 0, f"client-level-epsilon must be >= 0; got {self.client_level_epsilon}")
        need(self.client_level_epsilon == 0 or self.client_dp != "off",
             "client-level-epsilon is a budget for client-level DP: set client-dp to fixed or adaptive")
        need(0 < self.client_level_delta < 1, f"client-level-delta must be in (0, 1); got {self.client_level_delta}")
        if self.secagg:
            need(strategy_spec(self.strategy).sums_updates,
                 f"secagg gives the server only the sum of the updates; strategy {self.strategy!r} needs each "
                 f"update. Strategies that work on the sum: "
                 f"{', '.join(n for n in strategy_names() if strategy_spec(n).sums_updates)}")
            need(not self.freeze, "freeze cannot be combined with secagg: the masked sum covers whole models only")
            need(0 < self.secagg_shares <= 1, f"secagg-shares must be in (0, 1]; got {self.secagg_shares}")
            need(0 < self.secagg_threshold <= 1, f"secagg-threshold must be in (0, 1]; got {self.secagg_threshold}")
            need(self.secagg_clipping_range > 0,
                 f"secagg-clipping-range must be > 0; got {self.secagg_clipping_range}")
            sampled = self.expected_sample_size()
            need(sampled is None or sampled >= 3, f"secagg needs at least 3 nodes per round; got {sampled}")
        need(0 < self.fraction_train <= 1, f"fraction-train must be in (0, 1]; got {self.fraction_train}")
        need(self.min_replies >= 1, f"min-replies must be >= 1; got {self.min_replies}")
        need(self.min_nodes >= 1, f"min-nodes must be >= 1; got {self.min_nodes}")
        need(self.max_update_norm >= 0, f"max-update-norm must be >= 0; got {self.max_update_norm}")
        need(self.round_timeout > 0, f"round-timeout must be > 0; got {self.round_timeout}")
        need(self.l1 >= 0, f"l1 must be >= 0; got {self.l1}")
        need(self.early_stopping_patience >= 0,
             f"early-stopping-patience must be >= 0 (0: off); got {self.early_stopping_patience}")
        if self.early_stopping_metric:
            from fedsafe.models.tasks import higher_is_better

            try:
                higher_is_better(self.early_stopping_metric)
            except ValueError as err:
                raise ConfigError(f"early-stopping-metric: {err}") from None
        need(not self.init_checkpoint or Path(self.init_checkpoint).expanduser().is_file(),
             f"init-checkpoint: file not found: {self.init_checkpoint}")
        from fedsafe.models import ModelConfigError, parse_model_options

        try:
            parse_model_options(self.model_options)
        except ModelConfigError as err:
            raise ConfigError(str(err)) from None
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

    def strategy_params(self) -> dict[str, Any]:
        """The strategy parameters, by run-config key (`server-lr`, `trim-beta`, …)."""
        return {name.replace("_", "-"): getattr(self, name) for name in STRATEGY_PARAM_FIELDS}

    def min_train_nodes(self) -> int:
        return min(self.min_replies, self.min_nodes)

    def expected_sample_size(self) -> int | None:
        """Nodes sampled per round when the federation's size is known (simulations), else None."""
        if self.num_partitions <= 0:
            return None
        return min(self.num_partitions, max(int(self.num_partitions * self.fraction_train), self.min_train_nodes()))

    @property
    def out_path(self) -> Path:
        return Path(self.out_dir).expanduser()

    @property
    def model_input_shape(self) -> tuple[int, ...] | None:
        return tuple(int(p) for p in self.input_shape.split("x")) if self.input_shape else None

    # Keys that define what a run computes: a resumed run must not change them (see check_resumable).
    # num-rounds may grow at resume (a run extended); nodes then hold the σ they fixed for the first plan
    # and refuse rounds past the ε they granted, which the coordinator reports.
    IDENTITY_KEYS = (
        "model", "dataset", "partitioner", "alpha", "num-partitions", "seed", "local-epochs",
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
            "num-rounds", "model", "dataset", "partitioner", "alpha", "classes-per-node", "partition-by",
            "num-partitions", "seed",
            "local-epochs", "batch-size", "optimizer", "lr", "momentum", "weight-decay", "dp",
            "epsilon", "delta", "max-grad-norm", "accountant",
            "model-options", "l1", "augment", "freeze",
        )
        mapping = self.to_mapping()
        return {k: mapping[k] for k in keys}
