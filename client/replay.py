"""The node's last reply, kept so that a round the coordinator re-sends after a crash is answered, not re-run.

A coordinator that crashes mid-round and resumes sends the same round again: same run key, same
round, same global model. Training it again would be charged again (a second, independent noisy
release) and, where the run's ε was calibrated to land exactly on its grant, push the run over it.
The update already trained for that round is a DP output whose cost is already in the ledger; sending
the same bytes again is post-processing and costs nothing. So the node keeps its latest reply per
protected dataset, keyed by a digest of the request (config and global model), and answers an
identical request from it. Any difference in the request (another model, another round) trains anew
and is charged anew.

Files, in `<state-dir>/replay/`: `<ledger stem>.npz` (the reply's arrays, no pickle) and
`<ledger stem>.meta.json` (run, round, request digest, metrics, digest of the .npz, and a digest of
the meta itself). Both are overwritten in place, unsynced: a replay entry is a cache whose loss only
means training (and paying) again, so all it must be is never wrong, which its digests make it —
an entry is used only if the meta's own digest holds, it names exactly this request, and the arrays'
bytes, read once, hash to the digest it names. A torn, half-written, stale or mismatched pair is ignored
(the round is then trained and charged). Its order with the ledger is fixed elsewhere: an entry is
written only after training, so after the round's reservation is on disk (synced) and charged.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .ledger import ledger_filename


def request_digest(config: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 of a train request: its config items and the global model's arrays, bytes and all."""
    digest = hashlib.sha256()
    digest.update(json.dumps({k: config[k] for k in sorted(config)}, sort_keys=True, default=str).encode())
    for key in sorted(arrays):
        array = np.ascontiguousarray(arrays[key])
        digest.update(f"|{key}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _meta_digest(meta: Mapping[str, Any]) -> str:
    """SHA-256 of a meta record's fields but its own digest: a meta file torn or mixed from two writes fails it."""
    fields = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _overwrite(path: Path, data: bytes) -> None:
    """`data` written over `path` in place, unsynced. Not through a temporary file renamed over it: ext4 starts
    writing a file out as soon as it replaces another by rename (1-2 ms a file measured on this project's
    machine, two files a node-round); a cache only needs its digests. Shortened after the write, never
    truncated to zero first (which ext4 also flushes)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)


class ReplayCache:
    def __init__(self, state_dir: str | Path, data_key: str) -> None:
        stem = ledger_filename(data_key).removesuffix(".json")
        self.directory = Path(state_dir).expanduser() / "replay"
        self.arrays_path = self.directory / f"{stem}.npz"
        self.meta_path = self.directory / f"{stem}.meta.json"

    def lookup(self, run_id: str, server_round: int, digest: str):
        """(arrays, metrics) of the reply to exactly this request, or None."""
        try:
            meta = json.loads(self.meta_path.read_bytes())
            if meta.get("meta_sha256") != _meta_digest(meta):
                return None
            if (meta.get("run"), meta.get("round"), meta.get("request")) != (run_id, server_round, digest):
                return None
            stored_bytes = self.arrays_path.read_bytes()  # read once: what is hashed is what is loaded
            if hashlib.sha256(stored_bytes).hexdigest() != meta.get("arrays_sha256"):
                return None
            with np.load(io.BytesIO(stored_bytes), allow_pickle=False) as stored:
                arrays = {key: stored[f"a{i}"] for i, key in enumerate(meta["keys"])}
            return arrays, dict(meta["metrics"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def store(self, run_id: str, server_round: int, digest: str, arrays: Mapping[str, np.ndarray],
              metrics: Mapping[str, float]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        keys = list(arrays)
        buffer = io.BytesIO()
        np.savez(buffer, **{f"a{i}": np.asarray(arrays[k]) for i, k in enumerate(keys)})
        arrays_bytes = buffer.getvalue()
        # Arrays first, then the meta naming their digest: until the meta is replaced, the previous meta names
        # other bytes, so the pair is ignored, never misread.
        _overwrite(self.arrays_path, arrays_bytes)
        meta = {"run": run_id, "round": server_round, "request": digest, "keys": keys,
                "metrics": {k: float(v) for k, v in metrics.items()},
                "arrays_sha256": hashlib.sha256(arrays_bytes).hexdigest()}
        meta["meta_sha256"] = _meta_digest(meta)
        _overwrite(self.meta_path, json.dumps(meta, indent=1).encode())
