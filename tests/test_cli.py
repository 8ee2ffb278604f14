import pytest

from fedsafe.cli import main


@pytest.mark.parametrize(
    "argv, message",
    [
        (["simulate", "--model", "resnet9000"], "unknown model 'resnet9000'; choose one of:"),
        (["simulate", "--epsilon", "0"], "epsilon must be > 0"),
        (["simulate", "--epsilon", "-2"], "epsilon must be > 0"),
        (["simulate", "--nodes", "100000"], "more nodes (100000) than training samples"),
        (["simulate", "--dataset", "/no/such/file.csv"], "data file not found: /no/such/file.csv"),
        (["simulate", "--dataset", "mnist"], "unknown dataset 'mnist'"),
        (["simulate", "--nodes", "0"], "nodes must be >= 1"),
        (["simulate", "--fraction", "1.5"], "fraction-train must be in (0, 1]"),
        (["simulate", "--nodes", "many"], "invalid int value: 'many'"),
        (["simulate", "--optimizer", "lbfgs"], "unknown optimizer 'lbfgs'"),
        (["launch"], "invalid choice: 'launch'"),
        (["simulate", "--strategy", "fedsgd"], "unknown strategy 'fedsgd'; choose one of: fedavg, fedprox"),
        (["simulate", "--strategy", "bulyan", "--num-malicious", "1"], "Bulyan needs n >= 4f + 3 replies per round; n=5"),
        (["simulate", "--strategy", "fedavg", "--trim-beta", "0.3"], "'fedavg' does not use trim-beta"),
        (["simulate", "--secagg", "--strategy", "krum"], "strategy 'krum' needs each update"),
        (["simulate", "--client-dp", "laplace"], "invalid choice: 'laplace'"),
        (["simulate", "--client-dp", "fixed", "--strategy", "fedmedian"], "client-dp=fixed needs an averaging strategy"),
        (["simulate", "--attack", "sign-flip", "--attackers", "9"], "attackers (9) exceed nodes (5)"),
    ],
)
def test_bad_input_gets_one_clear_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_ledger_command_reports_spend(tmp_path, capsys):
    from fedsafe.client.ledger import PrivacyLedger

    PrivacyLedger.open(tmp_path, "clinic-7").reserve("r", 1, (1.0, 0.1, 50), max_epsilon=9.0, delta=1e-5)
    assert main(["ledger", "--state-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "clinic-7" in out and "50" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["simulate", "--partitioner", "dirichlet", "--alpha", "0"], "alpha must be > 0"),
        (["simulate", "--partitioner", "dirichlet", "--alpha", "-0.5"], "alpha must be > 0"),
        (["simulate", "--fraction", "0"], "fraction-train must be in (0, 1]"),
        (["simulate", "--partitioner", "natural"], "partition-by"),
        (["sweep", "--epsilon", "1,x"], "comma-separated list of float"),
        (["sweep", "--nodes", "3,x"], "comma-separated list of int"),
        (["partitions", "--partitioner", "zipf"], "unknown partitioner 'zipf'"),
        (["simulate", "--client-cpus", "0"], "client CPUs must be > 0"),
        (["simulate", "--client-gpus", "-0.5"], "GPUs >= 0"),
    ],
)
def test_bad_simulation_config_is_named(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_a_sweep_whose_every_setting_cannot_run_says_why_and_fails(tmp_path, capsys):
    """A setting that cannot run is recorded with its reason (the sweep goes on with the rest, see
    test_simulation_e2e); when none can run, the sweep exits 1 having trained nothing."""
    assert main(["sweep", "--nodes", "999999", "--out", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "cannot run: more nodes (999999)" in out and "0 of 1 settings ran" in out
    assert "cannot run: more nodes (999999)" in (tmp_path / "privacy_utility.csv").read_text()


def test_partitions_command_writes_report(tmp_path, capsys):
    assert main(["partitions", "--dataset", "digits", "--nodes", "7", "--partitioner", "pathological",
                 "--out", str(tmp_path)]) == 0
    rows = (tmp_path / "partitions.csv").read_text().splitlines()
    assert len(rows) == 8 and rows[0].startswith("node,samples,label_0")
    assert (tmp_path / "partitions.png").stat().st_size > 5_000


def test_simulate_refuses_a_reused_out_dir_before_ray_starts_and_offers_resume(tmp_path, capsys, monkeypatch):
    """Issue 16.4: reusing --out was refused only after Ray's start-up, advising `resume=true`, which
    `fedsafe simulate` had no flag for."""
    import fedsafe.simulations.engine as engine

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray must not start for a refused run")

    monkeypatch.setattr(engine, "start_local_ray", no_ray)
    (tmp_path / "checkpoint.pt").write_bytes(b"an earlier run's checkpoint")
    assert main(["simulate", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"continue that run with --out {tmp_path} --resume, or give this run another out-dir" in err
    assert err.count("\n") == 1


def test_simulate_has_a_resume_flag_and_sweep_does_not():
    from fedsafe.cli import _run_config, build_parser

    args = build_parser().parse_args(["simulate", "--resume", "--out", "somewhere"])
    assert args.resume is True and _run_config(args, out_dir="somewhere").resume is True
    with pytest.raises(Exception, match="unrecognized arguments: --resume"):
        build_parser().parse_args(["sweep", "--resume"])


def test_batch_size_help_says_the_expected_batch_is_below_b(capsys):
    with pytest.raises(SystemExit):
        main(["simulate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "expected batch is n/ceil(n/B) <= B" in out and "expected Poisson batch size" not in out


def test_partitions_of_a_regression_target_count_quantile_bins(tmp_path, capsys):
    """diabetes' targets are continuous: counted per quantile bin of the target, not np.bincount'ed."""
    import numpy as np

    from fedsafe.client.data import load_dataset

    assert main(["partitions", "--dataset", "diabetes", "--nodes", "3", "--out", str(tmp_path)]) == 0
    rows = [line.split(",") for line in (tmp_path / "partitions.csv").read_text().splitlines()]
    header, counts = rows[0], np.array([[int(v) for v in row[1:]] for row in rows[1:]])
    assert header[:2] == ["node", "samples"] and all(c.startswith("target_") for c in header[2:])
    assert len(header) == 2 + 5 and len(counts) == 3
    assert (counts[:, 0] == counts[:, 1:].sum(axis=1)).all()  # every record in exactly one bin
    assert counts[:, 0].sum() == len(load_dataset("diabetes", None).train)
    assert counts[:, 1:].sum(axis=0).min() > 0.15 * counts[:, 0].sum()  # quantile bins: about a fifth each
    assert "Traceback" not in capsys.readouterr().err
