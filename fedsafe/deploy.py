"""Start Flower's SuperLink and SuperNode the fedsafe way: checked credentials, the right flags.

`fedsafe superlink` and `fedsafe node` are thin: they check what an operator gets wrong most often
(certificate files, the node key's format, the data file, the ledger) *before* Flower starts, build
the `flower-superlink` / `flower-supernode` command line, and run it. TLS and SuperNode
authentication are on unless `--insecure` is given explicitly.

Flower 1.41 facts this module relies on (checked against `--help` and by running):

* `flower-superlink --ssl-ca-certfile/--ssl-certfile/--ssl-keyfile --enable-supernode-auth
  --database PATH --host H --port P` (one HTTPS port for the Fleet, Control and Runtime APIs);
  `--database`'s directory must exist.
* `flower-supernode --superlink H:P --root-certificates CA --auth-supernode-private-key KEY
  --node-config '...' --port P` (`--port`: the node's local Runtime API, distinct per node on one
  machine). `--node-config` values are TOML: strings must be quoted.
* An unregistered node key ends the SuperNode with "Exit Code: 305" in its log and OS status 1;
  a root certificate that does not verify the SuperLink gives CERTIFICATE_VERIFY_FAILED.
* SuperLink and SuperNode start a `flower-superexec` that polls for work every
  `FLWR_SUPEREXEC_TASK_POLL_INTERVAL` seconds (default 1.0); fedsafe lowers it (see FLOWER_ENV).
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Offline, quiet, reproducible; a SuperExec that notices new tasks within 0.1 s instead of 1 s.
FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",
}

EXIT_NODE_REFUSED = 3  # the SuperLink refused this node (unregistered key, TLS failure)

INSECURE_WARNING = (
    "fedsafe: WARNING: --insecure: no TLS{what}. Everything, model updates included, crosses the "
    "network in clear text. Use this only on a trusted test network."
)


class DeployError(RuntimeError):
    """Something an operator must fix before a SuperLink or SuperNode can start; the message says what."""


def flower_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    for key, value in FLOWER_ENV.items():
        env.setdefault(key, value)
    return env


def flower_binary(name: str) -> str:
    """A Flower executable: next to this Python first (same virtualenv), then on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise DeployError(f"{name} not found next to {sys.executable} or on PATH; install flwr==1.41.0")
    return found


# ----------------------------------------------------------------------------- credentials checks
def _read(path: Path, what: str) -> bytes:
    if not path.exists():
        raise DeployError(f"{what} {path} does not exist")
    if not path.is_file():
        raise DeployError(f"{what} {path} is not a file")
    try:
        return path.read_bytes()
    except OSError as err:
        raise DeployError(f"cannot read {what} {path}: {err.strerror}") from None


def load_certificate(path: Path, what: str):
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificate(_read(path, what))
    except ValueError:
        raise DeployError(f"{what} {path} is not a PEM certificate") from None


def check_superlink_certificates(certs_dir: Path) -> tuple[Path, Path, Path]:
    """(ca.pem, server.pem, server.key) from `fedsafe certs`, checked to belong together and be valid now."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    certs_dir = certs_dir.expanduser()
    if not certs_dir.is_dir():
        raise DeployError(f"certificate directory {certs_dir} does not exist; create it with `fedsafe certs --host <name>`")
    ca_path, cert_path, key_path = certs_dir / "ca.pem", certs_dir / "server.pem", certs_dir / "server.key"
    ca = load_certificate(ca_path, "CA certificate")
    cert = load_certificate(cert_path, "server certificate")
    try:
        key = serialization.load_pem_private_key(_read(key_path, "server key"), password=None)
    except (ValueError, TypeError):
        raise DeployError(f"server key {key_path} is not an unencrypted PEM private key") from None
    if cert.public_key().public_numbers() != key.public_key().public_numbers():
        raise DeployError(f"server key {key_path} does not belong to the certificate {cert_path}")
    try:
        cert.verify_directly_issued_by(ca)
    except Exception:  # noqa: BLE001 - ValueError, InvalidSignature, TypeError
        raise DeployError(f"server certificate {cert_path} was not signed by the CA {ca_path}") from None
    now = _dt.datetime.now(_dt.timezone.utc)
    for path, certificate in ((ca_path, ca), (cert_path, cert)):
        if certificate.not_valid_after_utc <= now:
            raise DeployError(f"certificate {path} expired on {certificate.not_valid_after_utc:%Y-%m-%d}")
        if certificate.not_valid_before_utc > now:
            raise DeployError(f"certificate {path} is not valid before {certificate.not_valid_before_utc}")
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        ips = san.get_values_for_type(x509.IPAddress)
    except x509.ExtensionNotFound:
        ips = []
    if ipaddress.ip_address("127.0.0.1") not in ips:
        raise DeployError(
            f"server certificate {cert_path} has no subjectAltName 127.0.0.1: the SuperLink's own "
            "SuperExec connects to 127.0.0.1 and would refuse it, so no run would ever start; "
            "re-issue it with `fedsafe certs` (loopback names are added unless --no-loopback)"
        )
    return ca_path, cert_path, key_path


def check_node_key(path: Path) -> None:
    """The SuperNode's authentication key: OpenSSH EC private key without passphrase, as Flower loads it."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    data = _read(path.expanduser(), "node key")
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except (ValueError, TypeError) as err:
        hint = " (that is the public key; give the private one)" if data.startswith(b"ecdsa-") else ""
        raise DeployError(
            f"node key {path} is not an unencrypted OpenSSH private key{hint} ({err}); "
            "create one with `fedsafe node-keys <name>`"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise DeployError(f"node key {path} is not an ECDSA key; Flower accepts only EC keys (`fedsafe node-keys`)")
    mode = path.expanduser().stat().st_mode & 0o077
    if mode:
        print(f"fedsafe: warning: node key {path} is readable by other users; chmod 600 it", file=sys.stderr)


# ----------------------------------------------------------------------------- SuperLink
@dataclass(frozen=True)
class SuperLinkOptions:
    certs: Path | None
    database: Path
    host: str = "127.0.0.1"
    port: int = 8000
    insecure: bool = False
    log_file: Path | None = None


def superlink_command(opts: SuperLinkOptions) -> list[str]:
    """Check the SuperLink's credentials and return its command line."""
    if opts.database.suffix not in (".db", ".sqlite", ".sqlite3"):
        raise DeployError(f"--database {opts.database}: give an SQLite file path such as state/superlink.db")
    command = [flower_binary("flower-superlink")]
    if opts.insecure:
        command.append("--insecure")
    else:
        if opts.certs is None:
            raise DeployError("--certs DIR is required (or --insecure, for a test network only)")
        ca, cert, key = check_superlink_certificates(opts.certs)
        command += ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key),
                    "--enable-supernode-auth"]
    command += ["--database", str(opts.database), "--host", opts.host, "--port", str(opts.port),
                "--disable-runtime-dependency-installation"]
    if opts.log_file is not None:
        command += ["--log-file", str(opts.log_file)]
    return command


def prepare_database(path: Path) -> None:
    try:
        path.expanduser().parent.mkdir(parents=True, exist_ok=True)  # flower-superlink does not create it
    except OSError as err:
        raise DeployError(f"cannot create the directory of --database {path}: {err.strerror}") from None


# ----------------------------------------------------------------------------- SuperNode
@dataclass(frozen=True)
class NodeOptions:
    superlink: str
    root_cert: Path | None
    key: Path | None
    data_path: Path
    state_dir: Path
    max_epsilon: float
    delta: float
    device: str = "auto"
    port: int = 9094
    dataset_id: str | None = None
    insecure: bool = False
    max_retries: int | None = None
    max_wait_time: float | None = None
    # Seconds the SuperNode idles between pulls when the SuperLink has nothing for it (fedsafe/supernode.py);
    # None: Flower's own 3 s.
    poll_interval: float | None = 0.5
    # Test and simulation only (documented as such): reproducible DP noise; deliberately bad updates.
    seed_noise: bool = False
    debug_poison: str | None = None


def toml_value(value: Any) -> str:
    """A --node-config value as TOML: strings quoted (Flower rejects bare words), numbers and booleans bare."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def node_config_string(values: Mapping[str, Any]) -> str:
    return " ".join(f"{key}={toml_value(value)}" for key, value in values.items() if value is not None)


def _check_superlink_address(address: str) -> None:
    if "://" in address or not re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):\d{1,5}", address):
        raise DeployError(f"--superlink {address!r}: give HOST:PORT, e.g. fl.example.org:8000")


def node_config(opts: NodeOptions) -> dict[str, Any]:
    from fedsafe.client.policy import NodePolicy, PolicyError

    values: dict[str, Any] = {
        "data-path": str(opts.data_path.expanduser().resolve()),
        "state-dir": str(opts.state_dir.expanduser().resolve()),
        "max-epsilon": float(opts.max_epsilon),
        "delta": float(opts.delta),
        "device": opts.device,
        "dataset-id": opts.dataset_id,
    }
    if opts.seed_noise:
        values["seed-noise"] = True
    if opts.debug_poison:
        values["debug-poison"] = opts.debug_poison
    try:  # the ClientApp parses the same mapping: fail here, not at the first round
        NodePolicy.from_node_config({k: v for k, v in values.items() if v is not None})
    except PolicyError as err:
        raise DeployError(str(err)) from None
    return values


def check_node_data_and_ledger(opts: NodeOptions) -> str:
    """Load the node's data and ledger once; return a one-line summary of what the node holds and has spent."""
    from fedsafe.client.data import DataError, load_file, record_hashes
    from fedsafe.client.ledger import LedgerError, PrivacyLedger, audit_state_dir
    from fedsafe.client.policy import NodePolicy

    try:
        data = load_file(opts.data_path)
    except DataError as err:
        raise DeployError(f"--data-path: {err}") from None
    state_dir = opts.state_dir.expanduser()
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DeployError(f"cannot create --state-dir {state_dir}: {err.strerror}") from None
    if not os.access(state_dir, os.W_OK | os.X_OK):
        raise DeployError(f"--state-dir {state_dir} is not writable; the privacy ledger lives there")
    policy = NodePolicy(data_path=str(opts.data_path.expanduser().resolve()), dataset_id=opts.dataset_id,
                        state_dir=str(state_dir), max_epsilon=opts.max_epsilon, delta=opts.delta)
    key = policy.data_key(None, None, data)  # the dataset id, or the records of the data file
    try:
        ledger = PrivacyLedger.open(state_dir, key, records=record_hashes(data))
        spent = ledger.epsilon(opts.delta)
    except LedgerError as err:
        raise DeployError(str(err)) from None
    # Every ledger here, not only this data's: a damaged one (or one an older fedsafe wrote) is spend the
    # node would otherwise stop accounting for without a word.
    problems = audit_state_dir(state_dir).problems
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise DeployError(f"privacy ledger problem: {problems[0]}{more}; `fedsafe ledger verify --state-dir "
                          f"{state_dir}` lists them; refusing to start")
    return (f"{len(data)} samples shaped {tuple(data.x.shape[1:])} in {opts.data_path}; ledger {ledger.path} "
            f"holds ε={spent:.3f} of the cap ε={opts.max_epsilon:g} (δ={opts.delta:g})")


def node_command(opts: NodeOptions) -> list[str]:
    _check_superlink_address(opts.superlink)
    if opts.poll_interval is None:
        command = [flower_binary("flower-supernode")]
    elif opts.poll_interval > 0:
        command = [sys.executable, "-m", "fedsafe.supernode", "--fedsafe-poll-interval", repr(float(opts.poll_interval))]
    else:
        raise DeployError(f"--poll-interval must be > 0 seconds; got {opts.poll_interval}")
    command += ["--superlink", opts.superlink]
    if opts.insecure:
        command.append("--insecure")
    else:
        if opts.root_cert is None:
            raise DeployError("--root-cert CA.pem is required (or --insecure, for a test network only)")
        load_certificate(opts.root_cert.expanduser(), "root certificate")
        command += ["--root-certificates", str(opts.root_cert.expanduser().resolve())]
    if opts.key is not None:
        check_node_key(opts.key)
        command += ["--auth-supernode-private-key", str(opts.key.expanduser().resolve())]
    elif not opts.insecure:
        raise DeployError("--key is required: the SuperLink admits only nodes whose registered key signs their requests")
    command += ["--node-config", node_config_string(node_config(opts)), "--port", str(opts.port)]
    if opts.max_retries is not None:
        command += ["--max-retries", str(opts.max_retries)]
    if opts.max_wait_time is not None:
        command += ["--max-wait-time", str(opts.max_wait_time)]
    return command


# What the SuperNode's log says when the SuperLink turns it away, and what fedsafe tells the operator.
_REFUSALS = (
    (re.compile(r"CERTIFICATE_VERIFY_FAILED|certificate verify failed"),
     "TLS verification of the SuperLink failed: --root-cert is not the CA that signed the SuperLink's "
     "certificate, or the address in --superlink is not one of the certificate's names"),
    (re.compile(r"Failed to activate SuperNode|Exit Code: 305"),
     "the SuperLink refused this node: its public key is not registered (or was unregistered). "
     "Send {pub} to the coordinator, who runs `flwr supernode register {pub} <connection>`{fingerprint}"),
)


def explain_refusal(log_text: str, key: Path | None) -> str | None:
    for pattern, message in _REFUSALS:
        if pattern.search(log_text):
            pub = f"{key}.pub" if key is not None else "<key>.pub"
            fingerprint = ""
            if key is not None and Path(f"{key}.pub").expanduser().exists():
                from .credentials import ssh_public_key_fingerprint

                fingerprint = f"; its fingerprint is {ssh_public_key_fingerprint(Path(f'{key}.pub').expanduser())}"
            return message.format(pub=pub, fingerprint=fingerprint)
    return None


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def supervise(command: Sequence[str], env: Mapping[str, str], *, warm_program: str | None,
              key: Path | None = None, explain: bool = False) -> int:
    """Run a SuperLink or SuperNode, pass its output through, forward SIGINT/SIGTERM; with `explain`,
    say in words why the SuperLink refused a SuperNode.

    With `warm_program` (flwr-clientapp for a node, flwr-serverapp for the SuperLink), a zygote that has
    imported PyTorch once forks those app processes (fedsafe/warmstart.py). The output goes to our
    stdout line by line; the last lines are kept to recognise why the process stopped.
    """
    from . import warmstart

    preexec = _die_with_parent if sys.platform.startswith("linux") else None
    env = dict(env)
    warm = zygote = None
    if warm_program and warmstart.supported():
        warm = warmstart.WarmStart(warm_program, flower_binary(warm_program))
        zygote = subprocess.Popen(warm.command(), env=env, preexec_fn=preexec)  # noqa: PLW1509
        env = warm.environment(env)
    proc = subprocess.Popen(list(command), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=preexec)  # noqa: PLW1509 - only prctl, no locks

    def forward(signum, _frame):
        for child in (proc, zygote):
            if child is not None and child.poll() is None:
                child.send_signal(signum)

    tail: list[str] = []

    def relay() -> None:  # in a thread: the SuperNode's children keep the pipe open after it exits
        assert proc.stdout is not None
        for raw in iter(proc.stdout.readline, b""):
            line = raw.decode(errors="replace")
            sys.stdout.write(line)
            sys.stdout.flush()
            tail.append(line)
            del tail[:-200]

    reader = threading.Thread(target=relay, daemon=True)
    reader.start()
    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        status = proc.wait()
        reader.join(timeout=5)  # its SuperExec notices within a second that the SuperNode is gone
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for child in (proc, zygote):
            if child is not None and child.poll() is None:
                child.terminate()
                try:
                    child.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()
        if warm is not None:
            warm.cleanup()
    if status != 0 and explain:
        reason = explain_refusal("".join(tail), key)
        if reason is not None:
            print(f"fedsafe node: error: {reason}", file=sys.stderr, flush=True)
            return EXIT_NODE_REFUSED
    return status
