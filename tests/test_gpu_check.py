"""benchmarks/gpu_check.py, the prepared GPU check (issue 14 item 2), is known to run before a GPU is
lent: on a machine without CUDA it says so in one line and exits 0; with --device cpu --quick its whole
code path runs at tiny sizes (every DP mode's correctness check and timing, bf16, a Ray simulation)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the check would run")
def test_without_cuda_it_prints_one_no_cuda_line_and_exits_0():
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no CUDA device: "), done.stdout
    assert "torch.cuda.is_available() is False" in lines[0] and "Traceback" not in done.stderr


def test_an_unknown_family_is_refused_in_one_line(capsys):
    from benchmarks.gpu_check import main

    assert main(["--device", "cpu", "--families", "mlp,resnet"]) == 2
    assert capsys.readouterr().err.strip() == (
        "gpu_check: unknown --families resnet; choose from: mlp, cnn, lstm, gru, transformer, autoencoder, gan, "
        "cnn bf16")


def test_the_full_sizes_fit_the_issues_check():
    """What the GPU run measures, fixed in the script: the issue's model, batch and federation."""
    from benchmarks.gpu_check import FAMILY_RUNS, FULL, ResNet18
    from fedsafe.models import model_names

    assert (FULL.image, FULL.batch, FULL.nodes, FULL.client_gpus, FULL.rounds) == (32, 256, 4, 0.25, 2)
    assert 11e6 < sum(p.numel() for p in ResNet18(FULL.width).parameters()) < 12e6  # ResNet-18: 11.2 M
    assert set(model_names()) <= set(FAMILY_RUNS)  # every built-in family
    assert FULL.budget_s <= 280  # under 5 minutes, start-up included


@pytest.mark.slow
def test_quick_run_on_the_cpu_walks_every_variant_and_a_federation(tmp_path):
    from benchmarks.gpu_check import main

    out = tmp_path / "gpu_check.json"
    assert main(["--device", "cpu", "--quick", "--families", "mlp", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    rows = {row["variant"]: row for row in results["dp_step"]}
    assert set(rows) == {"plain", "DP hooks", "DP functorch", "DP ew", "DP ghost", "plain bf16", "DP hooks bf16"}
    # every mode's per-sample gradients were checked correct, then timed
    assert all(row["ms"] > 0 and "note" not in row for row in rows.values()), rows
    (family,) = results["federation"]
    assert family["family"] == "mlp" and family["metric"] == "accuracy" and "note" not in family, family
    assert family["after"] > family["before"] + 0.2 and 0 < family["epsilon"] <= 3.0


@pytest.mark.slow
def test_the_federation_check_runs_in_process_where_ray_is_missing():
    from benchmarks.gpu_check import QUICK, federation_check

    (row,) = federation_check(QUICK, torch.device("cpu"), ["cnn bf16"], deadline=float("inf"), backend="in-process")
    assert row["metric"] == "accuracy" and "note" not in row, row
    assert row["after"] > row["before"] and 0 < row["epsilon"] <= 3.0


def test_dp_overhead_ranks_a_familys_modes_on_the_device_it_is_given():
    """benchmarks/dp_overhead.py, which the on-device script runs with --device cuda: its setups, models and
    targets live on the device asked for, each correct mode is timed, one is marked fastest, and the
    family's declared mode is marked."""
    from benchmarks.dp_overhead import benchmark_family, setup_for

    setup = setup_for("gan", torch.device("cpu"))
    assert setup.x.device.type == "cpu" and next(setup.model().parameters()).device.type == "cpu"
    rows = benchmark_family("mlp", rounds=1)
    timed = [row for row in rows if row[3] is not None]
    assert {row[1] for row in rows} == {"hooks", "functorch", "ew", "ghost"} and timed
    assert sum("*" in row[4] for row in timed) == 1
    assert sum("<" in row[4] for row in rows) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: it would measure")
def test_dp_overhead_without_cuda_says_so_in_one_line():
    script = ROOT / "benchmarks" / "dp_overhead.py"
    done = subprocess.run([sys.executable, str(script), "--device", "cuda"], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert done.stdout.strip().splitlines() == [done.stdout.strip()]
    assert done.stdout.startswith("dp_overhead: no CUDA device")
