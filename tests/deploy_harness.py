"""A real federation on 127.0.0.1 for tests and benchmarks: SuperLink, SuperNodes, `flwr run`.

Every process is started through the fedsafe CLI (`python -m fedsafe superlink|node`) with TLS and
SuperNode authentication, in its own session, with its output in a log file under the federation's
directory. Every wait is bounded. `Federation.close()` kills every process it started and every
process those started (Flower's SuperExecs, ServerApps and ClientApps), found through /proc.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FLOWER_BINARIES = ("flower-superlink", "flower-supernode", "flwr")
CONNECTION = "fedsafe-test"


def flower_available() -> bool:
    return os.name == "posix" and Path("/proc").is_dir() and all((BIN / b).exists() for b in FLOWER_BINARIES)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_tls(port: int, ca: Path, proc: subprocess.Popen, deadline: float) -> None:
    ctx = ssl.create_default_context(cafile=str(ca))
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the SuperLink exited early with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                with ctx.wrap_socket(sock, server_hostname="127.0.0.1"):
                    return
        except OSError:
            time.sleep(0.2)
    raise AssertionError("the SuperLink did not accept TLS connections in time")


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def wait_for_text(path: Path, pattern: str, proc: subprocess.Popen | None, deadline: float,
                  start: int = 0) -> re.Match[str]:
    """Wait until `pattern` appears in the log `path` (after character `start`)."""
    while time.monotonic() < deadline:
        text = read(path)
        if match := re.search(pattern, text[start:]):
            return match
        if proc is not None and proc.poll() is not None:
            text = read(path)
            if match := re.search(pattern, text[start:]):
                return match
            raise AssertionError(f"process exited with {proc.returncode} before {pattern!r}:\n{text[-4000:]}")
        time.sleep(0.2)
    raise AssertionError(f"{pattern!r} not seen in {path} in time:\n{read(path)[-4000:]}")


# ------------------------------------------------------------------------------ process trees
def _process_table() -> dict[int, tuple[int, list[bytes]]]:
    """pid -> (parent pid, argv) of every process we can see."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        table[int(entry.name)] = (ppid, argv)
    return table


def descendants(roots: set[int]) -> set[int]:
    """`roots` and every process below them: children by parent pid, and Flower's task processes by their
    `--parent-pid` argument (they may be re-parented once their parent is gone)."""
    table = _process_table()
    found = set(r for r in roots if r in table)
    changed = True
    while changed:
        changed = False
        for pid, (ppid, argv) in table.items():
            if pid in found:
                continue
            parent_arg = None
            if b"--parent-pid" in argv:
                idx = argv.index(b"--parent-pid")
                if idx + 1 < len(argv) and argv[idx + 1].isdigit():
                    parent_arg = int(argv[idx + 1])
            if ppid in found or parent_arg in found:
                found.add(pid)
                changed = True
    return found


def kill_tree(roots: set[int], sig: int = signal.SIGKILL, timeout: float = 10.0) -> None:
    """Send `sig` to every process of the trees under `roots`, repeatedly (children started meanwhile
    too), until all are gone or `timeout` passed; then SIGKILL what is left."""
    deadline = time.monotonic() + timeout
    known: set[int] = set()
    while time.monotonic() < deadline:
        alive = descendants(roots | known)
        if not alive:
            return
        known |= alive
        for pid in alive:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    for pid in descendants(roots | known):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM every process tree (Flower shuts down cleanly on it), then SIGKILL what remains."""
    roots = {p.pid for p in procs}
    tree = descendants(roots)
    for pid in tree:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        time.sleep(0.2)
    kill_tree(roots | tree, signal.SIGKILL, timeout=10)
    for proc in procs:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


# ------------------------------------------------------------------------------ data
def write_node_data(directory: Path, num_nodes: int, dataset: str = "breast-cancer", seed: int = 42) -> list[Path]:
    """Each node's share of a built-in dataset's training split, as .npz files (x, y)."""
    import numpy as np

    from fedsafe.client.data import PartitionScheme, load_partition

    directory.mkdir(parents=True, exist_ok=True)
    scheme = PartitionScheme("iid", num_nodes, seed=seed)
    paths = []
    for i in range(num_nodes):
        part = load_partition(dataset, i, scheme)
        path = directory / f"node{i}.npz"
        np.savez(path, x=part.x, y=part.y)
        paths.append(path)
    return paths


def run_config_string(values: Mapping[str, Any]) -> str:
    from fedsafe.deploy import toml_value

    return " ".join(f"{k}={toml_value(v)}" for k, v in values.items())


_APP_HASHES: dict[Path, str] = {}


def repo_app_hash(project: Path = REPO) -> str:
    """The SHA-256 of the app package `flwr run PROJECT` ships (`fedsafe app-hash`), once per test session."""
    if project not in _APP_HASHES:
        from fedsafe.deploy import app_hash

        _APP_HASHES[project] = app_hash(project)
    return _APP_HASHES[project]


# ------------------------------------------------------------------------------ the federation
class Federation:
    """A SuperLink with TLS + node authentication and the SuperNodes attached to it, on 127.0.0.1."""

    def __init__(self, root: Path, env: Mapping[str, str] | None = None) -> None:
        from fedsafe import credentials as cr

        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        # The CA's private key stays out of the SuperLink's directory (fedsafe superlink refuses it there).
        self.ca, ca_key = cr.make_ca(root / "ca")
        cr.make_server_certificate(root / "certs", self.ca, ca_key, ["127.0.0.1", "localhost"])
        (root / "certs" / "ca.pem").write_bytes(self.ca.read_bytes())
        self.flwr_home = root / "flwr-home"
        self.flwr_home.mkdir(exist_ok=True)
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\nroot-certificates = "{self.ca}"\n'
        )
        self.env = {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
            "FLWR_HOME": str(self.flwr_home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        self.keys: dict[str, tuple[Path, Path]] = {}
        self.node_ids: dict[str, int] = {}
        self.superlink: subprocess.Popen | None = None
        self._starts = 0

    # ---- processes --------------------------------------------------------------------------------
    def start(self, name: str, args: list[str], cwd: Path | None = None) -> subprocess.Popen:
        self._starts += 1
        log = self.root / f"{name}.{self._starts}.log"
        with log.open("wb") as handle:
            proc = subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT, env=self.env,
                                    cwd=cwd or self.root, start_new_session=True)
        self.procs[f"{name}.{self._starts}"] = proc
        self.logs[name] = log
        return proc

    def fedsafe(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "fedsafe", *args]

    def start_superlink(self, timeout: float = 120) -> subprocess.Popen:
        self.superlink = self.start("superlink", self.fedsafe(
            "superlink", "--certs", str(self.root / "certs"), "--database", str(self.root / "state" / "superlink.db"),
            "--port", str(self.port)))
        wait_for_tls(self.port, self.ca, self.superlink, time.monotonic() + timeout)
        return self.superlink

    def kill_superlink(self) -> None:
        """The coordinator's machine dies: SIGKILL the SuperLink, its SuperExec and the ServerApp at once."""
        assert self.superlink is not None
        kill_tree({self.superlink.pid}, signal.SIGKILL)
        self.superlink.wait(timeout=10)

    def flwr(self, *args: str, timeout: float = 60) -> dict:
        done = subprocess.run([str(BIN / "flwr"), *args, "--format", "json"], capture_output=True, text=True,
                              env=self.env, timeout=timeout, check=False, cwd=self.root)
        assert done.returncode == 0, done.stdout + done.stderr
        return json.loads(done.stdout)

    def make_keys(self, name: str) -> tuple[Path, Path]:
        from fedsafe import credentials as cr

        self.keys[name] = cr.make_node_keys(self.root / "keys", name)
        return self.keys[name]

    def register(self, name: str) -> int:
        _, public = self.keys.get(name) or self.make_keys(name)
        reply = self.flwr("supernode", "register", str(public), CONNECTION, "--name", name)
        assert reply["success"], reply
        self.node_ids[name] = int(reply["node-id"])
        return self.node_ids[name]

    def start_node(self, name: str, data_path: Path, *, max_epsilon: float = 1000.0, root_cert: Path | None = None,
                   extra: list[str] = ()) -> subprocess.Popen:
        """`fedsafe node` for `name` (its keys made if needed), with its own ledger directory and port; it runs
        only this repository's app (as `flwr run` ships it) unless `extra` names the apps it may run."""
        private, _ = self.keys.get(name) or self.make_keys(name)
        if not {"--allow-app", "--allow-any-app"} & set(extra):
            extra = ["--allow-app", repo_app_hash(), *extra]
        return self.start(name, self.fedsafe(
            "node", "--superlink", f"127.0.0.1:{self.port}", "--root-cert", str(root_cert or self.ca),
            "--key", str(private), "--data-path", str(data_path), "--state-dir", str(self.root / "ledgers" / name),
            "--max-epsilon", str(max_epsilon), "--delta", "1e-5", "--device", "cpu", "--port", str(free_port()),
            *extra))

    def wait_warm(self, name: str, timeout: float = 120) -> None:
        wait_for_text(self.logs[name], r"warm start for flwr-clientapp ready", self.node_proc(name), time.monotonic() + timeout)

    def node_proc(self, name: str) -> subprocess.Popen:
        return [p for key, p in self.procs.items() if key.rsplit(".", 1)[0] == name][-1]

    def wait_connected(self, name: str, timeout: float = 60) -> int:
        match = wait_for_text(self.logs[name], r"SuperNode ID: (\d+)", self.node_proc(name), time.monotonic() + timeout)
        return int(match.group(1))

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.node_proc(name)
        kill_tree({proc.pid}, sig)
        proc.wait(timeout=10)

    # ---- runs -------------------------------------------------------------------------------------
    def run_command(self, run_config: Mapping[str, Any], app: Path = REPO) -> list[str]:
        return [str(BIN / "flwr"), "run", str(app), CONNECTION, "--run-config", run_config_string(run_config),
                "--stream"]

    def start_run(self, run_config: Mapping[str, Any], name: str = "run", app: Path = REPO) -> subprocess.Popen:
        return self.start(name, self.run_command(run_config, app))

    def run(self, run_config: Mapping[str, Any], timeout: float, name: str = "run",
            app: Path = REPO) -> tuple[int, str]:
        """`flwr run` of `app` (default: this repository) to the end (bounded); returns (exit status, its output)."""
        proc = self.start_run(run_config, name, app)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree({proc.pid})
            raise AssertionError(f"flwr run did not finish within {timeout:.0f}s:\n{read(self.logs[name])[-4000:]}")
        return proc.returncode, read(self.logs[name])

    def close(self) -> None:
        stop(list(self.procs.values()))

    def __enter__(self) -> Federation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
