"""Files that a crash leaves whole: the previous version or the new one, never half. The node's ledger and
caches, the coordinator's checkpoints and results, and the credentials the CLI writes all go through here."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


@contextlib.contextmanager
def atomic_write(path: Path, mode: str = "w", *, newline: str | None = None, durable: bool = True,
                 sync_directory: bool = True, permissions: int | None = None) -> Iterator[IO]:
    """Write `path` through a temporary file in the same directory, renamed over it on success.

    `durable` also fsyncs the file and its directory, so the new version survives a power cut once this
    returns: what the privacy ledger needs before an update may leave the node, and a checkpoint before
    the next round starts; a cache does not. With `sync_directory=False` only the file is synced before
    the rename: a power cut then leaves the previous version or the new one, whole, but may undo the
    rename — for a write whose loss is safe (a round's settlement, whose reservation is already durable
    and charged). `permissions` are set before anything is written (a private key is never readable by
    others, not even briefly); without them the file is created 0600.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if permissions is not None:
            os.fchmod(fd, permissions)
        with os.fdopen(fd, mode, newline=newline) as handle:
            yield handle
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable and sync_directory:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
