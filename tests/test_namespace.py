"""fedsafe installs under one name, and a user's own `models.py` or `client/` cannot shadow it."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROLES = ("client", "server", "models", "strategies", "simulations")
SHADOW = 'raise ImportError("the user\'s own {name} was imported instead of fedsafe\'s")\n'


def _shadowing_workdir(path: Path) -> Path:
    """A researcher's working directory with files named like fedsafe's roles, each failing on import."""
    path.mkdir()
    (path / "models.py").write_text(SHADOW.format(name="models.py"))
    for name in ("client", "strategies"):
        (path / name).mkdir()
        (path / name / "__init__.py").write_text(SHADOW.format(name=f"{name}/"))
    (path / "server.py").write_text(SHADOW.format(name="server.py"))
    return path


def _env_with_workdir_first(workdir: Path) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(workdir), *filter(None, [os.environ.get("PYTHONPATH")])])}


def test_the_wheel_holds_one_top_level_package(tmp_path):
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(ROOT)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = tmp_path.glob("fedsafe-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if ".dist-info/" not in name}
    assert top_level == {"fedsafe"}
    for role in ROLES:  # every role is inside, under fedsafe/
        assert f"fedsafe/{role}/__init__.py" in names


def test_roles_import_as_fedsafe_only():
    import importlib.util

    import fedsafe.client.app
    import fedsafe.server.app

    for role in ROLES:
        spec = importlib.util.find_spec(f"fedsafe.{role}")
        assert spec is not None and Path(spec.origin).parent == ROOT / role
    probe = subprocess.run(
        [sys.executable, "-c", "import importlib.util as u; print([u.find_spec(r) for r in %r])" % (ROLES,)],
        cwd="/", capture_output=True, text=True, timeout=60,
        # Without PYTHONPATH: a simulation run earlier in this process exports the driver's import path
        # (this checkout included) for its Ray workers; what is *installed* is the question here.
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert probe.stdout.strip() == str([None] * len(ROLES)), probe.stderr  # nothing generic installed


def test_a_node_process_is_not_shadowed_by_the_working_directory(tmp_path):
    workdir = _shadowing_workdir(tmp_path / "work")
    code = (
        "import flwr.clientapp, flwr.serverapp, fedsafe.client.app as c, fedsafe.server.app as s; "
        "assert isinstance(c.app, flwr.clientapp.ClientApp) and isinstance(s.app, flwr.serverapp.ServerApp); "
        "print('ok')"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=workdir, env=_env_with_workdir_first(workdir),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]


@pytest.mark.slow
def test_simulate_runs_from_a_directory_that_shadows_the_roles(tmp_path):
    workdir = _shadowing_workdir(tmp_path / "work")
    run = subprocess.run(
        [sys.executable, "-m", "fedsafe", "simulate", "--nodes", "2", "--rounds", "1", "--out",
         str(tmp_path / "out")],
        cwd=workdir, env=_env_with_workdir_first(workdir), capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    assert (tmp_path / "out" / "metrics.json").exists()
