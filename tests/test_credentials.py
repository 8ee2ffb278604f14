"""Tests for fedsafe.credentials: certificates, TLS handshakes, Flower key loading.

The ``deploy`` test starts a real ``flower-superlink`` with the generated TLS
certificate and ``--enable-supernode-auth``, registers a node key with
``flwr supernode register`` and starts real ``flower-supernode`` processes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import os
import re
import shutil
import socket
import ssl
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from fedsafe import credentials as cr

OPENSSL = shutil.which("openssl")
SSH_KEYGEN = shutil.which("ssh-keygen")
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.fixture()
def pki(tmp_path: Path) -> dict[str, Path]:
    ca_cert, ca_key = cr.make_ca(tmp_path / "ca", days=30)
    cert, key = cr.make_server_certificate(
        tmp_path / "server",
        ca_cert,
        ca_key,
        ["127.0.0.1", "localhost", "fl.example.org", "[::1]"],
        days=10,
    )
    return {"ca_cert": ca_cert, "ca_key": ca_key, "cert": cert, "key": key}


# ------------------------------------------------------------------ certificates
def test_ca_certificate_properties(pki: dict[str, Path]) -> None:
    ca = _load_cert(pki["ca_cert"])
    assert ca.subject == ca.issuer
    assert ca.subject.rfc4514_string() == "CN=fedsafe CA"
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert ca.not_valid_after_utc - ca.not_valid_before_utc <= dt.timedelta(
        days=30, minutes=6
    )
    ca.verify_directly_issued_by(ca)  # self-signature is valid


def test_server_certificate_sans_and_eku(pki: dict[str, Path]) -> None:
    cert = _load_cert(pki["cert"])
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "fl.example.org"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert not bc.ca
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and not ku.key_cert_sign
    # the key file holds the certificate's key
    key = serialization.load_pem_private_key(pki["key"].read_bytes(), None)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()


def test_server_certificate_verifies_against_ca(pki: dict[str, Path]) -> None:
    from cryptography.x509.verification import PolicyBuilder, Store

    ca, cert = _load_cert(pki["ca_cert"]), _load_cert(pki["cert"])
    cert.verify_directly_issued_by(ca)
    store = Store([ca])
    for subject in (
        x509.DNSName("localhost"),
        x509.DNSName("fl.example.org"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ):
        chain = PolicyBuilder().store(store).build_server_verifier(subject).verify(
            cert, []
        )
        assert chain[-1] == ca
    with pytest.raises(Exception):
        PolicyBuilder().store(store).build_server_verifier(
            x509.DNSName("evil.example.org")
        ).verify(cert, [])
    other_ca, _ = cr.make_ca(pki["ca_cert"].parent / "other")
    with pytest.raises(Exception):
        PolicyBuilder().store(Store([_load_cert(other_ca)])).build_server_verifier(
            x509.DNSName("localhost")
        ).verify(cert, [])


@pytest.mark.skipif(OPENSSL is None, reason="openssl not installed")
def test_openssl_verify(pki: dict[str, Path]) -> None:
    ok = subprocess.run(
        [OPENSSL, "verify", "-x509_strict", "-purpose", "sslserver",
         "-verify_hostname", "fl.example.org",
         "-CAfile", str(pki["ca_cert"]), str(pki["cert"])],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    ip_ok = subprocess.run(
        [OPENSSL, "verify", "-verify_ip", "127.0.0.1",
         "-CAfile", str(pki["ca_cert"]), str(pki["cert"])],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert ip_ok.returncode == 0, ip_ok.stdout + ip_ok.stderr
    bad = subprocess.run(
        [OPENSSL, "verify", "-verify_hostname", "other.example.org",
         "-CAfile", str(pki["ca_cert"]), str(pki["cert"])],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert bad.returncode != 0


def test_server_validity_capped_by_ca(tmp_path: Path) -> None:
    ca_cert, ca_key = cr.make_ca(tmp_path, days=5)
    cert, _ = cr.make_server_certificate(tmp_path, ca_cert, ca_key, ["h.example"], days=400)
    assert _load_cert(cert).not_valid_after_utc <= _load_cert(ca_cert).not_valid_after_utc


def test_server_certificate_accepts_loaded_objects(tmp_path: Path) -> None:
    ca_cert, ca_key = cr.make_ca(tmp_path / "ca")
    cert_obj = _load_cert(ca_cert)
    key_obj = serialization.load_pem_private_key(ca_key.read_bytes(), None)
    cert, _ = cr.make_server_certificate(tmp_path / "s", cert_obj, key_obj, ["a.example"])
    _load_cert(cert).verify_directly_issued_by(cert_obj)


def test_mismatched_or_non_ca_issuer_rejected(tmp_path: Path, pki: dict[str, Path]) -> None:
    _, other_key = cr.make_ca(tmp_path / "other")
    with pytest.raises(cr.CredentialError, match="does not belong"):
        cr.make_server_certificate(tmp_path / "x", pki["ca_cert"], other_key, ["a.b"])
    with pytest.raises(cr.CredentialError, match="not a CA"):
        cr.make_server_certificate(tmp_path / "y", pki["cert"], pki["key"], ["a.b"])
    with pytest.raises(cr.CredentialError, match="not a PEM certificate"):
        cr.make_server_certificate(tmp_path / "z", pki["key"], pki["key"], ["a.b"])
    assert not (tmp_path / "x" / "server.pem").exists()


# ------------------------------------------------------------------ hosts
@pytest.mark.parametrize(
    "host",
    [
        "",
        "   ",
        "fl.example.org:8000",
        "127.0.0.1:9092",
        "https://fl.example.org",
        "under_score.example",
        "-lead.example",
        "trail-.example",
        "a..b",
        "x" * 64 + ".example",
        "10.0.0.256",
        "0.0.0.0",
        "::",
        "fe80::1%eth0",
        "[fl.example.org]",
        "1:2:3:4:5:6:7:8:9",
        "h\u00f6spital.example",
        "*.example",
    ],
)
def test_bad_hosts_rejected_with_host_in_message(tmp_path: Path, host: str) -> None:
    ca_cert, ca_key = cr.make_ca(tmp_path)
    with pytest.raises(cr.InvalidHostError) as info:
        cr.make_server_certificate(tmp_path, ca_cert, ca_key, ["ok.example", host])
    assert isinstance(info.value, ValueError)
    if host.strip():
        assert repr(host) in str(info.value)
    assert not (tmp_path / "server.pem").exists()
    assert not (tmp_path / "server.key").exists()


def test_hosts_normalised() -> None:
    names = cr.normalize_hosts(
        ["Fl.Example.ORG.", "fl.example.org", "[::1]", "10.0.0.1", "*.nodes.example"]
    )
    assert names == [
        x509.DNSName("fl.example.org"),
        x509.IPAddress(ipaddress.ip_address("::1")),
        x509.IPAddress(ipaddress.ip_address("10.0.0.1")),
        x509.DNSName("*.nodes.example"),
    ]
    with pytest.raises(cr.InvalidHostError):
        cr.normalize_hosts([])
    with pytest.raises(cr.InvalidHostError):
        cr.normalize_hosts("fl.example.org")  # type: ignore[arg-type]


# ------------------------------------------------------------------ TLS handshake
def _handshake(pki: dict[str, Path], client_ca: Path, server_hostname: str) -> bytes:
    """Serve one TLS connection on 127.0.0.1 and connect to it; return the payload."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(pki["cert"], pki["key"])
    client_ctx = ssl.create_default_context(cafile=str(client_ca))  # trusts only it
    client_ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    assert client_ctx.check_hostname and client_ctx.verify_mode == ssl.CERT_REQUIRED

    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    port = listener.getsockname()[1]
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            conn.settimeout(10)
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"hello")
        except (OSError, ssl.SSLError) as err:
            errors.append(err)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            with client_ctx.wrap_socket(sock, server_hostname=server_hostname) as tls:
                return tls.recv(5)
    finally:
        thread.join(timeout=10)
        listener.close()


@pytest.mark.parametrize("server_hostname", ["127.0.0.1", "localhost", "fl.example.org"])
def test_tls_handshake_succeeds_with_ca(pki: dict[str, Path], server_hostname: str) -> None:
    assert _handshake(pki, pki["ca_cert"], server_hostname) == b"hello"


def test_tls_handshake_fails_with_other_ca(pki: dict[str, Path], tmp_path: Path) -> None:
    other_ca, _ = cr.make_ca(tmp_path / "other", common_name="fedsafe CA")  # same name!
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(pki, other_ca, "127.0.0.1")


def test_tls_handshake_fails_for_host_not_in_certificate(pki: dict[str, Path]) -> None:
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch|match"):
        _handshake(pki, pki["ca_cert"], "evil.example.org")


# ------------------------------------------------------------------ node keys
def test_node_keys_load_with_flower_loaders(tmp_path: Path) -> None:
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import (
        bytes_to_public_key,
        sign_message,
        uses_nist_ec_curve,
        verify_signature,
    )
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    private_path, public_path = cr.make_node_keys(tmp_path, "hospital-a")
    assert private_path.name == "hospital-a" and public_path.name == "hospital-a.pub"
    assert private_path.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    assert public_path.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert public_path.read_text().rstrip().endswith(" hospital-a")

    # What `flwr supernode register hospital-a.pub` does with the file.
    registered_pem = try_load_public_key(public_path)
    registered = bytes_to_public_key(registered_pem)
    assert uses_nist_ec_curve(registered)
    assert isinstance(registered.curve, ec.SECP384R1)

    # What `flower-supernode --auth-supernode-private-key hospital-a` does.
    args = argparse.Namespace(
        auth_supernode_private_key=str(private_path), auth_supernode_public_key=None
    )
    loaded = _try_setup_client_authentication(args)
    assert loaded is not None
    private_key, public_key = loaded
    assert public_key.public_numbers() == registered.public_numbers()
    signature = sign_message(private_key, b"fedsafe")
    assert verify_signature(registered, b"fedsafe", signature)


class _FlowerExit(Exception):
    pass


def _raise_flower_exit(code: int, message: str | None = None, **_: object) -> None:
    raise _FlowerExit(code, message)


def test_flower_loaders_reject_other_formats(
    tmp_path: Path, pki: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sanity check of the loaders used above: they are strict about formats.

    ``flwr_exit`` is patched: the real one starts a thread that calls ``os._exit``
    a few seconds later, which would kill the test session.
    """
    import importlib

    from cryptography.hazmat.primitives.asymmetric import ed25519

    # (the package re-exports a *function* named `register`: go through importlib)
    register = importlib.import_module("flwr.cli.supernode.register")
    supernode_cli = importlib.import_module("flwr.supernode.cli.flower_supernode")
    monkeypatch.setattr(register, "flwr_exit", _raise_flower_exit)
    monkeypatch.setattr(supernode_cli, "flwr_exit", _raise_flower_exit)

    # A PEM (PKCS#8) EC key, as used for TLS, is not accepted as a node key.
    args = argparse.Namespace(
        auth_supernode_private_key=str(pki["key"]), auth_supernode_public_key=None
    )
    with pytest.raises(_FlowerExit):
        supernode_cli._try_setup_client_authentication(args)

    # An OpenSSH Ed25519 public key is not accepted by `flwr supernode register`.
    ed_pub = tmp_path / "ed.pub"
    ed_pub.write_bytes(
        ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
    )
    with pytest.raises(_FlowerExit):
        register.try_load_public_key(ed_pub)


@pytest.mark.skipif(SSH_KEYGEN is None, reason="ssh-keygen not installed")
def test_node_keys_match_ssh_keygen(tmp_path: Path) -> None:
    private_path, public_path = cr.make_node_keys(tmp_path, "n1")
    derived = subprocess.run(
        [SSH_KEYGEN, "-y", "-f", str(private_path)],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout.split()[:2]
    assert derived == public_path.read_text().split()[:2]
    listed = subprocess.run(
        [SSH_KEYGEN, "-l", "-f", str(public_path)],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout.split()
    assert listed[0] == "384"
    assert listed[1] == cr.ssh_public_key_fingerprint(public_path)


@pytest.mark.parametrize("name", ["", "../evil", "a/b", ".hidden", "x" * 65, "sp ace"])
def test_bad_node_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(cr.CredentialError, match="invalid node name"):
        cr.make_node_keys(tmp_path, name)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ files
def test_private_keys_are_0600_even_with_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        ca_cert, ca_key = cr.make_ca(tmp_path)
        cert, key = cr.make_server_certificate(tmp_path, ca_cert, ca_key, ["a.example"])
        node_private, node_public = cr.make_node_keys(tmp_path, "n1")
    finally:
        os.umask(old)
    for private in (ca_key, key, node_private):
        assert _mode(private) == 0o600, private
    for public in (ca_cert, cert, node_public):
        assert _mode(public) == 0o644, public


def test_private_keys_are_0600_after_overwrite(tmp_path: Path) -> None:
    cr.make_node_keys(tmp_path, "n1")
    private, _ = cr.make_node_keys(tmp_path, "n1", overwrite=True)
    assert _mode(private) == 0o600
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    ca_cert, ca_key = cr.make_ca(tmp_path)
    before = ca_key.read_bytes(), ca_cert.read_bytes()
    with pytest.raises(cr.CredentialExistsError) as info:
        cr.make_ca(tmp_path)
    assert isinstance(info.value, FileExistsError)
    assert str(tmp_path / "ca.pem") in str(info.value) or str(tmp_path / "ca.key") in str(
        info.value
    )
    assert "overwrite" in str(info.value)
    assert (ca_key.read_bytes(), ca_cert.read_bytes()) == before

    cr.make_server_certificate(tmp_path, ca_cert, ca_key, ["a.example"])
    with pytest.raises(cr.CredentialExistsError, match="server"):
        cr.make_server_certificate(tmp_path, ca_cert, ca_key, ["a.example"])

    new_cert, new_key = cr.make_ca(tmp_path, overwrite=True)
    assert (new_key.read_bytes(), new_cert.read_bytes()) != before


def test_refusal_leaves_no_partial_output(tmp_path: Path) -> None:
    (tmp_path / "n1.pub").write_text("someone else's key\n")
    with pytest.raises(cr.CredentialExistsError, match=re.escape(str(tmp_path / "n1.pub"))):
        cr.make_node_keys(tmp_path, "n1")
    assert not (tmp_path / "n1").exists()
    assert (tmp_path / "n1.pub").read_text() == "someone else's key\n"


def test_refuses_symlink_target(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "n1").symlink_to(victim)
    with pytest.raises(cr.CredentialExistsError):
        cr.make_node_keys(tmp_path / "keys", "n1")
    assert victim.read_text() == "precious"


def test_output_dir_is_a_file(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(cr.OutputDirectoryError, match="not a directory"):
        cr.make_ca(blocker)
    with pytest.raises(cr.OutputDirectoryError, match="cannot create output directory"):
        cr.make_node_keys(blocker / "sub", "n1")


@pytest.mark.skipif(IS_ROOT, reason="root ignores directory permissions")
def test_unwritable_output_dir(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(cr.OutputDirectoryError, match="not writable"):
            cr.make_node_keys(locked, "n1")
    finally:
        locked.chmod(0o700)


def test_unwritable_output_dir_even_as_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Root bypasses mode bits, so simulate both failure points."""
    monkeypatch.setattr(cr.os, "access", lambda *_a, **_k: False)
    with pytest.raises(cr.OutputDirectoryError, match="not writable"):
        cr.make_ca(tmp_path / "a")
    monkeypatch.undo()

    def denied(*_a: object, **_k: object) -> int:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(cr.os, "open", denied)
    with pytest.raises(cr.OutputDirectoryError, match=r"cannot write .*n1"):
        cr.make_node_keys(tmp_path / "b", "n1")


def test_output_dir_is_created(tmp_path: Path) -> None:
    cert, key = cr.make_ca(tmp_path / "a" / "b")
    assert cert.parent == key.parent == tmp_path / "a" / "b"


# ------------------------------------------------------------------ CLI functions
def test_main_certs_and_node_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "certs"
    assert cr.main_certs(["--host", "fl.example.org", "--out-dir", str(out)]) == 0
    san = _load_cert(out / "server.pem").extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value
    assert san.get_values_for_type(x509.DNSName) == ["fl.example.org", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    # The SuperLink's directory gets the CA's certificate, never its private key (that goes beside it).
    assert sorted(p.name for p in out.iterdir()) == ["ca.pem", "server.key", "server.pem"]
    ca_dir = tmp_path / "certs-ca"
    assert (out / "ca.pem").read_bytes() == (ca_dir / "ca.pem").read_bytes()
    assert "CA private key: " + str(ca_dir / "ca.key") in capsys.readouterr().out
    ca_before = (ca_dir / "ca.key").read_bytes()

    # second run: refused before anything (in particular the CA) is replaced
    assert cr.main_certs(["--host", "fl.example.org", "--out-dir", str(out)]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (ca_dir / "ca.key").read_bytes() == ca_before

    # reuse the CA for a second server, without loopback SANs
    assert cr.main_certs([
        "--host", "10.0.0.5", "--no-loopback", "--out-dir", str(tmp_path / "s2"),
        "--ca-cert", str(ca_dir / "ca.pem"), "--ca-key", str(ca_dir / "ca.key"),
    ]) == 0
    s2 = _load_cert(tmp_path / "s2" / "server.pem")
    s2.verify_directly_issued_by(_load_cert(ca_dir / "ca.pem"))
    assert sorted(p.name for p in (tmp_path / "s2").iterdir()) == ["ca.pem", "server.key", "server.pem"]

    # The CA's key is never written into, or taken from, the SuperLink's directory.
    assert cr.main_certs(["--host", "a.example", "--out-dir", str(tmp_path / "s3"),
                          "--ca-dir", str(tmp_path / "s3")]) == 1
    assert "must not sit beside server.key" in capsys.readouterr().err
    assert not (tmp_path / "s3" / "ca.key").exists()
    (tmp_path / "s4").mkdir()
    (tmp_path / "s4" / "ca.key").write_bytes(ca_before)
    assert cr.main_certs(["--host", "a.example", "--out-dir", str(tmp_path / "s4"), "--ca-cert",
                          str(ca_dir / "ca.pem"), "--ca-key", str(tmp_path / "s4" / "ca.key")]) == 1
    assert "keep the CA's private key elsewhere" in capsys.readouterr().err

    assert cr.main_certs(["--host", "bad host", "--out-dir", str(tmp_path / "b")]) == 1
    assert "'bad host'" in capsys.readouterr().err
    assert not (tmp_path / "b" / "ca.pem").exists()

    assert cr.main_node_keys(["n1", "--out-dir", str(tmp_path / "keys")]) == 0
    printed = capsys.readouterr().out
    assert "flwr supernode register" in printed and "SHA256:" in printed
    assert cr.main_node_keys(["n1", "--out-dir", str(tmp_path / "keys")]) == 1
    assert cr.main(["node-keys", "n2", "--out-dir", str(tmp_path / "keys")]) == 0
    assert cr.main([]) == 2


# ------------------------------------------------------------------ real Flower
# Process helpers shared with tests/test_deployment.py.
from tests.deploy_harness import BIN, FLOWER_BINARIES  # noqa: E402
from tests.deploy_harness import free_port as _free_port  # noqa: E402
from tests.deploy_harness import stop as _stop  # noqa: E402
from tests.deploy_harness import wait_for_text as _wait_for_text  # noqa: E402
from tests.deploy_harness import wait_for_tls as _wait_for_tls  # noqa: E402


PROBE_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "probe"
version = "1.0.0"
description = "fedsafe deployment probe"
license = "Apache-2.0"
dependencies = ["flwr==1.41.0"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fedsafe"

[tool.flwr.app.components]
serverapp = "probe_server:app"
clientapp = "probe_client:app"

[tool.flwr.app.config]
out = "{out}"
"""

PROBE_SERVER = """\
import json
import time
from pathlib import Path

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    deadline = time.monotonic() + 60
    nodes = []
    while not nodes and time.monotonic() < deadline:
        nodes = list(grid.get_node_ids())
        time.sleep(0.5)
    messages = [
        Message(RecordDict({"q": MetricRecord({"x": 1})}), dst_node_id=n,
                message_type="query")
        for n in nodes
    ]
    replies = list(grid.send_and_receive(messages, timeout=120))
    out = {
        str(r.metadata.src_node_id):
            dict(r.content["node"]) if r.has_content() else str(r.error)
        for r in replies
    }
    Path(str(context.run_config["out"])).write_text(json.dumps(out))
"""

PROBE_CLIENT = """\
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    cfg = dict(context.node_config.items())
    cfg.update({f"type:{k}": type(v).__name__ for k, v in context.node_config.items()})
    return Message(RecordDict({"node": ConfigRecord(cfg)}), reply_to=msg)
"""


@pytest.mark.deploy
@pytest.mark.skipif(
    not all((BIN / b).exists() for b in FLOWER_BINARIES) or os.name != "posix",
    reason="Flower binaries not next to this interpreter",
)
def test_superlink_tls_node_auth_end_to_end(tmp_path: Path) -> None:
    ca_cert, ca_key = cr.make_ca(tmp_path / "certs")
    cert, key = cr.make_server_certificate(
        tmp_path / "certs", ca_cert, ca_key, ["127.0.0.1", "localhost"]
    )
    good_private, good_public = cr.make_node_keys(tmp_path / "keys", "good")
    bad_private, _ = cr.make_node_keys(tmp_path / "keys", "unregistered")
    other_ca, _ = cr.make_ca(tmp_path / "other-ca")

    flwr_home = tmp_path / "flwr-home"
    flwr_home.mkdir()
    port = _free_port()
    (flwr_home / "config.toml").write_text(
        '[superlink]\ndefault = "fedsafe-test"\n\n'
        "[superlink.fedsafe-test]\n"
        f'address = "127.0.0.1:{port}"\n'
        f'root-certificates = "{ca_cert}"\n'
    )
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",  # as fedsafe superlink/node set it
    }
    procs: list[subprocess.Popen[bytes]] = []

    def start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
        with log.open("wb") as handle:
            proc = subprocess.Popen(
                args, stdout=handle, stderr=subprocess.STDOUT, env=env,
                cwd=tmp_path, start_new_session=True,
            )
        procs.append(proc)
        return proc

    def supernode(private_key: Path, root: Path, log: Path, extra: list[str]) -> subprocess.Popen[bytes]:
        return start(
            [str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{port}",
             "--root-certificates", str(root),
             "--auth-supernode-private-key", str(private_key),
             "--port", str(_free_port()), *extra],
            log,
        )

    def flwr(*args: str) -> dict:
        done = subprocess.run(
            [str(BIN / "flwr"), *args, "--format", "json"],
            capture_output=True, text=True, env=env, timeout=60, check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return json.loads(done.stdout)

    t0 = time.monotonic()
    try:
        superlink = start(
            [str(BIN / "flower-superlink"),
             "--ssl-ca-certfile", str(ca_cert), "--ssl-certfile", str(cert),
             "--ssl-keyfile", str(key), "--enable-supernode-auth",
             "--database", str(tmp_path / "superlink.db"),
             "--host", "127.0.0.1", "--port", str(port)],
            tmp_path / "superlink.log",
        )
        _wait_for_tls(port, ca_cert, superlink, time.monotonic() + 40)

        reply = flwr("supernode", "register", str(good_public), "fedsafe-test", "--name", "good")
        assert reply["success"], reply
        node_id = str(reply["node-id"])
        # `flwr ... --format json` exits 0 even on failure: check the payload.
        again = flwr("supernode", "register", str(good_public), "fedsafe-test", "--name", "g2")
        assert not again["success"] and "already in use" in again["error-message"]

        # Three SuperNodes at once (each takes seconds to start): a registered one; one whose key is
        # not registered; one that does not trust our CA.
        good = supernode(
            good_private, ca_cert, tmp_path / "good.log",
            ["--node-config",
             'data-path="/tmp/fedsafe-data" state-dir="/tmp/fedsafe-state" '
             'max-epsilon=3 delta=1e-5 device="cpu"'],
        )
        bad = supernode(bad_private, ca_cert, tmp_path / "bad.log", [])
        wrong = supernode(good_private, other_ca, tmp_path / "wrong-ca.log", ["--max-retries", "0"])
        match = _wait_for_text(
            tmp_path / "good.log", r"SuperNode ID: (\d+)", good, time.monotonic() + 40
        )
        assert match.group(1) == node_id
        nodes = flwr("supernode", "list", "fedsafe-test")["nodes"]
        assert [(n["node-id"], n["status"]) for n in nodes] == [(node_id, "online")]

        # Unregistered key: refused by the SuperLink (Flower exit code 305, OS status 1).
        bad.wait(timeout=60)
        bad_log = (tmp_path / "bad.log").read_text(errors="replace")
        assert bad.returncode == 1, bad_log
        assert "Exit Code: 305" in bad_log and "Failed to activate SuperNode" in bad_log

        # SuperNode that does not trust our CA: TLS verification fails.
        wrong.wait(timeout=60)
        wrong_log = (tmp_path / "wrong-ca.log").read_text(errors="replace")
        assert wrong.returncode == 1, wrong_log
        assert "CERTIFICATE_VERIFY_FAILED" in wrong_log

        assert good.poll() is None, "registered SuperNode should still be connected"
        assert superlink.poll() is None

        # `flwr run <app> <connection>` over TLS: the ServerApp (started by the
        # SuperLink's SuperExec, which connects to 127.0.0.1) queries the node,
        # whose ClientApp echoes its --node-config.
        app_dir = tmp_path / "probe"
        app_dir.mkdir()
        out = tmp_path / "probe-out.json"
        (app_dir / "pyproject.toml").write_text(PROBE_PYPROJECT.format(out=out))
        (app_dir / "probe_server.py").write_text(PROBE_SERVER)
        (app_dir / "probe_client.py").write_text(PROBE_CLIENT)
        run = subprocess.run(
            [str(BIN / "flwr"), "run", str(app_dir), "fedsafe-test", "--stream"],
            capture_output=True, text=True, env=env, timeout=150, check=False,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        assert out.exists(), run.stdout + run.stderr
        node_config = json.loads(out.read_text())[node_id]
        assert node_config == {
            "data-path": "/tmp/fedsafe-data", "type:data-path": "str",
            "state-dir": "/tmp/fedsafe-state", "type:state-dir": "str",
            "max-epsilon": 3, "type:max-epsilon": "int",  # int, not float!
            "delta": 1e-5, "type:delta": "float",
            "device": "cpu", "type:device": "str",
        }
    finally:
        _stop(procs)
    assert time.monotonic() - t0 < 150
