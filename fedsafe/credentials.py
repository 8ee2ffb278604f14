"""TLS certificates and SuperNode authentication keys for a Flower 1.41 deployment.

Three kinds of credentials, all made with the ``cryptography`` library:

* a private certificate authority (CA): ``make_ca``;
* a SuperLink server certificate signed by that CA, with one subjectAltName per
  host the SuperNodes, the ``flwr`` CLI and the SuperLink's own SuperExec use to
  reach it: ``make_server_certificate``;
* a SuperNode authentication key pair: ``make_node_keys``.

Formats match what Flower 1.41 loads:

* ``flower-superlink --ssl-ca-certfile/--ssl-certfile/--ssl-keyfile`` read PEM
  files; uvicorn loads them with ``ssl.SSLContext.load_cert_chain``. Private keys
  are written as unencrypted PKCS#8 PEM (Flower passes no password).
* ``flower-supernode --root-certificates`` and the ``root-certificates`` key of a
  ``flwr`` connection read the CA certificate as PEM.
* ``flwr supernode register KEY.pub`` loads the public key with
  ``cryptography``'s ``load_ssh_public_key`` and accepts only EC keys on a NIST
  curve (``flwr.cli.supernode.register.try_load_public_key``).
* ``flower-supernode --auth-supernode-private-key KEY`` loads the private key with
  ``load_ssh_private_key(data, None)``: OpenSSH private-key format, *no*
  passphrase, EC key (``flwr.supernode.cli.flower_supernode``).
  Node keys are therefore ECDSA P-384 (the curve Flower itself generates), private
  key in ``-----BEGIN OPENSSH PRIVATE KEY-----`` format, public key as an
  ``ecdsa-sha2-nistp384 AAAA... name`` line, like ``ssh-keygen -t ecdsa -b 384``.

Every private key is written with mode 0600. Existing files are never replaced
unless ``overwrite=True``; all target paths are checked before anything is written,
so a refused call leaves no partial output.
"""

from __future__ import annotations

import argparse
import base64
import datetime as _dt
import errno
import hashlib
import ipaddress
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Union

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedsafe.client.files import atomic_write
from fedsafe.server.node_names import NODE_NAME_CHARACTERS, NODE_NAME_MAX_LENGTH

__all__ = [
    "CredentialError",
    "CredentialExistsError",
    "InvalidHostError",
    "OutputDirectoryError",
    "make_ca",
    "make_server_certificate",
    "make_node_keys",
    "normalize_hosts",
    "ssh_public_key_fingerprint",
    "main",
    "main_certs",
    "main_node_keys",
]

StrPath = Union[str, "os.PathLike[str]"]

CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"
DEFAULT_CA_DAYS = 3650
DEFAULT_SERVER_DAYS = 825
LOOPBACK_HOSTS = ("127.0.0.1", "localhost")

# Curves: P-384 everywhere; it is what Flower generates for its own EC keys.
_CURVE = ec.SECP384R1
_SIGNATURE_HASH = hashes.SHA384
_CLOCK_SKEW = _dt.timedelta(minutes=5)

_DNS_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_NODE_NAME = re.compile(rf"^[A-Za-z0-9][{NODE_NAME_CHARACTERS}]{{0,{NODE_NAME_MAX_LENGTH - 1}}}$")


# --------------------------------------------------------------------------- errors
class CredentialError(Exception):
    """Base class for every error raised by this module."""


class _CredentialOSError(CredentialError, OSError):
    """An OSError whose ``str()`` is the plain, human-readable message."""

    def __init__(self, code: int | None, message: str, filename: str | None = None):
        super().__init__(message)
        self.errno = code
        self.filename = filename
        self.message = message

    def __str__(self) -> str:
        return self.message


class CredentialExistsError(_CredentialOSError, FileExistsError):
    """A file that would be written already exists and ``overwrite`` is False."""


class InvalidHostError(CredentialError, ValueError):
    """A host given for a server certificate is not an IP address or DNS name."""


class OutputDirectoryError(_CredentialOSError):
    """The output directory cannot be created or written to."""


# --------------------------------------------------------------------------- hosts
def _normalize_host(host: str) -> x509.GeneralName:
    if not isinstance(host, str):
        raise InvalidHostError(f"host {host!r} is not a string")
    raw = host
    host = host.strip()
    if not host:
        raise InvalidHostError("empty host name")
    if "://" in host or "/" in host:
        raise InvalidHostError(
            f"host {raw!r} looks like a URL; give only the host name or IP address"
        )
    # IPv6 may come bracketed, as in "[::1]" (Flower address syntax).
    candidate = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if "%" in candidate:
        raise InvalidHostError(
            f"host {raw!r}: scoped IPv6 addresses (with '%zone') cannot be certified"
        )
    try:
        ip = ipaddress.ip_address(candidate)
    except ValueError:
        ip = None
    if ip is not None:
        if ip.is_unspecified:
            raise InvalidHostError(
                f"host {raw!r} is a bind-all address, not one clients connect to; "
                "give the address or name clients use (e.g. 127.0.0.1 or a DNS name)"
            )
        return x509.IPAddress(ip)
    if candidate.count(":") == 1 or host.startswith("["):
        raise InvalidHostError(
            f"host {raw!r} contains a port or is a malformed IP address; "
            "give the host without ':port'"
        )
    if ":" in candidate:
        raise InvalidHostError(f"host {raw!r} is not a valid IPv6 address")
    if not host.isascii():
        raise InvalidHostError(
            f"host {raw!r} is not ASCII; give internationalised names in their "
            "punycode (xn--) form"
        )
    name = host.lower().rstrip(".")
    if len(name) > 253:
        raise InvalidHostError(f"host {raw!r} is longer than 253 characters")
    labels = name.split(".")
    for i, label in enumerate(labels):
        if i == 0 and label == "*" and len(labels) > 2:
            continue  # wildcard, only as the whole leftmost label of a 3+ label name
        if not _DNS_LABEL.match(label):
            raise InvalidHostError(
                f"host {raw!r} is not a valid DNS name (bad label {label!r}): labels "
                "are 1-63 characters of a-z, 0-9 and '-', not starting or ending "
                "with '-'"
            )
    if labels[-1].isdigit():
        raise InvalidHostError(
            f"host {raw!r} is neither a valid IP address nor a DNS name "
            "(all-numeric last label)"
        )
    return x509.DNSName(name)


def normalize_hosts(hosts: Sequence[str]) -> list[x509.GeneralName]:
    """Validate ``hosts`` and return them as SAN entries, duplicates removed.

    IP addresses (IPv4, IPv6, optionally bracketed) become ``IPAddress`` entries,
    everything else must be a valid DNS name and becomes a ``DNSName`` entry.
    Raises ``InvalidHostError`` with the offending host in the message.
    """
    if isinstance(hosts, (str, bytes)):
        raise InvalidHostError("hosts must be a list of strings, not a single string")
    names: list[x509.GeneralName] = []
    for host in hosts:
        name = _normalize_host(host)
        if name not in names:
            names.append(name)
    if not names:
        raise InvalidHostError("at least one host is required for a server certificate")
    return names


# --------------------------------------------------------------------------- files
def _prepare_dir(out_dir: StrPath) -> Path:
    path = Path(out_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise OutputDirectoryError(
            errno.ENOTDIR,
            f"output path {str(path)!r} exists and is not a directory",
            str(path),
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputDirectoryError(
            err.errno,
            f"cannot create output directory {str(path)!r}: {err.strerror}",
            str(path),
        ) from err
    if not os.access(path, os.W_OK | os.X_OK):
        raise OutputDirectoryError(
            errno.EACCES, f"output directory {str(path)!r} is not writable", str(path)
        )
    return path


def _check_targets(paths: Sequence[Path], overwrite: bool) -> None:
    for path in paths:
        if path.is_dir():
            raise CredentialExistsError(
                errno.EISDIR, f"{str(path)!r} exists and is a directory", str(path)
            )
        if not overwrite and (path.exists() or path.is_symlink()):
            raise CredentialExistsError(
                errno.EEXIST,
                f"refusing to overwrite existing file {str(path)!r} "
                "(pass overwrite=True / --overwrite to replace it)",
                str(path),
            )


def _write_key_and_certificate(
    key_path: Path, key: ec.EllipticCurvePrivateKey, cert_path: Path, cert: x509.Certificate, overwrite: bool
) -> None:
    # Key first: a certificate without its key is useless, the reverse is not.
    _write_file(key_path, _private_pem(key), private=True, overwrite=overwrite)
    _write_file(cert_path, cert.public_bytes(serialization.Encoding.PEM), private=False, overwrite=overwrite)


def _write_file(path: Path, data: bytes, *, private: bool, overwrite: bool) -> None:
    """Write ``data`` to ``path``; private files get mode 0600 from creation on.

    Without ``overwrite`` the file is created with O_EXCL (no symlink following,
    no race with a file appearing in between). With ``overwrite`` a temporary file
    in the same directory is renamed over the target, atomically.
    """
    mode = 0o600 if private else 0o644
    try:
        if overwrite:
            with atomic_write(path, "wb", permissions=mode) as handle:
                handle.write(data)
        else:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
            fd = os.open(path, flags, mode)
            try:
                os.fchmod(fd, mode)  # umask may have removed bits
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
            except BaseException:
                path.unlink(missing_ok=True)
                raise
    except FileExistsError as err:
        raise CredentialExistsError(
            errno.EEXIST,
            f"refusing to overwrite existing file {str(path)!r} "
            "(pass overwrite=True / --overwrite to replace it)",
            str(path),
        ) from err
    except PermissionError as err:
        raise OutputDirectoryError(
            err.errno, f"cannot write {str(path)!r}: {err.strerror}", str(path)
        ) from err


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )


def _load_cert(cert: StrPath | x509.Certificate) -> x509.Certificate:
    if isinstance(cert, x509.Certificate):
        return cert
    path = Path(cert).expanduser()
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except OSError as err:
        raise CredentialError(f"cannot read CA certificate {str(path)!r}: {err}") from err
    except ValueError as err:
        raise CredentialError(
            f"{str(path)!r} is not a PEM certificate: {err}"
        ) from err


def _load_key(key: StrPath | ec.EllipticCurvePrivateKey) -> ec.EllipticCurvePrivateKey:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key
    path = Path(key).expanduser()
    try:
        loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as err:
        raise CredentialError(f"cannot read CA key {str(path)!r}: {err}") from err
    except (ValueError, TypeError) as err:
        raise CredentialError(
            f"{str(path)!r} is not an unencrypted PEM private key: {err}"
        ) from err
    if not isinstance(loaded, ec.EllipticCurvePrivateKey):
        raise CredentialError(f"{str(path)!r} is not an EC private key")
    return loaded


def _public_numbers_equal(a: object, b: object) -> bool:
    try:
        return a.public_numbers() == b.public_numbers()  # type: ignore[attr-defined]
    except AttributeError:
        return False


# --------------------------------------------------------------------------- CA
def make_ca(
    out_dir: StrPath,
    common_name: str = "fedsafe CA",
    days: int = DEFAULT_CA_DAYS,
    *,
    overwrite: bool = False,
) -> tuple[Path, Path]:
    """Create a self-signed CA; return ``(cert_path, key_path)``.

    Writes ``ca.pem`` (certificate, give it to every SuperNode and ``flwr`` user as
    their root certificate) and ``ca.key`` (mode 0600; keep it offline).
    """
    if days < 1:
        raise CredentialError(f"days must be >= 1, got {days}")
    if not common_name or len(common_name) > 64:
        raise CredentialError("common_name must be 1-64 characters")
    directory = _prepare_dir(out_dir)
    cert_path, key_path = directory / CA_CERT_FILE, directory / CA_KEY_FILE
    _check_targets([cert_path, key_path], overwrite)

    key = ec.generate_private_key(_CURVE())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _dt.datetime.now(_dt.timezone.utc)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + _dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
            critical=False,
        )
        .sign(key, _SIGNATURE_HASH())
    )
    _write_key_and_certificate(key_path, key, cert_path, cert, overwrite)
    return cert_path, key_path


# --------------------------------------------------------------------------- server
def make_server_certificate(
    out_dir: StrPath,
    ca_cert: StrPath | x509.Certificate,
    ca_key: StrPath | ec.EllipticCurvePrivateKey,
    hosts: Sequence[str],
    *,
    days: int = DEFAULT_SERVER_DAYS,
    name: str = "server",
    overwrite: bool = False,
) -> tuple[Path, Path]:
    """Create a SuperLink TLS certificate signed by the CA; return ``(cert, key)``.

    ``hosts`` lists every name or IP address clients use to reach the SuperLink;
    each becomes a subjectAltName (IPs as ``IPAddress``, names as ``DNSName``).
    Include ``127.0.0.1`` when the SuperLink runs ServerApps in ``subprocess``
    isolation (the default): its SuperExec connects to the Runtime API on
    127.0.0.1 (``0.0.0.0`` is rewritten to ``127.0.0.1``) and verifies the
    certificate against the CA.

    Writes ``<name>.pem`` and ``<name>.key`` (mode 0600) into ``out_dir``.
    The certificate carries extendedKeyUsage serverAuth only.
    """
    if days < 1:
        raise CredentialError(f"days must be >= 1, got {days}")
    if not _NODE_NAME.match(name):
        raise CredentialError(f"invalid file name stem {name!r}")
    sans = normalize_hosts(hosts)
    issuer_cert = _load_cert(ca_cert)
    issuer_key = _load_key(ca_key)
    if not _public_numbers_equal(issuer_cert.public_key(), issuer_key.public_key()):
        raise CredentialError("the CA key does not belong to the CA certificate")
    try:
        constraints = issuer_cert.extensions.get_extension_for_class(
            x509.BasicConstraints
        ).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise CredentialError("the given CA certificate is not a CA (basicConstraints)")
    now = _dt.datetime.now(_dt.timezone.utc)
    not_after = now + _dt.timedelta(days=days)
    if issuer_cert.not_valid_after_utc <= now:
        raise CredentialError("the CA certificate has expired")
    not_after = min(not_after, issuer_cert.not_valid_after_utc)

    directory = _prepare_dir(out_dir)
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    _check_targets([cert_path, key_path], overwrite)

    key = ec.generate_private_key(_CURVE())
    first = sans[0].value
    common_name = str(first)[:64]
    try:
        issuer_ski = issuer_cert.extensions.get_extension_for_class(
            x509.SubjectKeyIdentifier
        ).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski)
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(
            issuer_key.public_key()
        )
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(issuer_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
        .add_extension(aki, critical=False)
        .sign(issuer_key, _SIGNATURE_HASH())
    )
    _write_key_and_certificate(key_path, key, cert_path, cert, overwrite)
    return cert_path, key_path


# --------------------------------------------------------------------------- nodes
def make_node_keys(
    out_dir: StrPath,
    name: str,
    *,
    overwrite: bool = False,
) -> tuple[Path, Path]:
    """Create a SuperNode authentication key pair; return ``(private, public)``.

    Writes ``<name>`` (OpenSSH private key, unencrypted, mode 0600) for
    ``flower-supernode --auth-supernode-private-key`` and ``<name>.pub``
    (``ecdsa-sha2-nistp384 ... <name>``) for ``flwr supernode register``.
    Flower loads the private key without a passphrase, so it cannot be encrypted:
    protect it with file permissions.
    """
    if not isinstance(name, str) or not _NODE_NAME.match(name):
        raise CredentialError(
            f"invalid node name {name!r}: use 1-64 characters of letters, digits, "
            "'.', '_' and '-', starting with a letter or digit"
        )
    directory = _prepare_dir(out_dir)
    private_path, public_path = directory / name, directory / f"{name}.pub"
    _check_targets([private_path, public_path], overwrite)

    key = ec.generate_private_key(_CURVE())
    private_bytes = key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.OpenSSH,
        encryption_algorithm=serialization.NoEncryption(),
    )
    public_bytes = (
        key.public_key().public_bytes(
            encoding=serialization.Encoding.OpenSSH,
            format=serialization.PublicFormat.OpenSSH,
        )
        + b" "
        + name.encode("ascii")
        + b"\n"
    )
    _write_file(private_path, private_bytes, private=True, overwrite=overwrite)
    _write_file(public_path, public_bytes, private=False, overwrite=overwrite)
    return private_path, public_path


def ssh_public_key_fingerprint(public_key_path: StrPath) -> str:
    """Return the ``SHA256:...`` fingerprint ``ssh-keygen -lf`` prints for a key.

    Lets a SuperLink operator confirm, out of band, that the ``.pub`` file they
    register is the one the node operator generated.
    """
    fields = Path(public_key_path).expanduser().read_text(encoding="ascii").split()
    if len(fields) < 2:
        raise CredentialError(f"{str(public_key_path)!r} is not an OpenSSH public key")
    blob = base64.b64decode(fields[1])
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return f"SHA256:{digest}"


# --------------------------------------------------------------------------- CLI
def _build_certs_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Create a CA (unless one is given) and a SuperLink TLS certificate.",
    )
    parser.add_argument(
        "--host",
        dest="hosts",
        action="append",
        required=True,
        metavar="HOST",
        help="DNS name or IP address SuperNodes / flwr use to reach the SuperLink "
        "(repeatable).",
    )
    parser.add_argument(
        "--out-dir", default="certificates",
        help="the SuperLink's directory: ca.pem, server.pem, server.key",
    )
    parser.add_argument(
        "--ca-dir",
        help="where a new CA's ca.pem and private ca.key go (default: OUT_DIR-ca beside it); "
        "never the SuperLink's directory: move it offline",
    )
    parser.add_argument("--ca-cert", help="existing CA certificate (PEM) to sign with")
    parser.add_argument("--ca-key", help="existing CA private key (PEM) to sign with")
    parser.add_argument("--common-name", default="fedsafe CA", help="CA common name")
    parser.add_argument("--ca-days", type=int, default=DEFAULT_CA_DAYS)
    parser.add_argument("--days", type=int, default=DEFAULT_SERVER_DAYS)
    parser.add_argument(
        "--no-loopback",
        action="store_true",
        help="do not add 127.0.0.1 and localhost to the certificate (they are needed "
        "by the SuperLink's own SuperExec in the default subprocess isolation)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace files")
    return parser


def default_ca_dir(out_dir: StrPath) -> Path:
    """Where `fedsafe certs` puts a new CA: beside the SuperLink's directory, never inside it."""
    out = Path(out_dir).expanduser()
    return out.parent / f"{out.name}-ca"


def main_certs(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """CLI: make a CA (or reuse ``--ca-cert/--ca-key``) and a server certificate.

    The CA's private key is kept out of the SuperLink's directory (``--ca-dir``): whoever can read the
    SuperLink's files must not be able to issue certificates the nodes trust. `fedsafe superlink` refuses
    a certificate directory that holds it.
    """
    parser = _build_certs_parser(prog)
    args = parser.parse_args(argv)
    if (args.ca_cert is None) != (args.ca_key is None):
        parser.error("--ca-cert and --ca-key must be given together")
    if args.ca_cert is not None and args.ca_dir is not None:
        parser.error("--ca-dir makes a new CA; it cannot be combined with --ca-cert/--ca-key")
    hosts = list(args.hosts)
    if not args.no_loopback:
        hosts += list(LOOPBACK_HOSTS)
    ca_dir = Path(args.ca_dir).expanduser() if args.ca_dir else default_ca_dir(args.out_dir)
    try:
        # Fail before creating anything: bad hosts, a CA key bound for the SuperLink's directory, files there.
        normalize_hosts(hosts)
        directory = _prepare_dir(args.out_dir)
        if args.ca_cert is None and ca_dir.resolve() == directory.resolve():
            raise CredentialError(
                f"--ca-dir {ca_dir} is the SuperLink's directory: the CA's private key must not sit "
                "beside server.key (fedsafe superlink refuses such a directory)"
            )
        if args.ca_key is not None and Path(args.ca_key).expanduser().resolve().parent == directory.resolve():
            raise CredentialError(
                f"--ca-key {args.ca_key} is in --out-dir {directory}: keep the CA's private key elsewhere"
            )
        superlink_ca = directory / CA_CERT_FILE  # the SuperLink needs the CA's certificate, not its key
        copy_ca = args.ca_cert is None or Path(args.ca_cert).expanduser().resolve() != superlink_ca.resolve()
        _check_targets(
            [superlink_ca] * copy_ca + [directory / "server.pem", directory / "server.key"],
            args.overwrite,
        )
        if args.ca_cert is None:
            ca_cert, ca_key = make_ca(ca_dir, args.common_name, args.ca_days, overwrite=args.overwrite)
            print(f"CA certificate: {ca_cert}")
            print(f"CA private key: {ca_key}  (0600; not in {directory}: move it offline)")
        else:
            ca_cert, ca_key = Path(args.ca_cert).expanduser(), Path(args.ca_key).expanduser()
        cert, key = make_server_certificate(
            args.out_dir, ca_cert, ca_key, hosts, days=args.days, overwrite=args.overwrite
        )
        if copy_ca:
            _write_file(superlink_ca, _load_cert(ca_cert).public_bytes(serialization.Encoding.PEM),
                        private=False, overwrite=args.overwrite)
    except CredentialError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"Server certificate: {cert}  (SANs: {', '.join(hosts)})")
    print(f"Server private key: {key}  (0600)")
    print(f"fedsafe superlink --certs {directory} --database <state>/superlink.db")
    return 0


def main_node_keys(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """CLI: make a SuperNode authentication key pair."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Create an ECDSA P-384 SuperNode authentication key pair."
    )
    parser.add_argument("name", help="node name; files <name> and <name>.pub")
    parser.add_argument("--out-dir", default="keys", help="output directory")
    parser.add_argument("--overwrite", action="store_true", help="replace files")
    args = parser.parse_args(argv)
    try:
        private, public = make_node_keys(args.out_dir, args.name, overwrite=args.overwrite)
        fingerprint = ssh_public_key_fingerprint(public)
    except CredentialError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"Private key: {private}  (0600; stays on the node)")
    print(f"Public key:  {public}  ({fingerprint})")
    print(f"Register it: flwr supernode register {public} <connection> --name {args.name}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fedsafe.credentials {certs,node-keys} ...``."""
    args = list(sys.argv[1:] if argv is None else argv)
    commands = {"certs": main_certs, "node-keys": main_node_keys}
    if not args or args[0] not in commands:
        print(
            "usage: python -m fedsafe.credentials {certs,node-keys} [-h] ...",
            file=sys.stderr,
        )
        return 2
    return commands[args[0]](args[1:])


if __name__ == "__main__":
    sys.exit(main())
