"""Model families by config name: one builder per family, resolved from one table.

Each family declares, next to its builder, the tasks it serves (the first is its default) and the
Opacus ``grad_sample_mode`` that computes its per-sample gradients fastest, as measured by
``benchmarks/dp_overhead.py`` (CPU, 1 thread, batch 64, digits-sized data; three runs agreed):
mlp, cnn, autoencoder, transformer: ew; lstm, gru: hooks; gan: ghost. fedsafe.client.dp_modes.make_private
sets up any of the four modes. This module stays plain PyTorch: it names Opacus modes as strings
and never imports Opacus.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn


@dataclass(frozen=True)
class DataSpec:
    """The shape of the data a model is built for.

    Nodes and the server build the global model from the same spec, so they hold the same function.
    `num_classes` is the number of classes (classification) or of targets (regression); `task` is
    one of fedsafe.models.tasks.TASK_NAMES and must be one the model family serves.
    """

    input_shape: tuple[int, ...]
    num_classes: int
    task: str = "classification"


ModelBuilder = Callable[[DataSpec, Mapping[str, Any]], nn.Module]

# Opacus' ways of computing per-sample gradients (PrivacyEngine's `grad_sample_mode`):
# hooks: module hooks + per-layer formulas; functorch: torch.func.vmap over each layer;
# ew: torch's ExpandedWeights; ghost: ghost clipping (per-sample norms only, two backward passes).
GRAD_SAMPLE_MODES = ("hooks", "functorch", "ew", "ghost")

# What input a family reads (DataSpec.input_shape): "any" shape (it flattens), "image"
# (channels, height, width) or "sequence" (seq_len, features). resolve_spec uses it to read an
# image (1, H, W) as H steps of W features for a sequence family, and back.
INPUT_KINDS = ("any", "image", "sequence")

# Tasks that use no labels: a family built for one of them is trained on the inputs of any dataset.
UNSUPERVISED_TASKS = ("reconstruction", "generation")


@dataclass(frozen=True)
class ModelFamily:
    name: str
    builder: ModelBuilder
    tasks: tuple[str, ...]  # tasks the family serves; the first is its default
    grad_sample_mode: str  # the Opacus mode measured fastest for it
    inputs: str = "any"  # one of INPUT_KINDS


_FAMILIES: dict[str, ModelFamily] = {}


class UnknownModelError(ValueError):
    """A config named a model family that is not registered."""


class ModelConfigError(ValueError):
    """Options or a data spec that a model family cannot be built from."""


def register_model(
    name: str,
    *,
    grad_sample_mode: str = "hooks",
    tasks: Iterable[str] = ("classification",),
    inputs: str = "any",
) -> Callable[[ModelBuilder], ModelBuilder]:
    """Register a builder ``(spec, options) -> nn.Module`` under config name `name`.

    `grad_sample_mode` is the Opacus mode the family prefers (chosen by measurement); `tasks` are
    the values of ``DataSpec.task`` it can be built for, its default first; `inputs` is the input
    kind it reads (INPUT_KINDS).
    """
    tasks = tuple(tasks)
    if inputs not in INPUT_KINDS:
        raise ValueError(f"model family {name!r}: unknown input kind {inputs!r}; choose one of: {', '.join(INPUT_KINDS)}")
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise ValueError(
            f"model family {name!r}: unknown grad_sample_mode {grad_sample_mode!r}; "
            f"choose one of: {', '.join(GRAD_SAMPLE_MODES)}"
        )
    if not tasks:
        raise ValueError(f"model family {name!r} must serve at least one task")

    def decorate(builder: ModelBuilder) -> ModelBuilder:
        if name in _FAMILIES:
            raise ValueError(f"model family {name!r} is registered twice")
        _FAMILIES[name] = ModelFamily(name, builder, tasks, grad_sample_mode, inputs)
        return builder

    return decorate


def model_names() -> list[str]:
    return sorted(_FAMILIES)


def model_family(name: str) -> ModelFamily:
    try:
        return _FAMILIES[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown model {name!r}; choose one of: {', '.join(model_names())}"
        ) from None


def preferred_grad_sample_mode(name: str) -> str:
    """The Opacus ``grad_sample_mode`` measured fastest for family `name` (default "hooks")."""
    return model_family(name).grad_sample_mode


def default_task(name: str) -> str:
    """The task family `name` is built for unless its DataSpec says otherwise."""
    return model_family(name).tasks[0]


def supported_tasks(name: str) -> tuple[str, ...]:
    return model_family(name).tasks


def resolve_spec(name: str, data: DataSpec) -> DataSpec:
    """The spec family `name` is built from for data described by `data` (a dataset's spec).

    * Task: a family whose default task uses no labels (autoencoder: reconstruction, gan:
      generation) is built for that task on any dataset (its labels go unused); any other family
      keeps the data's task (build_model then names a mismatch).
    * Shape: a sequence family reads a one-channel image (1, H, W) as H steps of W features; an
      image family reads (H, W) as a one-channel image. Other shapes are left as they are.

    The coordinator resolves the spec once and sends it to the nodes; fedsafe.client.data.fit_view gives
    a node's own data that shape.
    """
    family = model_family(name)
    task = family.tasks[0] if family.tasks[0] in UNSUPERVISED_TASKS else data.task
    shape = tuple(data.input_shape)
    if family.inputs == "sequence" and len(shape) == 3 and shape[0] == 1:
        shape = shape[1:]
    elif family.inputs == "image" and len(shape) == 2:
        shape = (1, *shape)
    return DataSpec(shape, data.num_classes, task)


class _ReadOptions(dict):
    """The options handed to a builder; remembers which keys it read, to catch misspelt ones."""

    def __init__(self, options: Mapping[str, Any]) -> None:
        super().__init__(options)
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> Any:
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)

    def __contains__(self, key: object) -> bool:
        if isinstance(key, str):
            self.read.add(key)
        return super().__contains__(key)


def build_model(name: str, spec: DataSpec, options: Mapping[str, Any] | None = None) -> nn.Module:
    """Build a fresh model of family `name` for data of shape `spec`.

    Raises UnknownModelError for an unregistered family and ModelConfigError (both ValueErrors) for
    a spec or options the family cannot use: a task it does not serve, a shape it does not take, an
    option of the wrong type or out of range, or an option it does not know (a typo).
    """
    family = model_family(name)
    if spec.task not in family.tasks:
        raise ModelConfigError(
            f"model {name!r} serves task(s) {', '.join(family.tasks)}; the data spec asks for "
            f"{spec.task!r} (set DataSpec.task to {family.tasks[0]!r})"
        )
    if not spec.input_shape or any(not isinstance(d, int) or d < 1 for d in spec.input_shape):
        raise ModelConfigError(f"model {name!r}: input shape must be positive integers; got {spec.input_shape}")
    read = _ReadOptions(options or {})
    try:
        model = family.builder(spec, read)
    except ModelConfigError as err:
        message = str(err)
        raise ModelConfigError(message if message.startswith("model ") else f"model {name!r}: {message}") from None
    unknown = sorted(set(read) - read.read)
    if unknown:
        known = ", ".join(sorted(read.read)) or "none"
        raise ModelConfigError(
            f"model {name!r}: unknown option(s) {', '.join(map(repr, unknown))}; it takes: {known}"
        )
    return model


# ---- typed option readers for builders --------------------------------------------------------


def int_option(options: Mapping[str, Any], key: str, default: int, *, minimum: int | None = None) -> int:
    """An integer option; integral floats (e.g. 64.0 from a JSON config) are accepted, bools are not."""
    value = options.get(key, default)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ModelConfigError(f"option {key!r} must be an integer; got {value!r} ({type(value).__name__})")
    if minimum is not None and value < minimum:
        raise ModelConfigError(f"option {key!r} must be at least {minimum}; got {value}")
    return value


def float_option(
    options: Mapping[str, Any],
    key: str,
    default: float,
    *,
    minimum: float | None = None,
    below: float | None = None,
) -> float:
    """A real-valued option in [minimum, below)."""
    value = options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ModelConfigError(f"option {key!r} must be a number; got {value!r} ({type(value).__name__})")
    value = float(value)
    if minimum is not None and value < minimum:
        raise ModelConfigError(f"option {key!r} must be at least {minimum}; got {value}")
    if below is not None and value >= below:
        raise ModelConfigError(f"option {key!r} must be below {below}; got {value}")
    return value


def choice_option(options: Mapping[str, Any], key: str, default: str, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    value = options.get(key, default)
    if value not in choices:
        raise ModelConfigError(f"option {key!r} must be one of: {', '.join(choices)}; got {value!r}")
    return value


def parse_model_options(text: str) -> dict[str, Any]:
    """Model options from a run-config string: ``"hidden=128,dropout=0.2,output_activation=sigmoid"``.

    Values read as integers, then numbers, then true/false, else text; build_model checks names,
    types and ranges. An empty string is no options.
    """
    options: dict[str, Any] = {}
    for item in (part.strip() for part in str(text).split(",")):
        if not item:
            continue
        key, sep, raw = (s.strip() for s in item.partition("="))
        if not sep or not key or not raw:
            raise ModelConfigError(f"model options: expected key=value pairs separated by commas; got {item!r}")
        if key in options:
            raise ModelConfigError(f"model options: {key!r} is given twice")
        value: Any
        try:
            value = int(raw)
        except ValueError:
            try:
                value = float(raw)
            except ValueError:
                value = {"true": True, "false": False}.get(raw.lower(), raw)
        options[key] = value
    return options
