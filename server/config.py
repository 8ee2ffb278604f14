"""The coordinator's run configuration: one typed object, validated where it enters."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedsafe.settings import (
    RUN_SETTINGS, RunSettings, SettingError, check_device_name, check_settings, parse_settings, sent_keys,
    strategy_params,
)

CLIENT_DP_STRATEGIES = ("fedavg", "fedprox")


class ConfigError(ValueError):
    """A run-config value that cannot be used; the message names the key and what is allowed."""


@dataclass(frozen=True)
class RunConfig(RunSettings):
    """A run's settings (fields, types and defaults: fedsafe.settings.RUN_SETTINGS), validated where they
    enter: each value against its declared bounds, then the settings against each other.

    A pickable setting left at PICKED (0, or "") is filled in here for the run's privacy budget
    (fedsafe.picked_defaults), so every field holds the value the run uses. `picked` remembers which
    ones and their values: a copy (dataclasses.replace, RunConfig(**cfg.__dict__)) that changes the
    budget picks them again, and one that sets a picked setting to another value keeps that value."""

    picked: tuple[tuple[str, Any], ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        self._pick_defaults()
        self._check()

    def _pick_defaults(self) -> None:
        from fedsafe.picked_defaults import PICKABLE, pick
        from fedsafe.settings import by_key

        settings = by_key(RUN_SETTINGS)
        before = dict(self.picked)
        unset = {name for name in PICKABLE
                 if getattr(self, name) == settings[name.replace("_", "-")].type()  # PICKED
                 or (name in before and getattr(self, name) == before[name])}  # picked for a copy's original
        picks = pick(self.__dict__, unset)
        for name, value in picks.values.items():
            object.__setattr__(self, name, value)
        object.__setattr__(self, "picked", tuple(picks.values.items()))

    def picks_line(self) -> str | None:
        """What fedsafe picked for this run and why, in one line; None when the user set every one."""
        from fedsafe.picked_defaults import pick

        return pick(self.__dict__, set(dict(self.picked))).line() if self.picked else None

    def _check(self) -> None:
        from fedsafe.client.accounting import ACCOUNTANTS
        from fedsafe.client.data import PARTITIONERS
        from fedsafe.client.training import OPTIMIZERS
        from fedsafe.models import UnknownModelError
        from fedsafe.models.registry import import_reference, is_user_model_ref, model_family
        from fedsafe.models.tasks import TASK_NAMES

        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        try:
            model_family(self.model)  # a user's factory is imported here: its module must be installed
            if is_user_model_ref(self.task):
                import_reference(self.task, "task")  # and a user's task
        except UnknownModelError as err:
            raise ConfigError(str(err)) from None
        try:
            check_settings(RUN_SETTINGS, self.to_mapping())  # each value within its declared bounds
        except SettingError as err:
            raise ConfigError(str(err)) from None
        need(not self.task or self.task in TASK_NAMES or is_user_model_ref(self.task),
             f"unknown task {self.task!r}; choose one of: {', '.join(TASK_NAMES)}, or a factory as package.module:function")
        need(self.optimizer in OPTIMIZERS, f"unknown optimizer {self.optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}")
        need(self.partitioner in PARTITIONERS,
             f"unknown partitioner {self.partitioner!r}; choose one of: {', '.join(PARTITIONERS)}")
        need(self.partitioner != "natural" or bool(self.partition_by),
             "the natural partitioner needs partition-by=<group column>")
        need(self.accountant in ACCOUNTANTS,
             f"unknown accountant {self.accountant!r}; choose one of: {', '.join(ACCOUNTANTS)}")
        try:
            check_device_name(self.server_device)  # whether this machine has it: server.evaluation.server_device
        except ValueError as err:
            raise ConfigError(f"server-device: {err}") from None
        self._check_aggregation(need)
        self._check_training_practice(need)
        need(not self.input_shape or all(p.strip().isdigit() and int(p) > 0 for p in self.input_shape.split("x")),
             f"input-shape must look like 30 or 1x8x8; got {self.input_shape!r}")

    def _check_aggregation(self, need) -> None:
        """The strategy, client-level DP and SecAgg+ settings against each other."""
        from fedsafe.strategies import StrategyError, check_strategy, strategy_names, strategy_spec

        need(self.strategy in strategy_names(),
             f"unknown strategy {self.strategy!r}; choose one of: {', '.join(strategy_names())}")
        try:
            check_strategy(self.strategy, self.strategy_params(), self.expected_sample_size())
        except StrategyError as err:
            raise ConfigError(str(err)) from None
        if self.client_dp != "off":
            need(self.strategy in CLIENT_DP_STRATEGIES,
                 f"client-dp={self.client_dp} needs an averaging strategy ({', '.join(CLIENT_DP_STRATEGIES)}): "
                 f"its noise is calibrated to the mean of clipped updates; got strategy {self.strategy!r}")
            need(not self.secagg,
                 "client-dp with secagg is not supported: server-side clipping needs each node's update, "
                 "which SecAgg+ hides from the server")
        need(self.client_level_epsilon == 0 or self.client_dp != "off",
             "client-level-epsilon is a budget for client-level DP: set client-dp to fixed or adaptive")
        if self.secagg:
            need(strategy_spec(self.strategy).sums_updates,
                 f"secagg gives the server only the sum of the updates; strategy {self.strategy!r} needs each "
                 f"update. Strategies that work on the sum: "
                 f"{', '.join(n for n in strategy_names() if strategy_spec(n).sums_updates)}")
            need(not self.freeze, "freeze cannot be combined with secagg: the masked sum covers whole models only")
            need(not self.compress_updates,
                 "compress-updates cannot be combined with secagg: SecAgg+ quantises the masked updates itself "
                 "(secagg-clipping-range); use one or the other")
            sampled = self.expected_sample_size()
            need(sampled is None or sampled >= 3, f"secagg needs at least 3 nodes per round; got {sampled}")
        if self.distributed_dp:
            need(self.secagg and self.dp, "distributed-dp needs secagg and dp: each node adds only its share of the "
                                          "noise, which protects a record only inside the SecAgg+ sum")
            need(self.local_steps == 1, f"distributed-dp needs local-steps=1 (one DP-SGD step per round, DP-FedSGD): "
                                        f"the sum of noise shares is proven per step; got local-steps={self.local_steps}")
            need(self.optimizer == "sgd" and self.l1 == 0,
                 "distributed-dp needs optimizer sgd and l1 0: each update must be linear in its noisy gradient")

    def _check_training_practice(self, need) -> None:
        """Early stopping, the initial checkpoint and the model's options."""
        from fedsafe.models import ModelConfigError, parse_model_options

        if self.early_stopping_metric:
            from fedsafe.models.tasks import higher_is_better

            try:
                higher_is_better(self.early_stopping_metric)
            except ValueError as err:
                raise ConfigError(f"early-stopping-metric: {err}") from None
        need(not self.init_checkpoint or Path(self.init_checkpoint).expanduser().is_file(),
             f"init-checkpoint: file not found: {self.init_checkpoint}")
        try:
            parse_model_options(self.model_options)
        except ModelConfigError as err:
            raise ConfigError(str(err)) from None

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> RunConfig:
        """From Flower run-config keys (`num-rounds`, `local-epochs`, …): each parsed to its declared type."""
        try:
            return cls(**parse_settings(RUN_SETTINGS, values, "run-config", picks=True))
        except SettingError as err:
            raise ConfigError(str(err)) from None

    def to_mapping(self) -> dict[str, Any]:
        """The run settings by key, as the run uses them (picked ones filled in)."""
        return {k.replace("_", "-"): v for k, v in asdict(self).items() if k != "picked"}

    def strategy_params(self) -> dict[str, Any]:
        """The strategy parameters, by run-config key (`server-lr`, `trim-beta`, …)."""
        mapping = self.to_mapping()
        return {key: mapping[key] for key in strategy_params()}

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
        "batch-size", "optimizer", "lr", "lr-schedule", "momentum", "weight-decay", "dp", "epsilon", "delta",
        "max-grad-norm", "accountant", "strategy", "fraction-train", "max-update-norm", "max-strikes",
        "input-shape", "num-classes",
    )

    def differences(self, other: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
        """Identity keys whose value in `other` (a saved config mapping) differs from this config's."""
        mine = self.to_mapping()
        return {k: (other.get(k), mine[k]) for k in self.IDENTITY_KEYS if k in other and other[k] != mine[k]}

    def train_config(self) -> dict[str, Any]:
        """The run settings every train message carries (those a node reads: fedsafe.settings, side node
        or both); the round loop adds the model's spec and the run key (fedsafe.protocol)."""
        mapping = self.to_mapping()
        return {key: mapping[key] for key in sent_keys()}
