"""Checks an update must pass before it is aggregated."""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord


class UpdateRejected(ValueError):
    """An update that must not be aggregated; the message says why."""


def validate_update(global_arrays: ArrayRecord, update: ArrayRecord, max_update_norm: float | None = None) -> None:
    """Raise UpdateRejected unless `update` has the global model's keys, shapes and dtypes, holds
    only finite values, and (if a bound is set) moves the model by at most `max_update_norm` (L2)."""
    expected, got = set(global_arrays.keys()), set(update.keys())
    if expected != got:
        missing, extra = sorted(expected - got), sorted(got - expected)
        raise UpdateRejected(f"keys differ from the global model (missing {missing[:5]}, unexpected {extra[:5]})")
    squared = 0.0
    for key in global_arrays.keys():
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
