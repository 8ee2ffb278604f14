"""Sweep of local-DP training recipes (issue 12 item 1): one line per setting, in this process.

    python benchmarks/defaults_sweep.py ROW 'json overrides' ['json overrides' ...]

ROW is a benchmarks/utility.py row index; each JSON object holds RunConfig fields (num_rounds, lr, ...).
Prints accuracy after the last round, the largest node ε, σ and the wall time of each setting.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.utility import NODES, ROWS, federated, row_config  # noqa: E402


def main() -> None:
    import logging

    logging.disable(logging.WARNING)
    row = ROWS[int(sys.argv[1])]
    for raw in sys.argv[2:]:
        overrides = json.loads(raw)
        with tempfile.TemporaryDirectory(prefix="fedsafe-sweep-") as out:
            t0 = time.perf_counter()
            accuracy, spent, _ = federated(row_config(row, Path(out), num_partitions=NODES, **overrides))
            print(f"{row.name} | {raw} | acc {accuracy:.3f} | ε {spent:.2f} | {time.perf_counter() - t0:.0f} s",
                  flush=True)


if __name__ == "__main__":
    main()
