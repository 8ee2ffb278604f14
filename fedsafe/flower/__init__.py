"""The pieces of Flower 1.41 that fedsafe replaces or patches, one module per Flower subsystem.

This package is the only place in fedsafe that reaches into Flower's internals to change them:

* `simulation`: the simulation engine (`flwr.server.superlink.fleet.vce`): its message dispatcher,
  the Ray backend's actor arguments (warm-up) and its node registration (names).
* `linkstate`: the in-memory LinkState's node ids (seeded, so sampling is reproducible).
* `supernode`: the SuperNode loop (`flwr.supernode.start_client_internal`): its polling pace and
  which app packages it may run.
* `task_identity`: the process' task identity (`flwr.supercore.task_identity`), which a Message needs
  when it is built outside a Flower runtime.

Flower offers no supported hook for any of these in 1.41 (each module says what it looked for). Every
piece is looked up through `flower_attribute`, so a Flower upgrade that moves one fails with
`FlowerMoved` naming it, and `tests/test_flower_adapters.py` drives each patched path against the
installed Flower.
"""

from __future__ import annotations

import contextlib
import importlib
from unittest import mock

FLOWER_VERSION = "1.41.0"  # the Flower these adapters were written against (pyproject pins it)


class FlowerMoved(RuntimeError):
    """A piece of Flower that fedsafe replaces is not where Flower 1.41 had it."""


def flower_attribute(path: str, used_for: str) -> tuple[object, str]:
    """The owner and name of Flower's `module:attr[.attr]`; FlowerMoved, naming it, if it is not there."""
    module_name, _, attribute = path.partition(":")
    *owners, name = attribute.split(".")
    try:
        owner = importlib.import_module(module_name)
        for part in owners:
            owner = getattr(owner, part)
        getattr(owner, name)
    except (ImportError, AttributeError) as err:
        import flwr

        raise FlowerMoved(
            f"Flower {getattr(flwr, '__version__', '?')} has no {path} ({err}); fedsafe replaces it for "
            f"{used_for} and was written against Flower {FLOWER_VERSION}: see fedsafe/flower/") from err
    return owner, name


def flower_piece(path: str, used_for: str):
    """Flower's object at `module:attr[.attr]` (FlowerMoved if it is not there)."""
    owner, name = flower_attribute(path, used_for)
    return getattr(owner, name)


@contextlib.contextmanager
def replaced(path: str, replacement: object, used_for: str):
    """Flower's `module:attr[.attr]` replaced by `replacement` while the block runs."""
    owner, name = flower_attribute(path, used_for)
    with mock.patch.object(owner, name, replacement):
        yield


def replace(path: str, replacement: object, used_for: str) -> object:
    """Flower's `module:attr[.attr]` replaced by `replacement` for the rest of this process; the original."""
    owner, name = flower_attribute(path, used_for)
    original = getattr(owner, name)
    setattr(owner, name, replacement)
    return original
