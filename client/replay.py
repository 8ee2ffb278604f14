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
`<ledger stem>.meta.json` (run, round, request digest, metrics, digest of the .npz). Both are
replaced atomically; a torn or mismatched pair is ignored (the round is then trained and charged).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .files import atomic_write
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


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class ReplayCache:
    def __init__(self, state_dir: str | Path, data_key: str) -> None:
        stem = ledger_filename(data_key).removesuffix(".json")
        self.directory = Path(state_dir).expanduser() / "replay"
        self.arrays_path = self.directory / f"{stem}.npz"
        self.meta_path = self.directory / f"{stem}.meta.json"

    def lookup(self, run_id: str, server_round: int, digest: str):
        """(arrays, metrics) of the reply to exactly this request, or None."""
        try:
            meta = json.loads(self.meta_path.read_text())
            if (meta.get("run"), meta.get("round"), meta.get("request")) != (run_id, server_round, digest):
                return None
            if _file_digest(self.arrays_path) != meta.get("arrays_sha256"):
                return None
            with np.load(self.arrays_path, allow_pickle=False) as stored:
                arrays = {key: stored[f"a{i}"] for i, key in enumerate(meta["keys"])}
            return arrays, dict(meta["metrics"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def store(self, run_id: str, server_round: int, digest: str, arrays: Mapping[str, np.ndarray],
              metrics: Mapping[str, float]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        keys = list(arrays)
        # The arrays need no fsync of their own: the meta file, written durably after them, names their
        # digest, and a power cut that loses them leaves a mismatched pair, which is ignored (the round is
        # trained and charged again). Two fsyncs fewer a node-round.
        with atomic_write(self.arrays_path, "wb", durable=False) as handle:
            np.savez(handle, **{f"a{i}": np.asarray(arrays[k]) for i, k in enumerate(keys)})
        meta = {"run": run_id, "round": server_round, "request": digest, "keys": keys,
                "metrics": {k: float(v) for k, v in metrics.items()}, "arrays_sha256": _file_digest(self.arrays_path)}
        # Whole or absent after a power cut, but the rename need not survive it (no directory fsync): the
        # previous meta names an earlier request, so losing this one only means training (and paying) again.
        with atomic_write(self.meta_path, sync_directory=False) as handle:
            json.dump(meta, handle, indent=1)
