"""Model families by config name: one builder per family, resolved from one table.

Each family declares, next to its builder, the tasks it serves (the first is its default) and the
Opacus ``grad_sample_mode`` that computes its per-sample gradients fastest, as measured by
``benchmarks/dp_overhead.py`` (CPU, 1 thread, batch 64, digits-sized data; three runs agreed):
mlp, cnn, autoencoder, transformer: ew; lstm, gru: hooks; gan: ghost. fedsafe.client.dp_modes.make_private
sets up any of the four modes. This module stays plain PyTorch: it names Opacus modes as strings
and never imports Opacus (model option ``fix_batchnorm=true`` replaces BatchNorm as Opacus' fixer does).

Beyond the built-in families, a model name may be
* ``package.module:factory`` — a user's factory ``factory(spec, options) -> nn.Module`` (or
  ``factory(spec)``), imported on first use; optional attributes on it (``grad_sample_mode``,
  ``tasks``, ``inputs``) say what register_model's arguments say;
* a name an installed package registers in the ``fedsafe.models`` entry-point group (its target is
  such a factory, or a module that calls register_model when imported).
A task may be a user's too (``DataSpec.task = "package.module:factory"``, fedsafe.models.tasks.task_for):
any family is built for it, the factory's task judging what the model outputs.
The same code must be installed on every node: a node that cannot import it refuses the round.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
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


class UserModelError(UnknownModelError):
    """A user's model (``module:factory`` or a ``fedsafe.models`` entry point) that cannot be loaded here."""


# The entry-point group through which an installed package registers model families by name.
ENTRY_POINT_GROUP = "fedsafe.models"
# A model option every family takes: replace the layers Opacus can fix (BatchNorm → GroupNorm) after
# building. Nodes and the coordinator apply it alike, so their state dicts keep the same keys.
FIX_BATCHNORM_OPTION = "fix_batchnorm"
# The tasks a user's factory serves unless it says otherwise (attribute `tasks`).
USER_MODEL_TASKS = ("classification", "regression")


def is_user_model_ref(name: str) -> bool:
    """Whether `name` points at a user's factory (``package.module:factory``), not a registered family."""
    return ":" in name


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
    """The registered families and those installed packages offer through the entry-point group."""
    return sorted(set(_FAMILIES) | {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})


def model_family(name: str) -> ModelFamily:
    """The family `name` names: built in, a ``module:factory`` reference, or an installed entry point.

    Raises UnknownModelError (a ValueError) for a name nothing provides, and UserModelError, naming
    the module, for a user's model whose code is not importable here."""
    if name in _FAMILIES:
        return _FAMILIES[name]
    if is_user_model_ref(name):  # imported each time (Python caches the module): never stale, never kept
        return _user_family(name, import_reference(name))
    found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    if not found:
        raise UnknownModelError(
            f"unknown model {name!r}; choose one of: {', '.join(model_names())}, "
            f"or a factory as package.module:function"
        )
    try:
        target = found[0].load()
    except Exception as err:  # noqa: BLE001 - whatever the package raises, the model is unusable here
        raise UserModelError(f"model {name!r} (entry point {found[0].value}): cannot load it: "
                             f"{type(err).__name__}: {err}") from None
    if name not in _FAMILIES:  # a module that registered itself on import needs nothing more
        if not callable(target) or inspect.ismodule(target):
            raise UserModelError(f"model {name!r}: entry point {found[0].value} is neither a factory nor "
                                 f"a module that registers {name!r}")
        _FAMILIES[name] = _user_family(name, target)
    return _FAMILIES[name]


def import_reference(ref: str, what: str = "model") -> Callable[..., Any]:
    """The callable ``package.module:attr`` names (a user's `what`: model or task factory);
    UserModelError, naming what is missing."""
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise UserModelError(f"{what} {ref!r}: expected package.module:function")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise UserModelError(
            f"{what} {ref!r}: module {err.name or module_name!r} is not installed here; the {what}'s code must "
            f"be importable on the coordinator and on every node (pip install it, or put it on PYTHONPATH)"
        ) from None
    except Exception as err:  # noqa: BLE001 - the user's module failed while importing
        raise UserModelError(f"{what} {ref!r}: importing {module_name!r} failed: {type(err).__name__}: {err}") from None
    factory: Any = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise UserModelError(f"{what} {ref!r}: module {module_name!r} has no attribute {attr!r}")
    if not callable(factory):
        raise UserModelError(f"{what} {ref!r}: {attr!r} is not callable")
    return factory


def _user_family(name: str, factory: Callable[..., Any]) -> ModelFamily:
    """A family around a user's factory; its optional attributes describe it as register_model's
    arguments do (checked the same way)."""
    takes_options = _takes_two_arguments(factory)

    def builder(spec: DataSpec, options: Mapping[str, Any]) -> nn.Module:
        model = factory(spec, options) if takes_options else factory(spec)
        if not isinstance(model, nn.Module):
            raise ModelConfigError(f"model {name!r}: the factory returned {type(model).__name__}, not a torch.nn.Module")
        return model

    tasks = tuple(getattr(factory, "tasks", USER_MODEL_TASKS))
    mode = getattr(factory, "grad_sample_mode", "hooks")
    inputs = getattr(factory, "inputs", "any")
    if mode not in GRAD_SAMPLE_MODES or inputs not in INPUT_KINDS or not tasks:
        raise UserModelError(f"model {name!r}: grad_sample_mode must be one of {', '.join(GRAD_SAMPLE_MODES)}, "
                             f"inputs one of {', '.join(INPUT_KINDS)}, tasks non-empty; got {mode!r}, {inputs!r}, {tasks!r}")
    return ModelFamily(name, builder, tasks, mode, inputs)


def _takes_two_arguments(factory: Callable[..., Any]) -> bool:
    try:
        inspect.signature(factory).bind(None, None)
        return True
    except TypeError:
        return False
    except ValueError:  # no signature to read (a builtin): call it as documented
        return True


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
    unsupervised = family.tasks[0] in UNSUPERVISED_TASKS and not is_user_model_ref(data.task)
    task = family.tasks[0] if unsupervised else data.task
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
    option of the wrong type or out of range, or an option it does not know (a typo). Every family
    also takes ``fix_batchnorm`` (default false): replace BatchNorm layers with GroupNorm.
    """
    family = model_family(name)
    if spec.task not in family.tasks and not is_user_model_ref(spec.task):  # a user's task takes any model
        raise ModelConfigError(
            f"model {name!r} serves task(s) {', '.join(family.tasks)}; the data spec asks for "
            f"{spec.task!r} (set DataSpec.task to {family.tasks[0]!r})"
        )
    if not spec.input_shape or any(not isinstance(d, int) or d < 1 for d in spec.input_shape):
        raise ModelConfigError(f"model {name!r}: input shape must be positive integers; got {spec.input_shape}")
    options = dict(options or {})
    fix_batchnorm = options.pop(FIX_BATCHNORM_OPTION, False)
    if not isinstance(fix_batchnorm, bool):
        raise ModelConfigError(f"model {name!r}: option {FIX_BATCHNORM_OPTION!r} must be true or false; got {fix_batchnorm!r}")
    read = _ReadOptions(options)
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
    return replace_batchnorm(model) if fix_batchnorm else model


def replace_batchnorm(model: nn.Module) -> nn.Module:
    """`model` with each BatchNorm layer replaced, in place, by GroupNorm over gcd(32, channels) groups
    (Opacus' own fixer's rule, without importing Opacus): DP-SGD needs each sample's gradient alone,
    and BatchNorm mixes a batch. Parameter names stay (weight, bias); the running statistics go."""
    if isinstance(model, nn.modules.batchnorm._BatchNorm):  # the whole model one BatchNorm: nothing to keep
        raise ModelConfigError("the model is a single BatchNorm layer")
    for name, layer in list(model.named_modules()):
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, nn.GroupNorm(math.gcd(32, layer.num_features), layer.num_features,
                                                affine=layer.affine))
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
