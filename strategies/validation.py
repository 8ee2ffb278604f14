"""Checks an update must pass before it is aggregated."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord

from fedsafe.protocol import DELTA, DP_STEPS, EPSILON, NOISE_MULTIPLIER


class UpdateRejected(ValueError):
    """An update that must not be aggregated; the message says why."""


def global_reference(global_arrays: ArrayRecord) -> dict[str, np.ndarray]:
    """The global model's arrays as validate_update compares updates with them (float64): computed once a
    round for all its replies, not once a reply (Flower's Array.numpy() deserialises the bytes every call)."""
    return {key: global_arrays[key].numpy().astype(np.float64) for key in global_arrays.keys()}


def validate_update(
    global_arrays: ArrayRecord, update: ArrayRecord, max_update_norm: float | None = None, frozen: Iterable[str] = (),
    reference: Mapping[str, np.ndarray] | None = None,
) -> float:
    """Raise UpdateRejected unless `update` has the global model's keys (less the `frozen` ones,
    which nodes do not upload), shapes and dtypes, holds only finite values, and (if a bound is
    set) moves the model by at most `max_update_norm` (L2). Returns that distance, the update's norm.
    `reference`: global_reference(global_arrays), where the caller checks several updates against it."""
    frozen = set(frozen)
    expected, got = set(global_arrays.keys()) - frozen, set(update.keys())
    if expected != got:
        missing, extra = sorted(expected - got), sorted(got - expected)
        if set(extra) <= frozen and not missing:
            raise UpdateRejected(f"holds frozen parameters {extra[:5]}, which must not be uploaded")
        raise UpdateRejected(f"keys differ from the global model (missing {missing[:5]}, unexpected {extra[:5]})")
    squared = 0.0
    for key in (k for k in global_arrays.keys() if k not in frozen):
        start, array = global_arrays[key], update[key]
        if tuple(array.shape) != tuple(start.shape):
            raise UpdateRejected(f"{key}: shape {tuple(array.shape)}, expected {tuple(start.shape)}")
        if array.dtype != start.dtype:
            raise UpdateRejected(f"{key}: dtype {array.dtype}, expected {start.dtype}")
        values = array.numpy()
        if not np.all(np.isfinite(values)):
            raise UpdateRejected(f"{key}: holds NaN or infinite values")
        if np.issubdtype(values.dtype, np.floating):
            start_values = reference[key] if reference is not None else start.numpy().astype(np.float64)
            squared += float(np.sum((values.astype(np.float64) - start_values) ** 2))
    norm = float(np.sqrt(squared))
    if max_update_norm is not None and norm > max_update_norm:
        raise UpdateRejected(f"update norm {norm:.3g} exceeds the bound {max_update_norm:.3g}")
    return norm


# The default bound on an update's norm (max-update-norm = 0). DP-SGD averages each step's noised sum
# of clipped gradients over the node's expected Poisson batch b = n / ceil(n / B) (n records, batch size
# B; b = n when n < B), so a node's update grows like 1/b: on the built-in runs a node with 2 records
# moved the model 8× as far as one with 300. Scaled by b / B, the honest updates of a round are alike
# (within 1.9× of the round's lower median on every built-in run measured, docs/deployment.md); the bound
# is NORM_BOUND_FACTOR × that lower median, scaled back by B / b for each node. A node that claims fewer
# records to widen its bound shrinks its FedAvg weight (n) alike, so its pull on the model stays bounded.
# The lower median is an honest node's figure as long as fewer than half of the round's updates are not;
# with two nodes it is the smaller one.
NORM_BOUND_FACTOR = 10.0


def expected_batch(num_examples: float, batch_size: int) -> float:
    """The expected Poisson batch of a node with `num_examples` records (client/training.py::poisson_schedule)."""
    return num_examples / math.ceil(num_examples / min(batch_size, num_examples))


@dataclass(frozen=True)
class NormBound:
    """The bound a round's updates were held to and where it came from (for the round record): either
    `max-update-norm` for every node, or NORM_BOUND_FACTOR × `reference` × B / b per node."""

    source: str
    fixed: float | None = None  # max-update-norm
    reference: float | None = None  # the round's lower-median batch-scaled norm
    batch_size: int = 1

    def for_node(self, num_examples: float) -> float:
        if self.fixed is not None:
            return self.fixed
        return NORM_BOUND_FACTOR * self.reference * self.batch_size / expected_batch(num_examples, self.batch_size)

    def record(self) -> dict[str, Any]:
        if self.fixed is not None:
            return {"source": self.source, "value": self.fixed}
        return {"source": self.source, "factor": NORM_BOUND_FACTOR, "reference": self.reference,
                "value_at_full_batch": NORM_BOUND_FACTOR * self.reference}


def update_norm_bound(updates: Iterable[tuple[float, float]], batch_size: int, max_update_norm: float = 0.0) -> NormBound:
    """The round's bound for `updates` = (norm, num-examples) pairs: `max-update-norm` when set (> 0), else
    the batch-scaled lower-median rule above."""
    if max_update_norm > 0:
        return NormBound("max-update-norm", fixed=float(max_update_norm))
    scaled = [norm * expected_batch(n, batch_size) / batch_size for norm, n in updates]
    reference = statistics.median_low(sorted(scaled))
    return NormBound(f"{NORM_BOUND_FACTOR:g} × the round's lower-median update norm {reference:.4g}, scaled by B/b "
                     f"(B={batch_size}, b: each node's expected batch)", reference=reference, batch_size=batch_size)


# `num-examples` is the node's word, and FedAvg weights its update by it: one node claiming 10^9 records
# would be the whole average. A round's weights are capped at this many times the lower median of the
# round's claims: a node may hold more data than the others (up to 10× the typical node counts in full),
# never outweigh the rest of the round by its say-so. The lower median is an honest figure while fewer
# than half of the round's updates are not.
NUM_EXAMPLES_FACTOR = 10.0


def num_examples_cap(claims: Iterable[float]) -> float:
    """The largest `num-examples` a round's update is weighted by, for the round's `claims`."""
    return NUM_EXAMPLES_FACTOR * statistics.median_low(sorted(claims))


# What a node that trained with DP-SGD reports beside its update (client/app.py): its ledger's ε after
# the round, the δ it is stated for, the DP-SGD steps it has counted on this data, and the noise
# multiplier σ of the steps (the accountant is the one the run asked for). Each is a float, and must lie
# in its range; a reply in a DP run without them did not train privately as far as the server can tell.
DP_REPLY_FIELDS: dict[str, str] = {
    EPSILON: "finite and >= 0",
    DELTA: "in (0, 1)",
    DP_STEPS: "a whole number >= 1",
    NOISE_MULTIPLIER: "finite and > 0",
}


def _in_range(name: str, value: float) -> bool:
    if name == EPSILON:
        return value >= 0
    if name == DELTA:
        return 0 < value < 1
    if name == DP_STEPS:
        return value >= 1 and float(value).is_integer()
    return value > 0  # noise-multiplier


def validate_dp_metrics(metrics: Mapping[str, Any]) -> None:
    """Raise UpdateRejected unless `metrics` carry every DP field of a private update, each in range.

    In a DP run this is what keeps a node that trained without DP (a stock Flower client, a modified app)
    out of the aggregate: its reply has no ε to account for it."""
    missing = [name for name in DP_REPLY_FIELDS if name not in metrics]
    if missing:
        raise UpdateRejected(
            f"a DP run's update must carry {', '.join(DP_REPLY_FIELDS)}; missing {', '.join(missing)} "
            "(did the node train without DP?)"
        )
    for name, allowed in DP_REPLY_FIELDS.items():
        value = metrics[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not _in_range(name, float(value)):
            raise UpdateRejected(f"DP field {name}={value!r} is not {allowed}")


def complete_update(global_arrays: ArrayRecord, update: ArrayRecord, frozen: Iterable[str]) -> ArrayRecord:
    """`update` with the `frozen` arrays it omits taken from the global model, in the global model's
    key order: every strategy then aggregates whole models (a frozen array averages to itself)."""
    frozen = set(frozen)
    if not frozen:
        return update
    return ArrayRecord({k: (global_arrays[k] if k in frozen else update[k]) for k in global_arrays.keys()})


def keep_frozen(global_arrays: ArrayRecord, aggregated: ArrayRecord, frozen: Iterable[str]) -> ArrayRecord:
    """The aggregated model with the `frozen` arrays exactly as the global model holds them (a
    weighted average of equal floats may differ from them in the last bit)."""
    frozen = set(frozen)
    if not frozen:
        return aggregated
    return ArrayRecord({k: (global_arrays[k] if k in frozen else aggregated[k]) for k in global_arrays.keys()})
