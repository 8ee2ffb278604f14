"""`fedsafe node` / `fedsafe superlink` before Flower starts (checks, flags), the node's replay cache and
test-only options, and the warm-start zygote — fast, without a SuperLink."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fedsafe import credentials as cr
from fedsafe.cli import main
from fedsafe.deploy import NodeOptions, SuperLinkOptions, explain_refusal, node_command, superlink_command

APP = "ab" * 32  # an app package's SHA-256, as `fedsafe app-hash` prints it


@pytest.fixture()
def site(tmp_path: Path) -> dict[str, Path]:
    ca, ca_key = cr.make_ca(tmp_path / "ca")
    cr.make_server_certificate(tmp_path / "certs", ca, ca_key, ["127.0.0.1", "localhost"])
    (tmp_path / "certs" / "ca.pem").write_bytes(ca.read_bytes())
    private, public = cr.make_node_keys(tmp_path / "keys", "clinic")
    data = tmp_path / "data.npz"
    np.savez(data, x=np.random.default_rng(0).normal(size=(40, 30)).astype(np.float32), y=np.arange(40) % 2)
    (tmp_path / "not-pem").write_text("hello")
    return {"root": tmp_path, "ca": ca, "key": private, "pub": public, "data": data, "certs": tmp_path / "certs"}


def _node_args(site, **overrides) -> list[str]:
    args = {"--superlink": "127.0.0.1:8000", "--root-cert": str(site["ca"]), "--key": str(site["key"]),
            "--data-path": str(site["data"]), "--state-dir": str(site["root"] / "ledgers"), "--max-epsilon": "3",
            "--allow-app": APP}
    args.update(overrides)
    return ["node", *[x for k, v in args.items() if v is not None for x in (k, v)]]


@pytest.mark.parametrize("overrides, message", [
    ({"--root-cert": "/no/ca.pem"}, "root certificate /no/ca.pem does not exist"),
    ({"--root-cert": "NOT_PEM"}, "is not a PEM certificate"),
    ({"--root-cert": None}, "--root-cert CA.pem is required"),
    ({"--key": "/no/key"}, "node key /no/key does not exist"),
    ({"--key": "PUB"}, "that is the public key; give the private one"),
    ({"--data-path": "/no/data.npz"}, "--data-path: data file not found: /no/data.npz"),
    ({"--superlink": "https://fl.example.org:8000"}, "give HOST:PORT"),
    ({"--device": "tpu"}, "device must be auto, cpu, cuda or cuda:N"),
    ({"--device": "cuda:99"}, "--device: device 'cuda:99' asked for, but this machine has"),
    ({"--max-epsilon": "0"}, "max-epsilon must be > 0"),
    ({"--test-poison": "sql"}, "debug-poison takes a comma list of nan, shape, norm"),
])
def test_node_refuses_to_start_on_what_operators_get_wrong(site, overrides, message, capsys):
    overrides = {k: {"NOT_PEM": str(site["root"] / "not-pem"), "PUB": str(site["pub"])}.get(v, v)
                 for k, v in overrides.items()}
    assert main(_node_args(site, **overrides)) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_node_refuses_a_corrupt_ledger(site, capsys):
    from fedsafe.client.data import load_file, records_digest
    from fedsafe.client.ledger import ledger_filename

    ledgers = site["root"] / "ledgers"
    ledgers.mkdir()
    (ledgers / ledger_filename("records:" + records_digest(load_file(site["data"])))).write_text("{torn")
    assert main(_node_args(site)) == 2
    assert "refusing to train rather than forget past spend" in capsys.readouterr().err


def test_node_command_quotes_node_config_as_flower_parses_it(site):
    from flwr.common.config import parse_config_args

    command = node_command(NodeOptions(
        superlink="127.0.0.1:8000", root_cert=site["ca"], key=site["key"], data_path=site["data"],
        state_dir=site["root"] / "my ledgers", max_epsilon=3, delta=1e-5, device="cuda:1", port=9095,
        seed_noise=True, debug_poison="nan,norm", allowed_apps=(APP.upper(),)))
    superlink = command.index("--superlink")
    assert command[superlink + 1] == "127.0.0.1:8000"
    assert command[1:superlink] == ["-m", "fedsafe.supernode", "--fedsafe-allow-app", APP,
                                    "--fedsafe-poll-interval", "0.5"]
    assert "--root-certificates" in command and "--auth-supernode-private-key" in command
    assert "--insecure" not in command
    config = parse_config_args([command[command.index("--node-config") + 1]])
    assert config == {"data-path": str(site["data"].resolve()), "state-dir": str((site["root"] / "my ledgers").resolve()),
                      "max-epsilon": 3.0, "delta": 1e-5, "device": "cuda:1", "seed-noise": True,
                      "debug-poison": "nan,norm"}
    assert command[command.index("--port") + 1] == "9095"


def test_superlink_command_has_tls_and_node_auth_unless_insecure(site, tmp_path):
    command = superlink_command(SuperLinkOptions(certs=site["certs"], database=tmp_path / "s.db", port=9000))
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--enable-supernode-auth",
                 "--disable-runtime-dependency-installation"):
        assert flag in command
    insecure = superlink_command(SuperLinkOptions(certs=None, database=tmp_path / "s.db", insecure=True))
    assert "--insecure" in insecure and "--enable-supernode-auth" not in insecure


def test_superlink_refuses_bad_certificates(site, tmp_path, capsys):
    db = str(tmp_path / "state" / "s.db")
    assert main(["superlink", "--certs", str(tmp_path / "nowhere"), "--database", db]) == 2
    assert "fedsafe certs --host" in capsys.readouterr().err
    assert main(["superlink", "--database", db]) == 2
    assert "--certs DIR is required" in capsys.readouterr().err

    no_loopback = tmp_path / "no-loopback"
    ca, ca_key = cr.make_ca(no_loopback)
    cr.make_server_certificate(no_loopback, ca, ca_key, ["fl.example.org"])
    ca_key.rename(tmp_path / "offline-ca.key")
    assert main(["superlink", "--certs", str(no_loopback), "--database", db]) == 2
    assert "no subjectAltName 127.0.0.1" in capsys.readouterr().err

    other = tmp_path / "other"
    _, other_key = cr.make_ca(other)
    other_key.unlink()
    (other / "server.pem").write_bytes((site["certs"] / "server.pem").read_bytes())
    (other / "server.key").write_bytes((site["certs"] / "server.key").read_bytes())
    assert main(["superlink", "--certs", str(other), "--database", db]) == 2
    assert "was not signed by the CA" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["ca.key", "backup.pem"])
def test_superlink_refuses_a_certificate_directory_holding_the_ca_key(site, tmp_path, capsys, name):
    """`fedsafe certs` keeps the CA's key out of the SuperLink's directory; one copied there by hand, under
    any name, stops the SuperLink before Flower starts."""
    db = str(tmp_path / "state" / "s.db")
    assert main(["certs", "--host", "fl.example.org", "--out-dir", str(tmp_path / "fresh")]) == 0
    capsys.readouterr()
    superlink_command(SuperLinkOptions(certs=tmp_path / "fresh", database=tmp_path / "s.db"))  # accepted
    (tmp_path / "fresh" / name).write_bytes((tmp_path / "fresh-ca" / "ca.key").read_bytes())
    assert main(["superlink", "--certs", str(tmp_path / "fresh"), "--database", db]) == 2
    err = capsys.readouterr().err
    assert f"holds the CA's private key ({name})" in err and "Move it offline" in err and err.count("\n") == 1
    assert not (tmp_path / "state").exists()  # refused before anything was created


def test_credentials_subcommands_are_fedsafe_subcommands(tmp_path, capsys):
    assert main(["certs", "--host", "fl.example.org", "--out-dir", str(tmp_path / "c")]) == 0
    assert (tmp_path / "c" / "server.pem").exists()
    assert main(["node-keys", "clinic", "--out-dir", str(tmp_path / "k")]) == 0
    assert "flwr supernode register" in capsys.readouterr().out


def test_refusals_are_explained(site):
    flower_305 = "ERROR: Exit Code: 305\nFailed to initialize the connection\n[code: 2004] Failed to activate SuperNode."
    status, text = explain_refusal(flower_305, site["key"])
    assert status == 3 and "not registered" in text and str(site["pub"]) in text and "SHA256:" in text
    # Not waited for: the other cause Flower gives the same answer for is named too.
    assert "crashed less than a minute ago" in text
    status, text = explain_refusal(flower_305, site["key"], waited=66)
    assert "for 66 s" in text and "another SuperNode with this key is running" in text
    assert explain_refusal("ssl: CERTIFICATE_VERIFY_FAILED", site["key"])[0] == 4
    unreachable = "Exit Code: 305\nFailed to initialize the connection to the SuperLink.\nConnectError: refused"
    status, text = explain_refusal(unreachable, site["key"])
    assert status == 5 and "no SuperLink answered" in text
    assert explain_refusal("SuperNode terminated gracefully.", site["key"]) is None


# ------------------------------------------------------------------------- the node's ClientApp
def test_policy_test_only_options_parse():
    from fedsafe.client.policy import NodePolicy

    policy = NodePolicy.from_node_config({"seed-noise": True, "debug-poison": "nan, shape"})
    assert policy.seed_noise and policy.debug_poison == ("nan", "shape")
    assert NodePolicy.from_node_config({}).debug_poison == () and not NodePolicy.from_node_config({}).seed_noise


@pytest.mark.parametrize("kind, reason", [("nan", "NaN"), ("shape", "shape"), ("norm", "exceeds the bound")])
def test_every_poison_is_rejected_by_update_validation(kind, reason):
    import torch
    from flwr.app import ArrayRecord

    from fedsafe.client.app import poison_update
    from fedsafe.strategies import UpdateRejected, validate_update

    state = {"w": torch.zeros(3, 2), "b": torch.zeros(3)}
    with pytest.raises(UpdateRejected, match=reason):
        validate_update(ArrayRecord(state), ArrayRecord(poison_update(state, kind)), max_update_norm=1000.0)


def test_a_re_sent_round_is_answered_from_the_replay_cache_without_new_spend(tmp_path, flower_task_identity):
    from fedsafe.client.app import train_round
    from fedsafe.client.ledger import PrivacyLedger
    from fedsafe.client.policy import NodePolicy
    from fedsafe.server.config import RunConfig
    from tests.node_harness import node_context, train_message

    cfg = RunConfig(num_rounds=2, local_epochs=1)
    policy = NodePolicy(state_dir=str(tmp_path), max_epsilon=3.0)
    message = train_message(cfg, 1)
    first = train_round(message, node_context(), policy)
    again = train_round(train_message(cfg, 1), node_context(), policy)  # the coordinator re-sends round 1
    assert not first.has_error() and not again.has_error()
    for key in first.content["arrays"].keys():
        assert np.array_equal(first.content["arrays"][key].numpy(), again.content["arrays"][key].numpy())
    ledger_path = next(tmp_path.glob("*.json"))
    ledger = PrivacyLedger.open(tmp_path, __import__("json").loads(ledger_path.read_text())["data_key"])
    assert len(ledger.rounds_of("run-a")) == 1  # one round trained, one charged

    # Another global model for the same round is a new request: trained, and charged, again.
    other = train_message(cfg, 1, arrays=first.content["arrays"])
    assert not train_round(other, node_context(), policy).has_error()
    ledger = PrivacyLedger.open(tmp_path, ledger.data_key)
    assert len(ledger.rounds_of("run-a")) == 2


def test_replay_cache_ignores_torn_or_mismatched_files(tmp_path):
    from fedsafe.client.replay import ReplayCache

    cache = ReplayCache(tmp_path, "clinic")
    arrays = {"w": np.ones((2, 2), dtype=np.float32)}
    cache.store("run", 3, "digest", arrays, {"num-examples": 5})
    got, metrics = cache.lookup("run", 3, "digest")
    assert np.array_equal(got["w"], arrays["w"]) and metrics == {"num-examples": 5.0}
    assert cache.lookup("run", 3, "other") is None and cache.lookup("run", 4, "digest") is None
    cache.arrays_path.write_bytes(b"torn")
    assert cache.lookup("run", 3, "digest") is None


def test_replay_entries_written_in_place_are_used_only_when_whole_and_matching(tmp_path):
    """The cache is overwritten in place, unsynced: whatever a crash leaves — a meta cut short, a longer old
    meta's tail after a shorter new one, a meta edited to name this request, arrays of another reply — is
    ignored (the round is trained and charged again), never answered from."""
    import json

    from fedsafe.client.replay import ReplayCache

    cache = ReplayCache(tmp_path, "clinic")
    first, second = {"w": np.ones((40, 40), np.float32)}, {"w": np.full((2, 2), 7, np.float32)}
    cache.store("run", 3, "first-request", first, {"num-examples": 5, "epsilon": 1.25})
    longer_meta, first_arrays = cache.meta_path.read_bytes(), cache.arrays_path.read_bytes()
    cache.store("run", 4, "second", second, {"num-examples": 5})
    assert np.array_equal(cache.lookup("run", 4, "second")[0]["w"], second["w"])
    assert cache.lookup("run", 3, "first-request") is None  # one entry per dataset: the latest reply
    assert len(cache.arrays_path.read_bytes()) < len(first_arrays)  # shortened in place: no stale tail

    whole = cache.meta_path.read_bytes()
    assert len(longer_meta) > len(whole)
    cache.meta_path.write_bytes(whole[: len(whole) // 2])  # cut short
    assert cache.lookup("run", 4, "second") is None
    cache.meta_path.write_bytes(whole + longer_meta[len(whole):])  # a shorter meta over a longer one, not cut
    assert cache.lookup("run", 4, "second") is None
    meta = json.loads(whole)
    meta["request"] = "first-request"  # names another request, its own digest not redone
    cache.meta_path.write_bytes(json.dumps(meta).encode())
    assert cache.lookup("run", 4, "first-request") is None
    cache.meta_path.write_bytes(whole)
    cache.arrays_path.write_bytes(first_arrays)  # the meta's arrays replaced by another reply's
    assert cache.lookup("run", 4, "second") is None


# ------------------------------------------------------------------------- warm start
PROBE = """
import os, sys
import numpy as np
import torch

def main():
    print("probe", sys.argv[1:], os.getcwd(), os.environ.get("PROBE_VAR"), torch.rand(1).item(),
          np.random.rand(), flush=True)
    print("to stderr", file=sys.stderr, flush=True)
    print("zygote's fedsafe still loaded:", "fedsafe" in sys.modules, file=sys.stderr, flush=True)
    sys.exit(7)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork + SCM_RIGHTS on Linux")
def test_warm_start_forks_with_the_callers_args_streams_and_fresh_randomness(tmp_path, monkeypatch):
    from fedsafe import warmstart

    (tmp_path / "warm_probe.py").write_text(PROBE)
    monkeypatch.setitem(warmstart.ENTRY_POINTS, "probe", ("warm_probe", "main"))
    warm = warmstart.WarmStart("probe", "/bin/echo")
    zygote_code = (
        "import sys, fedsafe.warmstart as w; w.ENTRY_POINTS['probe'] = ('warm_probe', 'main'); "
        f"w.PRELOAD['probe'] = ('numpy', 'torch'); w.serve('probe', {str(warm.socket)!r})"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(Path(__file__).resolve().parents[1])])}
    zygote = subprocess.Popen([sys.executable, "-c", zygote_code], env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.socket(socket.AF_UNIX) as probe_socket:
                    probe_socket.connect(str(warm.socket))
                break
            except OSError:
                assert zygote.poll() is None and time.monotonic() < deadline, "zygote did not start"
                time.sleep(0.2)
        (tmp_path / "cwd").mkdir()
        runs = [subprocess.run([str(warm.shim), "--token", "x"], capture_output=True, text=True, timeout=30,
                               cwd=tmp_path / "cwd", env={**os.environ, "PROBE_VAR": f"v{i}"}) for i in range(2)]
    finally:
        zygote.terminate()
        zygote.wait(timeout=10)
    for i, run in enumerate(runs):
        assert run.returncode == 7, run.stderr
        words = run.stdout.split()
        assert words[0] == "probe" and "'--token', 'x'" in run.stdout and str(tmp_path / "cwd") in run.stdout
        assert f"v{i}" in words and "to stderr" in run.stderr
        # The app package's own fedsafe is what a child imports, not the zygote's installed copy.
        assert "zygote's fedsafe still loaded: False" in run.stderr
    # Forks of one process, yet each draws fresh random numbers (DP noise must never repeat).
    assert runs[0].stdout.split()[-2:] != runs[1].stdout.split()[-2:]

    # Without a zygote the shim runs the real program: a cold start.
    cold = subprocess.run([str(warm.shim), "cold", "start"], capture_output=True, text=True, timeout=30)
    assert cold.returncode == 0 and cold.stdout.strip() == "cold start"
    warm.cleanup()


def test_insecure_node_needs_no_certificate_or_key_and_says_so(site, capsys, monkeypatch):
    command = node_command(NodeOptions(superlink="10.0.0.5:8000", root_cert=None, key=None, data_path=site["data"],
                                       state_dir=site["root"] / "l", max_epsilon=3, delta=1e-5, insecure=True,
                                       allow_any_app=True))
    assert "--insecure" in command and "--root-certificates" not in command
    seen = {}
    monkeypatch.setattr("fedsafe.deploy.supervise", lambda cmd, env, **kw: seen.update(cmd=cmd, **kw) or 0)
    assert main(["node", "--superlink", "10.0.0.5:8000", "--data-path", str(site["data"]), "--state-dir",
                 str(site["root"] / "l"), "--max-epsilon", "3", "--insecure", "--allow-any-app"]) == 0
    err = capsys.readouterr().err
    assert "WARNING: --insecure: no TLS" in err and "WARNING: --allow-any-app" in err
    assert seen["warm_program"] == "flwr-clientapp" and seen["explain"]


def test_node_poll_interval_must_be_positive(site, capsys):
    assert main([*_node_args(site), "--poll-interval", "0"]) == 2
    assert "--poll-interval must be > 0 seconds" in capsys.readouterr().err


# ------------------------------------------------------------------------- which app a node runs
def test_node_must_name_the_apps_it_may_run(site, capsys):
    assert main(_node_args(site, **{"--allow-app": None})) == 2
    err = capsys.readouterr().err
    assert "name the app this node may run: --allow-app <sha256>" in err and err.count("\n") == 1
    assert main(_node_args(site, **{"--allow-app": "abc"})) == 2
    assert "give the app's SHA-256 in hex" in capsys.readouterr().err


def test_app_hash_is_the_hash_flwr_run_ships(capsys):
    import hashlib

    from flwr.cli.build import build_fab_from_disk

    repo = Path(__file__).resolve().parents[1]
    assert main(["app-hash", str(repo)]) == 0
    assert capsys.readouterr().out.strip() == hashlib.sha256(build_fab_from_disk(repo)).hexdigest()
    assert main(["app-hash", str(repo / "docs")]) == 2
    assert "is not a Flower app: it has no pyproject.toml" in capsys.readouterr().err


def test_flower_unpacks_apps_under_the_nodes_state_dir_unless_flwr_home_is_exported(site, monkeypatch, capsys):
    seen = {}
    monkeypatch.setattr("fedsafe.deploy.supervise", lambda cmd, env, **kw: seen.update(env=env) or 0)
    monkeypatch.delenv("FLWR_HOME", raising=False)
    assert main(_node_args(site)) == 0
    assert seen["env"]["FLWR_HOME"] == str((site["root"] / "ledgers" / "flwr").resolve())
    assert f"apps unpacked under FLWR_HOME={seen['env']['FLWR_HOME']}" in capsys.readouterr().err
    monkeypatch.setenv("FLWR_HOME", str(site["root"] / "mine"))
    assert main(_node_args(site)) == 0
    assert seen["env"]["FLWR_HOME"] == str(site["root"] / "mine")
    monkeypatch.delenv("FLWR_HOME")
    assert main(["superlink", "--certs", str(site["certs"]), "--database", str(site["root"] / "st" / "s.db"),
                 "--port", "0"]) == 0
    assert seen["env"]["FLWR_HOME"] == str((site["root"] / "st" / "flwr").resolve())


FAKE_SUPERNODE = """
import sys
from pathlib import Path
tries = Path(sys.argv[1])
tries.write_text(tries.read_text() + "x" if tries.exists() else "x")
if len(tries.read_text()) <= int(sys.argv[2]):
    print("ERROR: Exit Code: 305\\nFailed to initialize the connection to the SuperLink.\\n"
          "[code: 2004] Failed to activate SuperNode.", flush=True)
    sys.exit(1)
print("SuperNode ID: 42", flush=True)
"""


@pytest.mark.parametrize("refusals, patience, status", [(2, 30.0, 0), (1000, 0.6, 3), (1000, 0.0, 3)])
def test_a_node_not_admitted_is_started_again_with_a_countdown_until_its_patience_runs_out(
        tmp_path, monkeypatch, capsys, site, refusals, patience, status):
    """fedsafe.deploy.supervise with a stand-in SuperNode the SuperLink refuses `refusals` times (as after a
    crash: "Failed to activate SuperNode"): it is started again, with a countdown, while `patience` lasts."""
    from fedsafe import deploy

    monkeypatch.setattr(deploy, "ADMISSION_RETRY_S", 0.2)
    (tmp_path / "fake.py").write_text(FAKE_SUPERNODE)
    tries = tmp_path / "tries"
    command = [sys.executable, str(tmp_path / "fake.py"), str(tries), str(refusals)]
    assert deploy.supervise(command, dict(os.environ), warm_program=None, key=site["key"], explain=True,
                            admission_patience=patience) == status
    err = capsys.readouterr().err
    countdowns = err.count("did not admit this node (yet)")
    if status == 0:
        assert len(tries.read_text()) == refusals + 1 and countdowns == refusals
    elif patience:
        assert countdowns >= 1 and re.search(r"refused this node for \d+ s", err)  # waited: the lasting causes
        assert "another SuperNode with this key is running" in err and "crashed" not in err.split("error:")[1]
    else:
        assert countdowns == 0 and len(tries.read_text()) == 1  # --max-retries: no waiting, both causes named
        assert "crashed less than a minute ago" in err



# A cold ClientApp process as Flower starts one: Flower's logger set up first (its own handler; its records
# also go to the root logger), then the node's ClientApp trains a real round (Opacus imported on the way),
# then one line from Flower's logger and one warning from fedsafe's.
CLIENTAPP_PROCESS = """
import logging, sys
from flwr.common.logger import log
from flwr.supercore.task_identity import TaskIdentity
TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 0
from flwr.app import Context, RecordDict
from fedsafe.client.app import app
from fedsafe.server.config import RunConfig
from tests.node_harness import train_message
assert "opacus" not in sys.modules
cfg = RunConfig(num_rounds=1, model="mlp", dataset="breast-cancer", num_partitions=2, epsilon=1.0, local_epochs=1)
context = Context(run_id=7, node_id=1, node_config={"partition-id": 0, "num-partitions": 2, "state-dir": sys.argv[1]},
                  state=RecordDict(), run_config={})
reply = app(train_message(cfg, 1), context)
assert not reply.has_error(), reply.error
assert "opacus.privacy_engine" in sys.modules and "opacus.accountants" in sys.modules
log(logging.INFO, "flower-line-after-the-round")
logging.getLogger("fedsafe.client").warning("fedsafe-warning-after-the-round")
"""


def _python_stderr(code: str, *args: str, cwd: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300, env=env,
                          cwd=cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


def test_a_cold_clientapp_prints_each_log_line_once(tmp_path):
    """Issue 16.4: Opacus' import calls logging.basicConfig, so on a SuperNode every Flower line of a cold
    ClientApp after the first Opacus import printed twice (Flower's handler, then the root handler)."""
    stderr = _python_stderr(CLIENTAPP_PROCESS, str(tmp_path / "state"), cwd=tmp_path)
    assert "will spend ε" in stderr  # it trained
    assert stderr.count("flower-line-after-the-round") == 1, stderr[-2000:]
    assert stderr.count("fedsafe-warning-after-the-round") == 1, stderr[-2000:]
    # What the guard undoes: Opacus imported before fedsafe is, and the same line prints twice.
    unguarded = _python_stderr("import logging; from flwr.common.logger import log; import opacus, fedsafe; "
                               "log(logging.INFO, 'flower-line')", cwd=tmp_path)
    assert unguarded.count("flower-line") == 2, unguarded


def test_importing_opacus_anywhere_leaves_the_root_loggers_handlers_alone(tmp_path):
    """The coordinator imports Opacus too (its model check): any first import, of any Opacus module."""
    for module in ("opacus", "opacus.validators", "opacus.accountants", "fedsafe.client.training"):
        stderr = _python_stderr(f"import logging, fedsafe, importlib; importlib.import_module({module!r}); "
                                "import opacus; assert logging.root.handlers == [], logging.root.handlers",
                                cwd=tmp_path)
        assert "AssertionError" not in stderr
