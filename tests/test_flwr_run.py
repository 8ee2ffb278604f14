"""`flwr run .` works as Flower users expect: the pyproject's app config, a local simulation federation."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _kill_local_superlink(flwr_home: Path, port: int) -> None:
    """`flwr run` leaves its local SuperLink (and SuperExec) running; stop the ones of this test."""
    out = subprocess.run(["ps", "-eww", "-o", "pid=,args="], capture_output=True, text=True).stdout
    for line in out.splitlines():
        pid, _, args = line.strip().partition(" ")
        if str(flwr_home) in args or f"--runtime-api-address 127.0.0.1:{port}" in args:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_flwr_run_dot_runs_the_dp_federation(tmp_path):
    flwr = shutil.which("flwr", path=str(Path(sys.executable).parent)) or shutil.which("flwr")
    assert flwr, "the flwr CLI is installed with flwr"
    home = tmp_path / "home"
    env = {
        **os.environ, "HOME": str(home), "FLWR_HOME": str(tmp_path / "flwr"),
        "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        # Ports of our own, so a developer's local SuperLink is neither reused nor disturbed.
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(port := _free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port()),
    }
    out_dir = tmp_path / "results"
    try:
        proc = subprocess.run(
            [flwr, "run", ".", "--stream", "--run-config", f"num-rounds=2 out-dir='{out_dir}'"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
        )
    finally:
        _kill_local_superlink(tmp_path / "flwr", port)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    rounds = json.loads((out_dir / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2], log[-3000:]
    assert 0 < rounds[-1]["epsilon_max"] <= 3.0 and rounds[-1]["eval"]["accuracy"] > 0.8
    # Default node policy: ledgers under the node's home, one per simulated partition.
    assert len(list((home / ".fedsafe" / "ledgers").glob("*.json"))) == 2
