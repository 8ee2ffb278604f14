"""Checks an update must pass before it is aggregated."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord


class UpdateRejected(ValueError):
    """An update that must not be aggregated; the message says why."""


def validate_update(
    global_arrays: ArrayRecord, update: ArrayRecord, max_update_norm: float | None = None, frozen: Iterable[str] = ()
) -> None:
    """Raise UpdateRejected unless `update` has the global model's keys (less the `frozen` ones,
    which nodes do not upload), shapes and dtypes, holds only finite values, and (if a bound is
    set) moves the model by at most `max_update_norm` (L2)."""
    frozen = set(frozen)
    expected, got = set(global_arrays.keys()) - frozen, set(update.keys())
    if expected != got:
        missing, extra = sorted(expected - got), sorted(got - expected)
        if set(extra) <= frozen and not missing:
            raise UpdateRejected(f"holds frozen parameters {extra[:5]}, which must not be uploaded")
        raise UpdateRejected(f"keys differ from the global model (missing {missing[:5]}, unexpected {extra[:5]})")
    squared = 0.0
    for key in (k for k in global_arrays.keys() if k not in frozen):
        reference, array = global_arrays[key], update[key]
        if tuple(array.shape) != tuple(reference.shape):
            raise UpdateRejected(f"{key}: shape {tuple(array.shape)}, expected {tuple(reference.shape)}")
        if array.dtype != reference.dtype:
            raise UpdateRejected(f"{key}: dtype {array.dtype}, expected {reference.dtype}")
        values = array.numpy()
        if not np.all(np.isfinite(values)):
            raise UpdateRejected(f"{key}: holds NaN or infinite values")
        if np.issubdtype(values.dtype, np.floating):
            squared += float(np.sum((values.astype(np.float64) - reference.numpy().astype(np.float64)) ** 2))
    if max_update_norm is not None and np.sqrt(squared) > max_update_norm:
        raise UpdateRejected(f"update norm {np.sqrt(squared):.3g} exceeds the bound {max_update_norm:g}")


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
