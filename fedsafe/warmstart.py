"""Warm start for Flower's app processes: fork them from a process that has already imported the heavy libraries.

Flower 1.41's SuperNode starts a fresh `flwr-clientapp` process for every message (it finds the
program on PATH). On a small machine that process spends ~2.5 s importing Flower and, in fedsafe's
train handler, ~5-9 s more importing PyTorch and Opacus, every round. `fedsafe node` therefore runs a
*zygote*: one process that imports Flower, NumPy, PyTorch and Opacus once and then waits. The SuperNode
gets a PATH on which `flwr-clientapp` is a small shim: it hands its arguments, environment, working
directory and standard streams to the zygote over a private Unix socket; the zygote forks, and the child
runs Flower's own `flwr-clientapp` entry point with them. The shim waits, forwards SIGTERM/SIGINT, and
exits with the child's status — to Flower it is the ClientApp process.

What the child runs is unchanged: Flower's entry point loads the app from the FAB exactly as a fresh
process would. That FAB is one the node's operator approved (`fedsafe node --allow-app`, checked by the
SuperNode before anything of it is installed: fedsafe/flower/supernode.py), and it is that package's code that
runs, warm or cold: the zygote is itself started as `python -m fedsafe.warmstart`, so each child first
drops the zygote's own `fedsafe` modules from `sys.modules` — otherwise `fedsafe.client.app` would
resolve to the zygote's installed copy instead of the approved package. Each child re-seeds PyTorch's and NumPy's global generators from the OS, so no
two ClientApps share random state (DP noise must be fresh every round); CUDA is never initialised in
the zygote (a forked CUDA context is unusable). If the zygote is not running, the shim runs the real
`flwr-clientapp` instead: a cold start, slower and otherwise the same.

`fedsafe superlink` does the same for the coordinator's `flwr-serverapp` (one per run: a run starts,
or resumes, seconds sooner).

Linux/macOS only (fork, SCM_RIGHTS); `--cold-start` turns it off.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import stat
import struct
import sys
import tempfile
import time
import traceback
from pathlib import Path

# Flower program -> (module, function) of its entry point, and what its zygote imports once.
ENTRY_POINTS = {
    "flwr-clientapp": ("flwr.supernode.cli", "flwr_clientapp"),
    "flwr-serverapp": ("flwr.superlink.cli", "flwr_serverapp"),
}
PRELOAD = {
    "flwr-clientapp": (
        "numpy",
        "torch",
        "torch._dynamo",  # imported lazily by the first optimizer.step(): ~1-2 s
        "opacus",
        "opacus.accountants.analysis.rdp",
        "flwr.app",
        "flwr.clientapp",
        "flwr.supernode.cli",
        "flwr.supernode.runtime.run_clientapp",
    ),
    "flwr-serverapp": (
        "numpy",
        "torch",
        "sklearn.datasets",  # central evaluation data and metrics
        "sklearn.model_selection",
        "sklearn.metrics",
        "matplotlib.pyplot",  # the accuracy/ε plot (backend Agg, set before the import)
        "flwr.app",
        "flwr.serverapp",
        "flwr.serverapp.strategy",
        "flwr.superlink.cli",
    ),
}

SHIM = """#!{python} -IS
# fedsafe warm-start shim for {program} (see fedsafe/warmstart.py). Generated; do not edit.
import json, os, signal, socket, struct, sys
SOCKET, REAL = {socket!r}, {real!r}
try:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(SOCKET)
except OSError:
    os.execv(REAL, [REAL] + sys.argv[1:])  # no zygote: a cold start
request = json.dumps({{"argv": sys.argv[1:], "cwd": os.getcwd(), "env": dict(os.environ)}}).encode()
socket.send_fds(conn, [b"F"], [0, 1, 2])
conn.sendall(struct.pack("!I", len(request)) + request)
def forward(signum, _frame):
    try:
        conn.sendall(struct.pack("!i", signum))
    except OSError:
        pass
signal.signal(signal.SIGTERM, forward)
signal.signal(signal.SIGINT, forward)
status = b""
while len(status) < 4:
    chunk = conn.recv(4 - len(status))
    if not chunk:
        sys.exit(1)  # the zygote died
    status += chunk
sys.exit(struct.unpack("!i", status)[0])
"""


def supported() -> bool:
    return hasattr(os, "fork") and hasattr(socket, "send_fds") and sys.platform != "win32"


class WarmStart:
    """A private directory holding the zygote's socket and the shim standing in for `program`."""

    def __init__(self, program: str, real_program: str) -> None:
        if program not in ENTRY_POINTS:
            raise ValueError(f"no warm start for {program!r}; known: {sorted(ENTRY_POINTS)}")
        self.program = program
        self.directory = Path(tempfile.mkdtemp(prefix="fedsafe-warm-"))  # 0700; short path (sun_path ≤ 107)
        self.socket = self.directory / "zygote.sock"
        self.bin = self.directory / "bin"
        self.bin.mkdir()
        self.shim = self.bin / program
        self.shim.write_text(SHIM.format(python=sys.executable, program=program, socket=str(self.socket),
                                         real=real_program))
        self.shim.chmod(stat.S_IRWXU)

    def environment(self, env: dict[str, str]) -> dict[str, str]:
        return {**env, "PATH": f"{self.bin}{os.pathsep}{env.get('PATH', '')}"}

    def command(self) -> list[str]:
        return [sys.executable, "-m", "fedsafe.warmstart", self.program, str(self.socket)]

    def cleanup(self) -> None:
        for path in (self.socket, self.shim):
            path.unlink(missing_ok=True)
        for path in (self.bin, self.directory):
            try:
                path.rmdir()
            except OSError:
                pass


# ------------------------------------------------------------------------------------- the zygote
def _recv_exact(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("shim closed the connection")
        data += chunk
    return data


def forget_own_modules() -> None:
    """Drop fedsafe's modules from this process, so the app package's own `fedsafe` is imported."""
    for name in [name for name in sys.modules if name == "fedsafe" or name.startswith("fedsafe.")]:
        del sys.modules[name]


def _child(fds: list[int], request: dict, program: str) -> None:  # pragma: no cover - runs in the forked child
    code = 1
    try:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        for target, fd in enumerate(fds[:3]):
            os.dup2(fd, target)
        for fd in fds:
            if fd > 2:
                os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        # Fresh random state: a fork copies the zygote's generators, and DP noise must never repeat.
        import numpy as np
        import torch

        torch.seed()
        np.random.seed(int.from_bytes(os.urandom(4), "little"))
        sys.argv = [program, *request["argv"]]
        forget_own_modules()
        import importlib

        module, function = ENTRY_POINTS[program]
        getattr(importlib.import_module(module), function)()
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException:  # noqa: BLE001 - report anything, then exit
        traceback.print_exc()
        code = 1
    finally:
        try:  # what interpreter shutdown would do; the zygote's own cleanup (the serve loop's) must not run
            import atexit
            import threading

            for thread in threading.enumerate():
                if thread is not threading.main_thread() and not thread.daemon:
                    thread.join(timeout=10)
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def serve(program: str, socket_path: str) -> None:
    """Import what `program` needs, then fork one `program` per shim connection until SIGTERM/SIGINT."""
    import importlib

    started = time.perf_counter()
    if program == "flwr-serverapp":
        import matplotlib

        matplotlib.use("Agg")
    for name in PRELOAD[program] + ENTRY_POINTS[program][:1]:
        importlib.import_module(name)
    # (Opacus' import leaves the root logger's handlers alone: fedsafe/opacus_logging.py.)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    Path(socket_path).unlink(missing_ok=True)
    listener.bind(socket_path)
    os.chmod(socket_path, stat.S_IRUSR | stat.S_IWUSR)
    listener.listen(16)
    print(f"fedsafe: warm start for {program} ready ({time.perf_counter() - started:.1f}s of imports, once)",
          file=sys.stderr, flush=True)

    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(True))
    children: dict[socket.socket, int] = {}  # shim connection -> child pid
    orphans: set[int] = set()  # children whose shim went away (told to stop; reaped when they exit)
    try:
        while not stopping:
            try:
                readable, _, _ = select.select([listener, *children], [], [], 0.2)
            except InterruptedError:
                continue
            for sock in readable:
                if sock is listener:
                    conn, _ = listener.accept()
                    conn.settimeout(10)
                    try:
                        _, fds, _, _ = socket.recv_fds(conn, 1, 3)
                        (size,) = struct.unpack("!I", _recv_exact(conn, 4))
                        request = json.loads(_recv_exact(conn, size))
                    except (OSError, ValueError, ConnectionError) as err:
                        print(f"fedsafe node: warm start: bad request ({err})", file=sys.stderr, flush=True)
                        conn.close()
                        continue
                    pid = os.fork()
                    if pid == 0:
                        listener.close()
                        for other in children:
                            other.close()
                        conn.close()
                        _child(fds, request, program)
                    for fd in fds:
                        os.close(fd)
                    conn.settimeout(None)
                    children[conn] = pid
                else:
                    pid = children[sock]
                    try:
                        data = sock.recv(4)
                    except OSError:
                        data = b""
                    signum = struct.unpack("!i", data)[0] if len(data) == 4 else signal.SIGTERM
                    try:
                        os.kill(pid, signum)  # forwarded signal, or the shim is gone: stop its child
                    except ProcessLookupError:
                        pass
                    if not data:
                        del children[sock]
                        sock.close()
                        orphans.add(pid)
            for conn, pid in list(children.items()):
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    code = os.waitstatus_to_exitcode(status)
                    try:
                        conn.sendall(struct.pack("!i", code if code >= 0 else 128 - code))
                    except OSError:
                        pass
                    conn.close()
                    del children[conn]
            for pid in list(orphans):
                if os.waitpid(pid, os.WNOHANG)[0]:
                    orphans.discard(pid)
    finally:
        for conn, pid in children.items():
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            conn.close()
        listener.close()
        Path(socket_path).unlink(missing_ok=True)


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2])
