"""Flower 1.41's task identity (`flwr.supercore.task_identity.TaskIdentity`) outside a Flower runtime.

Every `Message` Flower builds reads the run id, node id and task id of the process from `TaskIdentity`,
which Flower's runtimes (the ClientApp and ServerApp processes, the simulation engine) set and which is
otherwise unset: building a Message then raises. fedsafe's in-process federation (simulations/local.py)
runs ClientApps with no Flower runtime around them, so it sets the identity itself, through
TaskIdentity's own setters. Flower has no public call that sets it.

Guard: tests/test_flower_adapters.py builds a real Message with the identity unset (Flower refuses)
and set through this module (it carries the identity).
"""

from __future__ import annotations

import contextlib

from . import flower_piece

FIELDS = ("task_id", "run_id", "node_id")


def _task_identity():
    return flower_piece("flwr.supercore.task_identity:TaskIdentity", "building messages outside a Flower runtime")


def current() -> dict[str, int | None]:
    """The process' task identity, None for a field no runtime has set."""
    identity = _task_identity()
    values = {}
    for field in FIELDS:
        try:
            values[field] = getattr(identity, field)
        except RuntimeError:  # TaskIdentity raises for a field that is not set
            values[field] = None
    return values


def set_identity(**fields: int | None) -> None:
    identity = _task_identity()
    for field, value in fields.items():
        setattr(identity, field, value)


def ensure_task_identity(run_id: int, node_id: int = 0, task_id: int = 1) -> None:
    """Give the process a task identity where no Flower runtime has (fields already set are kept)."""
    wanted = {"task_id": task_id, "run_id": run_id, "node_id": node_id}
    set_identity(**{field: wanted[field] for field, value in current().items() if value is None})


@contextlib.contextmanager
def task_identity(run_id: int, node_id: int = 0, task_id: int = 1):
    """This task identity while the block runs, the previous one (set or not) after it."""
    previous = current()
    set_identity(task_id=task_id, run_id=run_id, node_id=node_id)
    try:
        yield
    finally:
        set_identity(**previous)
