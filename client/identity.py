"""The node identity file: which data a node's state directory has ever trained on.

`<state-dir>/node-identity.jsonl`, append-only: its first line, written once and never rewritten, names
the node (a random id that every ledger's hash chain starts from, so a ledger cannot be moved between
state directories or keys unnoticed); each later line records an event — a data key first trained on
(with its ledger's file name), or an operator's explicit `fedsafe ledger forget`. A ledger missing for a
key recorded as trained is then a deleted ledger, which the node refuses rather than restart at zero.

Beside it, `records/<ledger>.npy` keeps a 64-bit hash of each record a node's own data file held under
each key (fedsafe.client.data.record_hashes), so that data sharing records with another key's — a copy
with rows added or dropped, or the same file under a new dataset id — is noticed before it is trained.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import uuid
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .files import atomic_write

IDENTITY_FILE = "node-identity.jsonl"
IDENTITY_FORMAT = 1
RECORDS_DIR = "records"


class NodeIdentity:
    def __init__(self, state_dir: str | Path) -> None:
        self.state_dir = Path(state_dir).expanduser()
        self.path = self.state_dir / IDENTITY_FILE
        self._node_id: str | None = None
        self._recorded: set[str] = set()  # keys this process has seen recorded as trained

    # ---- reading ------------------------------------------------------------------------------
    def _lines(self) -> list[dict]:
        """Every whole line (a last line without its newline is an append a crash cut short); ValueError
        if the file is damaged."""
        text = self.path.read_text(encoding="utf-8")
        lines = text.split("\n")[:-1]  # the last piece is "" or a torn line
        if not lines:
            raise ValueError(f"{self.path} is empty: its first line names the node")
        events = []
        for number, line in enumerate(lines, start=1):
            try:
                event = json.loads(line)
            except ValueError:
                raise ValueError(f"{self.path}: line {number} is not JSON (damaged)") from None
            if not isinstance(event, dict):
                raise ValueError(f"{self.path}: line {number} is not an object (damaged)")
            events.append(event)
        header = events[0]
        if header.get("fedsafe-node-identity") != IDENTITY_FORMAT or not isinstance(header.get("node"), str):
            raise ValueError(f"{self.path}: line 1 does not name a node (damaged, or not a fedsafe identity file)")
        return events

    @property
    def node_id(self) -> str | None:
        """The node's id; None where the file does not exist; ValueError where it is damaged."""
        if self._node_id is None:
            if not self.path.exists():
                return None
            with self.path.open(encoding="utf-8") as handle:
                first = handle.readline()
            try:
                header = json.loads(first)
                node = header["node"] if header.get("fedsafe-node-identity") == IDENTITY_FORMAT else None
            except (ValueError, TypeError, AttributeError, KeyError):
                node = None
            if not isinstance(node, str):
                raise ValueError(f"{self.path}: line 1 does not name a node (damaged)")
            self._node_id = node
        return self._node_id

    def trained_keys(self) -> dict[str, str]:
        """{data key: ledger file name} of every key trained on and not since forgotten."""
        if not self.path.exists():
            return {}
        trained: dict[str, str] = {}
        for event in self._lines()[1:]:
            if isinstance(event.get("trained"), str):
                trained[event["trained"]] = str(event.get("ledger", ""))
            elif isinstance(event.get("forgot"), str):
                trained.pop(event["forgot"], None)
        return trained

    def has_trained(self, data_key: str) -> bool:
        if not self.path.exists():
            return False
        if json.dumps(data_key).encode() not in self.path.read_bytes():  # the common case, without parsing
            return False
        return data_key in self.trained_keys()

    # ---- writing ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self):
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.state_dir / "node-identity.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def ensure(self) -> str:
        """The node's id, creating the identity file on the node's first ledger write."""
        if self.node_id is not None:
            return self.node_id
        with self._locked():
            if not self.path.exists():
                header = {"fedsafe-node-identity": IDENTITY_FORMAT, "node": uuid.uuid4().hex, "created": _now()}
                with atomic_write(self.path) as handle:
                    handle.write(json.dumps(header) + "\n")
        return self.node_id  # type: ignore[return-value]

    def _append(self, event: dict) -> None:
        with self._locked():
            self.ensure()
            with self.path.open("rb") as handle:
                size = handle.seek(0, os.SEEK_END)
                torn = size > 0 and handle.seek(size - 1) >= 0 and handle.read(1) != b"\n"
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
            try:
                os.write(fd, (("\n" if torn else "") + json.dumps({**event, "time": _now()}) + "\n").encode())
                os.fsync(fd)
            finally:
                os.close(fd)

    def record_trained(self, data_key: str, ledger_file: str) -> None:
        """Remember that this node has trained on `data_key` (once per key; called after every ledger write,
        so a crash between the two is made good by the next write)."""
        if data_key in self._recorded:
            return
        if not self.has_trained(data_key):
            self._append({"trained": data_key, "ledger": ledger_file})
        self._recorded.add(data_key)

    def records_path(self, ledger_file: str) -> Path:
        return self.state_dir / RECORDS_DIR / (Path(ledger_file).stem + ".npy")

    def _stored_records(self, ledger_file: str) -> np.ndarray | None:
        try:
            return np.load(self.records_path(ledger_file), allow_pickle=False)
        except (OSError, ValueError):  # none kept (simulated data), or damaged: nothing to compare with
            return None

    def sharing_records(self, data_key: str, hashes: np.ndarray) -> list[tuple[str, str, int]]:
        """(key, ledger file, records shared) of every other key trained on that shares records with `hashes`."""
        found = []
        for key, ledger_file in self.trained_keys().items():
            stored = None if key == data_key else self._stored_records(ledger_file)
            if stored is not None and (shared := np.intersect1d(stored, hashes, assume_unique=True).size):
                found.append((key, ledger_file, int(shared)))
        return found

    def record_records(self, ledger_file: str, hashes: np.ndarray) -> None:
        """Keep `hashes` with those already kept for this ledger (data that grows under a dataset id)."""
        stored = self._stored_records(ledger_file)
        if stored is not None and np.isin(hashes, stored, assume_unique=True).all():
            return
        merged = hashes if stored is None else np.union1d(stored, hashes)
        with atomic_write(self.records_path(ledger_file), "wb") as handle:
            np.save(handle, merged.astype(np.uint64), allow_pickle=False)

    def record_forgotten(self, data_key: str, ledger_file: str, by: str) -> None:
        """The operator's explicit, logged decision that `data_key`'s budget may start again from zero."""
        self._append({"forgot": data_key, "ledger": ledger_file, "by": by})
        self._recorded.discard(data_key)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
