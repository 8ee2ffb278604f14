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
* A node the SuperLink does not admit ends the SuperNode with "Failed to activate SuperNode" and
  "Exit Code: 305" in its log and OS status 1. The SuperLink says the same for two causes: a key that is
  not registered, and a key whose node still counts as online — after a crash, for up to two missed
  heartbeats (`HEARTBEAT_PATIENCE` × `HEARTBEAT_DEFAULT_INTERVAL` = 2 × 30 s after its last one).
  `supervise` therefore restarts the SuperNode for that long, with a countdown, before it calls the key
  unregistered. A root certificate that does not verify the SuperLink gives CERTIFICATE_VERIFY_FAILED.
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
import time
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

# `fedsafe node`'s exit status, by what happened (Flower ends the SuperNode with status 1 and a code in its log).
EXIT_NODE_REFUSED = 3  # not admitted: key not registered (or unregistered), or another session with this key is on
EXIT_TLS_FAILED = 4  # the SuperLink's certificate did not verify against --root-cert
EXIT_UNREACHABLE = 5  # no SuperLink answered within --max-retries / --max-wait-time
# Flower counts a node online until 2 heartbeats (30 s apart) after its last one: a node restarted after a
# crash is refused for at most that long. fedsafe node keeps trying for a little longer, then gives up.
ADMISSION_PATIENCE_S = 65.0
ADMISSION_RETRY_S = 5.0

INSECURE_WARNING = (
    "fedsafe: WARNING: --insecure: no TLS{what}. Everything, model updates included, crosses the "
    "network in clear text. Use this only on a trusted test network."
)


class DeployError(RuntimeError):
    """Something an operator must fix before a SuperLink or SuperNode can start; the message says what."""


def flower_environment(base: Mapping[str, str] | None = None, flwr_home: Path | None = None) -> dict[str, str]:
    """The environment of a SuperLink or SuperNode: FLOWER_ENV, and FLWR_HOME (where Flower unpacks every
    run's app) under the process's own state unless the operator exported one, instead of ~/.flwr."""
    env = dict(os.environ if base is None else base)
    for key, value in FLOWER_ENV.items():
        env.setdefault(key, value)
    if flwr_home is not None and not env.get("FLWR_HOME"):
        env["FLWR_HOME"] = str(flwr_home.expanduser().resolve())
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


def refuse_ca_private_key(certs_dir: Path, ca) -> None:
    """Refuse a SuperLink directory that holds the CA's private key (under any name): whoever reads the
    SuperLink's files could then issue certificates every node trusts."""
    from cryptography.hazmat.primitives import serialization

    ca_public = ca.public_key().public_numbers()
    for path in sorted(certs_dir.iterdir()):
        if path.name == "ca.key":
            found = True
        else:
            try:
                data = path.read_bytes() if path.is_file() and path.stat().st_size < 65536 else b""
            except OSError:
                continue  # unreadable: not ours to judge; the files the SuperLink needs are checked by name
            if b"PRIVATE KEY" not in data:
                continue
            try:
                key = serialization.load_pem_private_key(data, password=None)
                found = key.public_key().public_numbers() == ca_public
            except (ValueError, TypeError, AttributeError):
                found = False
        if found:
            raise DeployError(
                f"certificate directory {certs_dir} holds the CA's private key ({path.name}): the SuperLink "
                "needs only ca.pem, server.pem and server.key. Move it offline (it is needed only to issue "
                "certificates: `fedsafe certs --ca-cert … --ca-key /offline/ca.key`), then start again"
            )


def check_superlink_certificates(certs_dir: Path) -> tuple[Path, Path, Path]:
    """(ca.pem, server.pem, server.key) from `fedsafe certs`, checked to belong together and be valid now."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    certs_dir = certs_dir.expanduser()
    if not certs_dir.is_dir():
        raise DeployError(f"certificate directory {certs_dir} does not exist; create it with `fedsafe certs --host <name>`")
    ca_path, cert_path, key_path = certs_dir / "ca.pem", certs_dir / "server.pem", certs_dir / "server.key"
    ca = load_certificate(ca_path, "CA certificate")
    refuse_ca_private_key(certs_dir, ca)
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
    max_noise_multiplier: float | None = None  # None: the node-config default (fedsafe.settings.NODE_SETTINGS)
    cap_basis: str | None = None  # distributed DP: which ε the cap counts; None: the node-config default
    port: int = 9094
    dataset_id: str | None = None
    insecure: bool = False
    max_retries: int | None = None
    max_wait_time: float | None = None
    # Seconds the SuperNode idles between pulls when the SuperLink has nothing for it (fedsafe/flower/supernode.py);
    # None: Flower's own 3 s.
    poll_interval: float | None = 0.5
    # Test and simulation only (documented as such): reproducible DP noise; deliberately bad updates.
    seed_noise: bool = False
    debug_poison: str | None = None
    # The app packages (SHA-256 of the FAB) this node may run; allow_any_app runs whatever the coordinator ships.
    allowed_apps: tuple[str, ...] = ()
    allow_any_app: bool = False
    # The user model/task code (package.module:function or packages) the node may import (node-config allow-models).
    allow_models: str | None = None


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
        "max-noise-multiplier": None if opts.max_noise_multiplier is None else float(opts.max_noise_multiplier),
        "cap-basis": opts.cap_basis,
        "allow-models": opts.allow_models,
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


def app_pin_arguments(opts: NodeOptions) -> list[str]:
    """fedsafe.supernode's arguments for the apps this node may run; refuses a node that names none."""
    from .flower.supernode import APP_HASH
    from .supernode import ALLOW_ANY_APP_OPTION, ALLOW_APP_OPTION

    if opts.allow_any_app:
        return [ALLOW_ANY_APP_OPTION]
    if not opts.allowed_apps:
        raise DeployError("name the app this node may run: --allow-app <sha256> (the coordinator's "
                          "`fedsafe app-hash`; check it with them), or --allow-any-app to run whatever the "
                          "coordinator ships (its code then decides whether DP and the ledger are used)")
    arguments = []
    for digest in opts.allowed_apps:
        if not APP_HASH.fullmatch(digest.lower()):
            raise DeployError(f"--allow-app {digest!r}: give the app's SHA-256 in hex (64 characters), "
                              "as `fedsafe app-hash` prints it")
        arguments += [ALLOW_APP_OPTION, digest.lower()]
    return arguments


def app_hash(project: Path) -> str:
    """The SHA-256 of the app package `flwr run PROJECT` builds and ships: what `--allow-app` pins."""
    from flwr.cli.build import build_fab_from_disk

    from .flower.supernode import app_digest

    project = project.expanduser()
    if not (project / "pyproject.toml").is_file():
        raise DeployError(f"{project} is not a Flower app: it has no pyproject.toml")
    try:
        return app_digest(build_fab_from_disk(project))
    except (ValueError, OSError) as err:
        raise DeployError(f"cannot build the app package of {project}: {err}") from None


def node_command(opts: NodeOptions) -> list[str]:
    _check_superlink_address(opts.superlink)
    command = [sys.executable, "-m", "fedsafe.supernode", *app_pin_arguments(opts)]
    if opts.poll_interval is not None:
        if not opts.poll_interval > 0:
            raise DeployError(f"--poll-interval must be > 0 seconds; got {opts.poll_interval}")
        command += ["--fedsafe-poll-interval", repr(float(opts.poll_interval))]
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


# What the SuperNode's log says when it stops before it got in, and what fedsafe tells the operator.
NOT_ADMITTED = re.compile(r"Failed to activate SuperNode")
_REFUSALS = (
    (re.compile(r"CERTIFICATE_VERIFY_FAILED|certificate verify failed"), EXIT_TLS_FAILED,
     "TLS verification of the SuperLink failed: --root-cert is not the CA that signed the SuperLink's "
     "certificate, or the address in --superlink is not one of the certificate's names"),
    (NOT_ADMITTED, EXIT_NODE_REFUSED,
     "the SuperLink refused this node{waited}: its public key is not registered (or was unregistered){other}. "
     "Send {pub} to the coordinator, who runs `flwr supernode register {pub} <connection>`{fingerprint}"),
    (re.compile(r"Failed to initialize the connection to the SuperLink"), EXIT_UNREACHABLE,
     "no SuperLink answered at --superlink within --max-retries / --max-wait-time (is it running, is the "
     "address and port right, does a firewall block it?)"),
)


def explain_refusal(log_text: str, key: Path | None, waited: float = 0.0) -> tuple[int, str] | None:
    """(exit status, one line) for a SuperNode that stopped before it got in; None if it got in or stopped otherwise."""
    for pattern, status, message in _REFUSALS:
        if pattern.search(log_text):
            pub = f"{key}.pub" if key is not None else "<key>.pub"
            fingerprint = ""
            if key is not None and Path(f"{key}.pub").expanduser().exists():
                from .credentials import ssh_public_key_fingerprint

                fingerprint = f"; its fingerprint is {ssh_public_key_fingerprint(Path(f'{key}.pub').expanduser())}"
            if waited > 0:
                other = ", or another SuperNode with this key is running"
                when = f" for {waited:.0f} s"
            else:
                other = (", or this node crashed less than a minute ago and its previous session still counts "
                         "as online (it expires within 60 s; without --max-retries, fedsafe node waits for it)")
                when = ""
            return status, message.format(pub=pub, fingerprint=fingerprint, waited=when, other=other)
    return None


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _stop(child: subprocess.Popen | None) -> None:
    if child is not None and child.poll() is None:
        child.terminate()
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


class _Supervisor:
    """One SuperLink or SuperNode process at a time: its output passed through (last lines kept), signals
    forwarded to it and to the zygote."""

    def __init__(self, env: Mapping[str, str], preexec) -> None:
        self.env, self.preexec = dict(env), preexec
        self.children: list[subprocess.Popen] = []
        self.stopping = False

    def forward(self, signum, _frame) -> None:
        self.stopping = True
        for child in self.children:
            if child.poll() is None:
                child.send_signal(signum)

    def run(self, command: Sequence[str]) -> tuple[int, str]:
        proc = subprocess.Popen(list(command), env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                preexec_fn=self.preexec)  # noqa: PLW1509 - only prctl, no locks
        self.children.append(proc)
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
        try:
            status = proc.wait()
            reader.join(timeout=5)  # its SuperExec notices within a second that the SuperNode is gone
        finally:
            _stop(proc)
            self.children.remove(proc)
        return status, "".join(tail)


def supervise(command: Sequence[str], env: Mapping[str, str], *, warm_program: str | None,
              key: Path | None = None, explain: bool = False, admission_patience: float = 0.0) -> int:
    """Run a SuperLink or SuperNode, pass its output through, forward SIGINT/SIGTERM; with `explain`,
    say in words why a SuperNode did not get in, and exit with a status that names it.

    A SuperNode the SuperLink does not admit is started again every few seconds for `admission_patience`
    seconds, with a countdown: after a crash, the node's previous session counts as online for up to a
    minute. With `warm_program` (flwr-clientapp for a node, flwr-serverapp for the SuperLink), a zygote
    that has imported PyTorch once forks those app processes (fedsafe/warmstart.py); it outlives restarts.
    """
    from . import warmstart

    preexec = _die_with_parent if sys.platform.startswith("linux") else None
    supervisor = _Supervisor(env, preexec)
    warm = None
    if warm_program and warmstart.supported():
        warm = warmstart.WarmStart(warm_program, flower_binary(warm_program))
        supervisor.children.append(subprocess.Popen(warm.command(), env=supervisor.env, preexec_fn=preexec))  # noqa: PLW1509
        supervisor.env = warm.environment(supervisor.env)
    previous = {s: signal.signal(s, supervisor.forward) for s in (signal.SIGINT, signal.SIGTERM)}
    first_refusal = None
    try:
        while True:
            status, tail = supervisor.run(command)
            if status == 0 or not explain or supervisor.stopping or not NOT_ADMITTED.search(tail):
                break
            now = time.monotonic()
            first_refusal = now if first_refusal is None else first_refusal
            left = admission_patience - (now - first_refusal)
            if left <= 0:
                break
            print(f"fedsafe node: the SuperLink did not admit this node (yet). If it crashed less than a minute "
                  f"ago, its previous session still counts as online until two heartbeats are missed; trying "
                  f"again in {ADMISSION_RETRY_S:.0f} s ({left:.0f} s left before giving up)", file=sys.stderr,
                  flush=True)
            time.sleep(min(ADMISSION_RETRY_S, left))
            if supervisor.stopping:
                break
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for child in list(supervisor.children):
            _stop(child)
        if warm is not None:
            warm.cleanup()
    if status != 0 and explain and not supervisor.stopping:
        waited = time.monotonic() - first_refusal if first_refusal is not None and admission_patience > 0 else 0.0
        explained = explain_refusal(tail, key, waited=waited)
        if explained is not None:
            code, reason = explained
            print(f"fedsafe node: error: {reason}", file=sys.stderr, flush=True)
            return code
    return status
