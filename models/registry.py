"""Model families by config name: one builder per family, resolved from one table."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn


@dataclass(frozen=True)
class DataSpec:
    """The shape of the data a model is built for.

    Nodes and the server build the global model from the same spec, so they hold the same function.
    """

    input_shape: tuple[int, ...]
    num_classes: int
    task: str = "classification"


ModelBuilder = Callable[[DataSpec, Mapping[str, Any]], nn.Module]

_BUILDERS: dict[str, ModelBuilder] = {}


class UnknownModelError(ValueError):
    """A config named a model family that is not registered."""


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    def decorate(builder: ModelBuilder) -> ModelBuilder:
        if name in _BUILDERS:
            raise ValueError(f"model family {name!r} is registered twice")
        _BUILDERS[name] = builder
        return builder

    return decorate


def model_names() -> list[str]:
    return sorted(_BUILDERS)


def build_model(name: str, spec: DataSpec, options: Mapping[str, Any] | None = None) -> nn.Module:
    """Build a fresh model of family `name` for data of shape `spec`."""
    try:
        builder = _BUILDERS[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown model {name!r}; choose one of: {', '.join(model_names())}"
        ) from None
    return builder(spec, dict(options or {}))
