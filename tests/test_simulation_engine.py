"""Ray's lifetime around a run (the Flower pieces a simulation replaces: tests/test_flower_adapters.py)."""

import threading

import pytest

from fedsafe.server.config import ConfigError, RunConfig
from fedsafe.simulations.run import SimulationOptions, simulate


def test_a_run_refused_after_ray_started_leaves_no_ray_behind(tmp_path):
    import ray

    cfg = RunConfig(dataset="breast-cancer", num_rounds=1, out_dir=str(tmp_path / "run"))
    with pytest.raises(ConfigError, match="more nodes"):
        simulate(cfg, SimulationOptions(num_nodes=5000), progress=None)
    assert not ray.is_initialized()
    assert not [t for t in threading.enumerate() if t.name == "fedsafe-ray"]
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_the_cli_stops_the_ray_it_started_when_the_run_is_refused(tmp_path, capsys):
    import ray

    from fedsafe.cli import main

    assert main(["simulate", "--nodes", "5000", "--rounds", "1", "--out", str(tmp_path / "run")]) == 2
    assert "more nodes (5000) than training samples" in capsys.readouterr().err
    assert not ray.is_initialized()
    assert not [t for t in threading.enumerate() if t.name == "fedsafe-ray"]


def test_a_split_flwr_datasets_cannot_draw_is_one_clear_error(tmp_path, capsys):
    import ray

    from fedsafe.cli import main

    argv = ["simulate", "--dataset", "breast-cancer", "--nodes", "150", "--partitioner", "dirichlet",
            "--alpha", "0.01", "--rounds", "1", "--backend", "ray", "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "the dirichlet partitioner cannot divide this data over 150 nodes" in err and "raise alpha" in err
    assert "min_partition_size" not in err and "Traceback" not in err
    assert not ray.is_initialized()


def test_ray_that_cannot_start_is_one_clear_line_not_a_traceback(monkeypatch, tmp_path, capsys):
    """Ray's own start-up failure (its raylet timing out on an overloaded machine, measured on a 2-core
    machine at load 22) reaches the operator as one line, and the private Ray is never joined elsewhere."""
    import ray

    from fedsafe.cli import EXIT_USAGE, main

    calls = []

    def failing_init(**kwargs):
        calls.append(kwargs)
        raise Exception("The current node timed out during startup. This could happen because ...\nmore")

    monkeypatch.setattr(ray, "init", failing_init)
    code = main(["simulate", "--backend", "ray", "--nodes", "2", "--rounds", "1", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert err.strip() == ("fedsafe: error: Ray could not start on this machine: The current node timed out "
                           "during startup. This could happen because ...")
    assert calls and calls[0]["address"] == "local"  # a private instance, never a cluster found on the machine
