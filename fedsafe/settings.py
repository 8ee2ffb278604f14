"""One declaration of a run's settings and of a node's policy keys: name, type, default, bounds, help,
and which side reads each.

Everything else is derived from these tables: the coordinator's RunConfig (fedsafe.server.config) and
its validation, the `fedsafe simulate`/`sweep` flags (fedsafe.cli), the keys of the train message the
coordinator sends (RunConfig.train_config) and the node's parsing of it (fedsafe.client.policy
.TrainRequest), and the node-config keys a node accepts (NodePolicy.from_node_config). pyproject.toml's
`[tool.flwr.app.config]` is checked against RUN_SETTINGS by a test.

This module imports nothing of fedsafe's, so the node, the coordinator and the strategies all can.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, make_dataclass
from typing import Any

COORDINATOR = "coordinator"  # only the coordinator reads it
NODE = "node"  # the coordinator sends it in every train message; the nodes read it
BOTH = "both"  # the coordinator reads it and sends it; the nodes read it

STRATEGY_GROUP = "strategy parameters (see strategies/registry.py)"
CLIENT_DP_GROUP = "client-level DP on the server (DP-FedAvg)"
SECAGG_GROUP = "secure aggregation"


# The declared default of a pickable setting ("" for a str one): "fedsafe picks it" (fedsafe.picked_defaults),
# never sent to a node.
PICKED = 0


LR_SCHEDULES = ("constant", "cosine")


class SettingError(ValueError):
    """A value a setting cannot take; the message names the key."""


@dataclass(frozen=True)
class Setting:
    """One setting: its key (`local-epochs`), the Python name (`local_epochs`) follows from it."""

    key: str
    default: Any  # its type is the setting's type: int, float, str or bool
    help: str
    side: str = COORDINATOR
    bounds: str = ""  # "> 0", ">= 1", "(0, 1]", "[0, 1]": checked where the value is parsed
    choices: tuple[str, ...] = ()
    requires: str = ""  # bounds and choices apply only while this bool setting is true (or this str not "off")
    flag: str | None = ""  # the `fedsafe simulate`/`sweep` flag: "" its key, None: no flag
    listable: bool = False  # `fedsafe sweep` takes a comma-separated list of values
    in_sweep: bool = True  # `fedsafe sweep` has the flag too (False: `fedsafe simulate` only)
    group: str = ""  # its group of flags in --help
    # Its declared default is PICKED: the coordinator picks the value for the run's privacy budget
    # (fedsafe.server.defaults) unless the user sets one. A node never takes PICKED: it needs a value.
    pickable: bool = False

    @property
    def name(self) -> str:
        return self.key.replace("-", "_")

    @property
    def type(self) -> type:
        return type(self.default)

    @property
    def sent(self) -> bool:
        """Whether the train message carries it (and the node requires it)."""
        return self.side in (NODE, BOTH)

    def parse(self, raw: Any) -> Any:
        """`raw` (a TOML value, a --run-config word, a message value) as this setting's type."""
        kind = self.type
        try:
            if kind is bool:
                if isinstance(raw, bool):
                    return raw
                if isinstance(raw, str) and raw.lower() in ("true", "false"):
                    return raw.lower() == "true"
                raise ValueError
            if kind in (int, float) and isinstance(raw, (bool, bytes)):
                raise ValueError
            if kind is int and isinstance(raw, float) and not raw.is_integer():
                raise ValueError
            return kind(raw)
        except (TypeError, ValueError):
            raise SettingError(f"{self.key}={raw!r} is not a valid {kind.__name__}") from None

    def check(self, value: Any, picks: bool = False) -> None:
        """Raise SettingError unless `value` is within the bounds and choices (`picks`: the coordinator's
        check, where a pickable setting may still be PICKED, for fedsafe to fill in)."""
        if picks and self.pickable and value == self.type() and not isinstance(value, bool):
            return  # PICKED (0, or "" for a str setting)
        if self.choices and value not in self.choices:
            raise SettingError(f"unknown {self.key} {value!r}; choose one of: {', '.join(self.choices)}")
        if self.bounds and not within(self.bounds, value):
            what = f"in {self.bounds}" if self.bounds[0] in "([" else self.bounds
            raise SettingError(f"{self.key} must be {what}; got {value}")

    def applies(self, values: Mapping[str, Any]) -> bool:
        """Whether the bounds apply, given the other settings' `values` (by key)."""
        if not self.requires:
            return True
        gate = values.get(self.requires)
        return gate not in (False, "off", None)


def within(bounds: str, value: float) -> bool:
    """`value` within `bounds`: "> 0", ">= 1", or an interval "(0, 1]". NaN is within nothing."""
    if isinstance(value, float) and math.isnan(value):
        return False
    if bounds.startswith(">="):
        return value >= float(bounds[2:])
    if bounds.startswith(">"):
        return value > float(bounds[1:])
    low, high = (float(part) for part in bounds[1:-1].split(","))
    above = value >= low if bounds[0] == "[" else value > low
    below = value <= high if bounds[-1] == "]" else value < high
    return above and below


# ---- a run's settings: Flower's run-config keys -------------------------------------------------
# The coordinator's defaults. `side`: who reads it (a NODE or BOTH setting travels in every train message).
RUN_SETTINGS: tuple[Setting, ...] = (
    Setting("num-rounds", PICKED, "federated rounds (0: fedsafe picks from the privacy budget)", BOTH, ">= 1",
            flag="rounds", pickable=True),
    Setting("model", "mlp", "model family: mlp, cnn, lstm, gru, transformer, autoencoder, gan, one an "
            "installed package registers (entry points fedsafe.models), or a factory package.module:function", BOTH,
            listable=True),
    Setting("dataset", "breast-cancer",
            "built-in dataset (breast-cancer, digits, digits-seq, digits-anomaly, diabetes, synthetic) "
            "or a data file: .npz, .csv/.parquet with a 'label' column, a saved Hugging Face dataset", BOTH),
    Setting("model-options", "", "the family's options, e.g. 'hidden=128,dropout=0.2'", BOTH),
    # The coordinator puts it in the model's spec, which every train message carries (fedsafe.protocol.TASK).
    Setting("task", "", "what the model is trained for when the data's own task does not fit: classification, "
            "regression, reconstruction, generation, or a user's task factory package.module:function", in_sweep=False),
    Setting("partitioner", "iid", "iid, dirichlet, pathological or natural", BOTH),
    Setting("alpha", 0.5, "Dirichlet concentration, smaller is more skewed", BOTH, "> 0", listable=True),
    Setting("classes-per-node", 2, "pathological partitioner: labels per node", BOTH, ">= 1"),
    Setting("partition-by", "", "natural partitioner: the data's group column", BOTH),
    Setting("num-partitions", 0, "simulated nodes; 0 in deployments, where nodes bring their own data", BOTH,
            ">= 0", flag=None),  # `fedsafe simulate --nodes`
    Setting("seed", 42, "fixes partitions, sampling, initial weights and DP noise", BOTH),
    Setting("local-epochs", PICKED, "local epochs per round (0: fedsafe picks)", NODE, ">= 1", pickable=True),
    Setting("local-steps", 0, "DP-SGD steps (Poisson batches) per round instead of whole epochs (0: local-epochs "
            "epochs); distributed-dp needs 1", NODE, ">= 0"),
    Setting("batch-size", PICKED,
            "batch size B: each record joins each batch with probability 1/ceil(n/B) (Poisson sampling), so the "
            "expected batch is n/ceil(n/B) <= B for a node with n records (0: fedsafe picks)",
            NODE, ">= 1", pickable=True),
    Setting("optimizer", "sgd", "sgd, adam or rmsprop", NODE),
    Setting("lr", float(PICKED), "local learning rate (0: fedsafe picks)", NODE, "> 0", pickable=True),
    Setting("lr-schedule", "", "the local learning rate over the run's rounds: constant, or cosine (round r of R "
            "trains at lr·(1 + cos(π(r−1)/R))/2: small steps at the end, where DP noise would otherwise shake the "
            "final model) ('': fedsafe picks)", NODE, choices=LR_SCHEDULES, pickable=True),
    Setting("momentum", 0.0, "optimizer momentum", NODE, ">= 0"),
    Setting("weight-decay", 0.0, "L2 penalty", NODE, ">= 0"),
    Setting("l1", 0.0, "L1 penalty (a proximal step after each optimizer step)", NODE, ">= 0"),
    Setting("augment", False, "random one-pixel shifts of each image, per sample, on the nodes", NODE),
    Setting("freeze", "", "comma-separated parameter-name prefixes not to train (nor upload)", BOTH),
    Setting("init-checkpoint", "", "initial weights: a .pt state dict or a fedsafe checkpoint.pt / best_model.pt"),
    Setting("early-stopping-patience", 0, "stop after this many rounds without a better validation metric (0: off)",
            bounds=">= 0"),
    Setting("early-stopping-metric", "", "validation metric to watch (default: the task's headline metric)"),
    Setting("dp", True, "DP-SGD on the nodes; --no-dp: train without it (a non-private baseline)", BOTH, flag="no-dp"),
    Setting("epsilon", 3.0, "each node's ε budget for the run", BOTH, "> 0", requires="dp", listable=True),
    Setting("delta", 1e-5, "δ of the (ε, δ) guarantee", BOTH, "(0, 1)"),
    Setting("max-grad-norm", 1.0, "per-sample clipping norm C", NODE, "> 0"),
    Setting("accountant", "rdp", "rdp or prv", NODE),
    # Not privacy-relevant: σ, q and the steps are the same in either precision, and so is ε.
    Setting("precision", "fp32", "the nodes' training precision: fp32, or bf16 autocast for the forward pass "
            "with per-sample gradients, clipping and noise in fp32 (not for GANs)", NODE,
            choices=("fp32", "bf16")),
    Setting("fraction-train", 1.0, "fraction of nodes sampled per round", bounds="(0, 1]", flag="fraction"),
    Setting("strategy", "fedavg",
            "fedavg, fedprox, fedadam, fedyogi, fedadagrad, fedavgm, fedmedian, fedtrimmedavg, krum, multikrum "
            "or bulyan", listable=True),
    # The strategy parameters (their group): fedsafe.strategies.registry says which strategy takes which,
    # and checks their values.
    Setting("proximal-mu", 0.0, "fedprox: μ of the proximal term μ/2·||w − w_global||² in the nodes' loss", BOTH,
            ">= 0", group=STRATEGY_GROUP),
    Setting("server-lr", 0.0, "fedadam/fedyogi/fedadagrad η, fedavgm server learning rate (0: Flower's default)",
            group=STRATEGY_GROUP),
    Setting("server-momentum", 0.0, "fedavgm", group=STRATEGY_GROUP),
    Setting("beta-1", 0.9, "fedadam, fedyogi: first-moment decay", group=STRATEGY_GROUP),
    Setting("beta-2", 0.99, "fedadam, fedyogi: second-moment decay", group=STRATEGY_GROUP),
    Setting("tau", 1e-3, "fedadam, fedyogi, fedadagrad: adaptivity", group=STRATEGY_GROUP),
    Setting("trim-beta", 0.2, "fedtrimmedavg: fraction cut at each end, per coordinate", group=STRATEGY_GROUP),
    Setting("num-malicious", 0, "krum, multikrum, bulyan: f, the Byzantine nodes tolerated per round",
            group=STRATEGY_GROUP),
    Setting("krum-selected", 0, "multikrum: updates averaged after selection (0: n − f)", group=STRATEGY_GROUP),
    Setting("min-replies", 1, "valid replies needed to aggregate a round", bounds=">= 1"),
    Setting("budget-aware", False, "do not sample nodes whose ledger cannot afford the next round"),
    Setting("client-dp", "off", "client-level DP: off, or fixed or adaptive clipping of whole updates",
            choices=("off", "fixed", "adaptive"), group=CLIENT_DP_GROUP),
    Setting("client-noise-multiplier", 1.0, "z: noise std = z·C / nodes sampled per round", bounds="> 0",
            requires="client-dp", group=CLIENT_DP_GROUP),
    Setting("client-clipping-norm", 1.0, "C (adaptive: its initial value)", bounds="> 0", requires="client-dp",
            group=CLIENT_DP_GROUP),
    Setting("client-target-quantile", 0.5, "adaptive: fraction of updates left unclipped", bounds="[0, 1]",
            requires="client-dp", group=CLIENT_DP_GROUP),
    Setting("client-clip-lr", 0.2, "adaptive: geometric step of C", bounds="> 0", requires="client-dp",
            flag=None, group=CLIENT_DP_GROUP),
    Setting("client-level-epsilon", 0.0, "stop before client-level ε would pass this (0: no budget)", bounds=">= 0",
            group=CLIENT_DP_GROUP),
    Setting("client-level-delta", 1e-5, "δ of the client-level guarantee", bounds="(0, 1)", group=CLIENT_DP_GROUP),
    Setting("secagg", False, "SecAgg+: the server learns only the sum of the updates", group=SECAGG_GROUP),
    Setting("secagg-shares", 1.0, "fraction of the sampled nodes each node shares its secrets with",
            bounds="(0, 1]", requires="secagg", group=SECAGG_GROUP),
    Setting("secagg-threshold", 0.5, "fraction of those shares needed to reconstruct a dropped node's mask",
            bounds="(0, 1]", requires="secagg", group=SECAGG_GROUP),
    Setting("distributed-dp", False, "distributed DP over SecAgg+: each node adds only its share σ/√m of the noise "
            "(m: SecAgg+'s reconstruction threshold, the fewest nodes whose sum the server can see); needs secagg, "
            "local-steps 1 and optimizer sgd", BOTH, group=SECAGG_GROUP),
    Setting("secagg-clipping-range", 8.0, "updates are clipped to ±this per coordinate before quantisation",
            bounds="> 0", requires="secagg", flag=None, group=SECAGG_GROUP),
    # Post-processing of the DP output (the noised update): no ε. fedsafe/update_compression.py.
    Setting("compress-updates", False, "nodes upload their noised update in 8 bits per value, deflated (~4x fewer "
            "bytes; post-processing of the DP output, no ε); not with secagg, which quantises itself", BOTH),
    Setting("min-nodes", 2, "connected nodes needed before a round starts", bounds=">= 1", flag=None),
    Setting("max-update-norm", 0.0, "L2 bound on an update's distance from the global model (0: 10 × the round's "
            "lower-median norm, scaled by each node's expected batch; see docs/deployment.md)",
            bounds=">= 0", flag=None),
    Setting("max-strikes", 3, "rejected updates among a node's last 10 before it is excluded from the run "
            "(0: never)",
            bounds=">= 0", flag=None),
    # 10 minutes: a built-in cnn-on-digits round measured about 19 s per node and local epoch on a shared
    # 2-core machine (3 rounds of 2 nodes in 112 s, in one process), and a node that dies is declared
    # unavailable by the SuperLink within ~60 s (its messages then fail at once); the former hour held a
    # round with a hung node for an hour. Also how long a run waits for min-nodes to connect.
    Setting("round-timeout", 600.0, "seconds a round waits for replies; a node silent that long is skipped",
            bounds="> 0", flag=None),
    Setting("poll-interval", 0.2, "seconds between polls for replies (Flower's own send_and_receive: 3)",
            bounds="(0, 60]", flag=None),
    Setting("eval-path", "", "held-out data file (.npz/.csv) for central evaluation (default: the dataset's test "
            "split)", flag=None),
    Setting("input-shape", "", "model input shape, e.g. 30 or 1x8x8, when the coordinator has no data", flag=None),
    Setting("num-classes", 0, "number of classes, when the coordinator has no data (0: from the data)",
            bounds=">= 0", flag=None),
    Setting("server-device", "cpu", "where the coordinator evaluates the global model: cpu, auto, cuda or cuda:N"),
    Setting("out-dir", "results/run", "results directory", flag=None),  # `fedsafe simulate --out`
    Setting("resume", False, "continue the run checkpointed in out-dir (--out)", in_sweep=False),
    Setting("tensorboard", False, "also write TensorBoard event files under <out-dir>/tensorboard"),
)

# The run settings as a typed dataclass: fedsafe.server.config.RunConfig adds validation to it.
RunSettings = make_dataclass(
    "RunSettings", [(s.name, s.type, field(default=s.default)) for s in RUN_SETTINGS], frozen=True,
    namespace={"__module__": __name__, "__doc__": "A run's settings (RUN_SETTINGS), with the coordinator's defaults."},
)
# What a node reads from a train message, typed: fedsafe.client.policy.TrainRequest adds the message's
# envelope to it. No defaults: a node never fills in a value the coordinator did not send.
SentSettings = make_dataclass(
    "SentSettings", [(s.name, s.type) for s in RUN_SETTINGS if s.sent], frozen=True,
    namespace={"__module__": __name__, "__doc__": "The run settings a train message carries (side node or both)."},
)

# ---- a node's policy: Flower's node-config keys, the node operator's own -------------------------
NODE_SETTINGS: tuple[Setting, ...] = (
    Setting("data-path", "", "this node's data: .npz (x, y), .csv/.parquet with a 'label' column "
            "(categorical or missing values: a <file>.schema.json beside it), or a saved Hugging Face dataset", NODE),
    Setting("dataset-id", "", "the name the ledger keys on (default: the digest of the data file's records)", NODE),
    Setting("state-dir", "~/.fedsafe/ledgers", "where the privacy ledgers live", NODE),
    Setting("max-epsilon", 10.0, "lifetime ε cap on this data, over all runs", NODE, "> 0"),
    # Above this σ a node's DP-SGD update is mostly noise (README: "Never trade a good model for noise"):
    # measured, breast-cancer MLP on 5 nodes still learnt at σ≈10 while at σ≈35 its first round fell
    # below the untrained model, and the digits CNN collapsed to chance at σ=31.6.
    Setting("max-noise-multiplier", 20.0, "refuse a run whose calibrated σ (noise multiplier) is above this: "
            "the update would be noise, and ε spent on it wasted", NODE, "> 0"),
    Setting("delta", 1e-5, "δ of the (ε, δ) guarantee; a run asking a larger δ gets this one", NODE, "(0, 1)"),
    Setting("cap-basis", "own-update", "which ε of a distributed-dp run counts against max-epsilon: own-update (the "
            "node's update alone, as if SecAgg+ failed) or aggregate (trusting SecAgg+ and at least its threshold of "
            "honest surviving nodes)", NODE, choices=("own-update", "aggregate")),
    Setting("device", "auto", "auto, cpu, cuda or cuda:N", NODE),
    Setting("allow-non-private", False, "a run may turn DP off only where the operator allows it", NODE),
    Setting("allow-models", "", "user model and task factories this node may import: comma list of "
            "package.module:function or package names (built-in and entry-point models need none)", NODE),
    # Simulations: set by the driver for each virtual node.
    Setting("partition-id", -1, "simulated node: which partition of the run's dataset it holds", NODE),
    Setting("num-partitions", 0, "simulated node: how many partitions the dataset is split into", NODE),
    # Tests and simulations only.
    Setting("seed-noise", False, "TEST ONLY: reproducible, hence predictable, DP noise", NODE),
    Setting("debug-poison", "", "TEST ONLY: comma list of bad updates to send, by round (nan, shape, norm)", NODE),
)


DEVICE_NAMES = "auto, cpu, cuda or cuda:N"


def check_device_name(device: str) -> None:
    """ValueError, in one line, unless `device` names a torch device as settings do (node-config `device`,
    run setting `server-device`): auto, cpu, cuda or cuda:N. Whether this machine has it is
    fedsafe.client.training.resolve_device's question."""
    if not (device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", device)):
        raise ValueError(f"device must be {DEVICE_NAMES}; got {device!r}")


def by_key(settings: tuple[Setting, ...]) -> dict[str, Setting]:
    return {s.key: s for s in settings}


def strategy_params() -> dict[str, Any]:
    """The strategy parameters' keys and defaults."""
    return {s.key: s.default for s in RUN_SETTINGS if s.group == STRATEGY_GROUP}


def sent_keys() -> tuple[str, ...]:
    """The run-setting keys every train message carries."""
    return tuple(s.key for s in RUN_SETTINGS if s.sent)


def parse_settings(settings: tuple[Setting, ...], values: Mapping[str, Any], what: str,
                   picks: bool = False) -> dict[str, Any]:
    """`values` (by key) parsed to their types and checked against their bounds; by Python name.
    Unknown keys are refused with their names; missing ones are left out (the caller decides).
    `picks`: the coordinator's parse, where a pickable setting may be PICKED."""
    known = by_key(settings)
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise SettingError(f"unknown {what} keys {unknown}; known: {sorted(known)}")
    parsed = {key: known[key].parse(raw) for key, raw in values.items()}
    check_settings(settings, parsed, picks)
    return {known[key].name: value for key, value in parsed.items()}


def check_settings(settings: tuple[Setting, ...], values: Mapping[str, Any], picks: bool = False) -> None:
    """Bounds and choices of the settings present in `values` (by key), each where it applies (`picks`:
    a pickable setting may be PICKED)."""
    for setting in settings:
        if setting.key in values and setting.applies(values):
            setting.check(values[setting.key], picks)
