"""What a node and the coordinator say to each other: error codes, message keys, metric names.

One module that both sides import (it imports nothing of fedsafe's), so that a code or a key cannot
mean one thing on the node and another on the coordinator. The run settings a train message carries
are declared in fedsafe.settings.
"""

from __future__ import annotations

# ---- error codes of a node's refusals (Flower's own codes are small integers) -----------------
BUDGET_EXHAUSTED = 4001  # the round would pass the node's ε cap or the run's grant: nothing was spent
REQUEST_REFUSED = 4002  # the request or the node's policy does not allow the round
DATA_UNUSABLE = 4003  # the node's data does not fit the request (file, shape, labels)
LEDGER_DAMAGED = 4004  # the node's privacy ledger cannot be trusted: it refuses rather than forget spend
INTERNAL_ERROR = 4005  # anything else that went wrong on the node
MODEL_UNAVAILABLE = 4006  # the node cannot import the run's model code (a user's module it lacks)
NOISE_TOO_HIGH = 4007  # the run's σ is above the node's max-noise-multiplier: its update would be noise; nothing was spent
# The whole reason an error reply carries, per code: a fixed category, never the exception's text
# (which can quote a cell of the node's data, a label or a file path). The detail stays on the node.
REFUSALS = {
    BUDGET_EXHAUSTED: "privacy budget exhausted",
    REQUEST_REFUSED: "refused by the node's policy",
    DATA_UNUSABLE: "the node's data does not fit this request",
    LEDGER_DAMAGED: "the node's privacy ledger is damaged",
    INTERNAL_ERROR: "internal error on the node",
    MODEL_UNAVAILABLE: "the node does not have the run's model code installed",
    NOISE_TOO_HIGH: "noise would drown the update",
}

# ---- records of a train message and of its reply ---------------------------------------------
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"

# ---- keys of a train message's config besides the run settings (fedsafe.settings.RUN_SETTINGS) --
SERVER_ROUND = "server-round"  # set by Flower's strategies
RUN_KEY = "run-key"  # the coordinator's run identity: unlike Flower's run id, it survives coordinator restarts
# The global model's data spec, as the coordinator built the model (not the run-config keys
# `input-shape`/`num-classes`, which only tell a coordinator without data what to build).
INPUT_SHAPE = "input-shape"  # list of ints
NUM_CLASSES = "num-classes"
TASK = "task"  # fedsafe.models.tasks: classification, regression, reconstruction, generation
MESSAGE_KEYS = (SERVER_ROUND, RUN_KEY, INPUT_SHAPE, NUM_CLASSES, TASK)

# ---- metric names of a node's train reply ------------------------------------------------------
# Every metric a node may send is one of these (fedsafe.client.gate.PUBLIC_METRICS says why each is
# public). The training loss and time are not sent: un-noised, and the time follows the Poisson batches.
NUM_EXAMPLES = "num-examples"
STARTUP_SECONDS = "startup-seconds"  # the ClientApp process' start to its libraries loaded, before any record is read
REPLAYED = "replayed"  # 1.0: the update already trained (and charged) for a re-sent round
# The node's ledger figures (private runs): policy and accounting values, public in the DP sense.
EPSILON = "epsilon"  # all spend on the node's data so far, at DELTA
DELTA = "delta"
DP_STEPS = "dp-steps"
NOISE_MULTIPLIER = "noise-multiplier"
SAMPLE_RATE = "sample-rate"  # q of the run's Poisson sampling: 1/ceil(num-examples / batch-size)
MAX_EPSILON = "max-epsilon"  # the operator's lifetime cap
RUN_EPSILON = "run-epsilon"  # what the node granted this run
EPSILON_NEXT = "epsilon-next"  # EPSILON after one more round of this run
RUN_EPSILON_NEXT = "run-epsilon-next"
# Distributed DP (SecAgg+, each node adding σ/√m): EPSILON is then the figure the node's cap counts
# (node-config cap-basis); both figures are sent.
EPSILON_OWN_UPDATE = "epsilon-own-update"  # all spend, each release as the node's update alone
EPSILON_AGGREGATE = "epsilon-aggregate"  # all spend, each distributed release as the SecAgg+ sum
NOISE_SHARES = "noise-shares"  # m
LEDGER_METRICS = (EPSILON, DELTA, DP_STEPS, NOISE_MULTIPLIER, SAMPLE_RATE, MAX_EPSILON, RUN_EPSILON, EPSILON_NEXT,
                  RUN_EPSILON_NEXT)
