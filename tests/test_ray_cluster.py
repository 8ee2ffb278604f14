"""`fedsafe simulate` and a Ray cluster on this machine, for real (issue 14 item 4): a head started with
`ray start --head` and a second raylet started with `ray start --address=…`, each with one CPU, its own
ports and (the head) its own temp dir — the recipe in README "Simulating on a Ray cluster".

* `--ray-address` joins it: the run completes with virtual nodes placed on both raylets (read from the
  cluster's GCS actor table) and the cluster is left running.
* Without `--ray-address`, a cluster running beside the run (and advertised through RAY_ADDRESS) is not
  touched: the run starts its own private Ray, and the cluster gains no job actor and stays up.

The cluster's processes run in their own session and are stopped by signalling that session only:
`ray stop` would stop every Ray instance on the machine, other users' included.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deploy_harness import free_port

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}

# Ray's GCS keeps finished actors; this prints the cluster's nodes and every actor's class and node.
CLUSTER_STATE = """
import json, sys, ray
from ray._private import state
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
actors = [{"id": a, "class": v["ActorClassName"], "node": v["Address"]["NodeID"], "job": v["JobID"]}
          for a, v in state.actors().items()]
print("CLUSTER-STATE " + json.dumps({"nodes": nodes, "actors": actors}))
"""


def ray_start(*args: str, log: Path) -> subprocess.Popen:
    """`ray start … --block` for one raylet of one CPU, every port its own, in its own session."""
    ports = []
    for flag in ("--node-manager-port", "--object-manager-port", "--metrics-export-port",
                 "--runtime-env-agent-port", "--dashboard-agent-grpc-port", "--dashboard-agent-listen-port"):
        ports += [flag, str(free_port())]
    command = [str(BIN / "ray"), "start", *args, "--node-ip-address", "127.0.0.1", "--num-cpus", "1",
               "--object-store-memory", str(80 * 2**20), "--disable-usage-stats", "--block", *ports]
    with log.open("w") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **RAY_ENV})


def cluster_state(address: str) -> dict:
    done = subprocess.run([sys.executable, "-c", CLUSTER_STATE, address], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **RAY_ENV})
    assert done.returncode == 0, done.stderr[-2000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("CLUSTER-STATE "))  # Ray prints too
    return json.loads(line.removeprefix("CLUSTER-STATE "))


def stop(process: subprocess.Popen) -> None:
    """Stop one `ray start --block` and everything it started (its session), nothing else."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(wait)
            time.sleep(1)  # the session's other processes exit with their parent
        except subprocess.TimeoutExpired:
            continue
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A two-raylet Ray cluster on this machine: (GCS address, head process, worker process)."""
    base = tmp_path_factory.mktemp("ray-cluster")
    temp_dir = Path("/tmp") / f"fedsafe-ray-{os.getpid()}"  # Ray's socket paths must stay short
    address = f"127.0.0.1:{free_port()}"
    head = ray_start("--head", "--port", address.split(":")[1], "--temp-dir", str(temp_dir),
                     "--include-dashboard", "false", "--ray-client-server-port", str(free_port()),
                     log=base / "head.log")
    processes = [head]
    try:
        deadline = time.monotonic() + 120
        while not (temp_dir / "ray_current_cluster").exists() and time.monotonic() < deadline:
            assert head.poll() is None, (base / "head.log").read_text()[-2000:]
            time.sleep(0.5)
        worker = ray_start("--address", address, log=base / "worker.log")
        processes.append(worker)
        while len(cluster_state(address)["nodes"]) < 2:
            assert time.monotonic() < deadline, (base / "worker.log").read_text()[-2000:]
            assert worker.poll() is None, (base / "worker.log").read_text()[-2000:]
            time.sleep(1)
        yield address, head, worker
    finally:
        for process in reversed(processes):
            stop(process)
        shutil.rmtree(temp_dir, ignore_errors=True)  # the cluster's sessions and logs


def fedsafe_simulate(out: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [str(BIN / "fedsafe"), "simulate", "--model", "mlp", "--dataset", "breast-cancer", "--nodes", "2",
               "--rounds", "1", "--epsilon", "8", "--client-cpus", "1", "--out", str(out), *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=400, env={**os.environ, **(env or {})})


def test_simulate_joins_the_cluster_places_nodes_on_both_raylets_and_leaves_it_running(cluster, tmp_path):
    address, head, worker = cluster
    before = {a["id"] for a in cluster_state(address)["actors"]}
    done = fedsafe_simulate(tmp_path / "run", "--ray-address", address)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert (tmp_path / "run" / "metrics.json").exists()

    state = cluster_state(address)
    nodes = [a["node"] for a in state["actors"] if a["id"] not in before and a["class"] == "ClientAppActor"]
    assert len(nodes) >= 2 and set(nodes) == set(state["nodes"])  # virtual nodes ran on both raylets
    assert head.poll() is None and worker.poll() is None and len(state["nodes"]) == 2  # left as it was


def test_plain_simulate_beside_a_cluster_runs_privately_and_leaves_it_alone(cluster, tmp_path):
    address, head, worker = cluster
    before = cluster_state(address)
    # RAY_ADDRESS is how a cluster is advertised to drivers on a machine; ray.init() would join it.
    done = fedsafe_simulate(tmp_path / "run", env={"RAY_ADDRESS": address})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "must not be provided" not in done.stderr

    after = cluster_state(address)
    assert {a["id"] for a in after["actors"]} == {a["id"] for a in before["actors"]}  # nothing ran there
    assert head.poll() is None and worker.poll() is None and sorted(after["nodes"]) == sorted(before["nodes"])
