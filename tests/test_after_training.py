"""After training (fedsafe.after): export parity, predict without PyTorch, the model card's privacy record,
IG completeness, explanations refused on a node's data, compression size and accuracy.

Run directories are real: written by the server's own writers (ResultsWriter, save_checkpoint) around a
model the server's own builder made (build_global_model), or by a real in-process federation (the card).
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsafe.after.export import PARITY_TOLERANCE, export_model
from fedsafe.after.run import open_run
from fedsafe.client.data import fit_view, load_dataset
from fedsafe.server.app import central_data
from fedsafe.server.checkpoint import RunState, save_checkpoint
from fedsafe.server.config import RunConfig
from fedsafe.server.evaluation import build_global_model
from fedsafe.server.results import ResultsWriter

ROOT = Path(__file__).resolve().parents[1]


def finished_run(directory: Path, model: str, dataset: str, train_epochs: int = 0, **overrides) -> Path:
    """A run directory as a finished run leaves it, around a model built (and optionally trained centrally,
    seeded) the way the coordinator builds it."""
    cfg = RunConfig(model=model, dataset=dataset, dp=False, out_dir=str(directory), **overrides)
    built = build_global_model(cfg, central_data(cfg)[0])
    if train_epochs:
        torch.manual_seed(0)
        train = fit_view(load_dataset(dataset).train, built.spec.input_shape)
        x, y = torch.from_numpy(train.x), torch.from_numpy(train.y)
        optimizer = torch.optim.Adam(built.model.parameters(), lr=1e-2)
        for _ in range(train_epochs):
            for batch in torch.randperm(len(x)).split(64):
                optimizer.zero_grad()
                built.task.loss(built.model(x[batch]), y[batch]).backward()
                optimizer.step()
    ResultsWriter(directory, cfg.to_mapping()).write([], {})
    save_checkpoint(directory, RunState(run_key="test", completed_round=1, model_state=built.model.state_dict(),
                                        history=[], config=cfg.to_mapping()))
    return directory


def ort_run(path: Path, x: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})


FAMILIES = [
    ("mlp", "breast-cancer"), ("mlp", "diabetes"), ("cnn", "digits"), ("lstm", "digits"), ("gru", "digits"),
    ("transformer", "digits"), ("autoencoder", "digits-anomaly"), ("gan", "digits"),
]


@pytest.mark.parametrize("model, dataset", FAMILIES)
def test_onnx_export_equals_pytorch_on_held_out_data(tmp_path, model, dataset):
    run_dir = finished_run(tmp_path / "run", model, dataset)
    path, spec = export_model(run_dir, fmt="onnx")
    run = open_run(run_dir)
    x, _, _ = run.held_out()
    with torch.no_grad():
        if model == "gan":  # the generator, on noise
            x = np.random.default_rng(1).standard_normal((64, run.model.latent_dim)).astype(np.float32)
            expected = [run.model.generator(torch.from_numpy(x)).numpy()]
        elif model == "autoencoder":  # reconstruction and the anomaly score the server computes
            from fedsafe.models import anomaly_scores

            expected = [run.model(torch.from_numpy(x)).numpy(), anomaly_scores(run.model, x)]
        else:
            expected = [run.model(torch.from_numpy(x)).numpy()]
    got = ort_run(path, x)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.shape == b.shape
        assert np.max(np.abs(a - b)) <= PARITY_TOLERANCE
    assert spec.parity_max_abs_error <= PARITY_TOLERANCE
    assert (path.parent / "MODEL_CARD.md").is_file() and (path.parent / "model_card.json").is_file()  # the card travels


def test_torchscript_export_equals_pytorch(tmp_path):
    run_dir = finished_run(tmp_path / "run", "cnn", "digits")
    path, spec = export_model(run_dir, fmt="torchscript")
    run = open_run(run_dir)
    x, _, _ = run.held_out()
    with torch.no_grad():
        assert torch.equal(torch.jit.load(str(path))(torch.from_numpy(x)), run.model(torch.from_numpy(x)))
    assert json.loads((path.parent / "model.pt.json").read_text())["input_shape"] == [1, 8, 8]


def _predict_without_torch(*args: str) -> subprocess.CompletedProcess:
    """`fedsafe predict` in a fresh interpreter where importing torch fails."""
    code = ("import sys; sys.modules['torch'] = None; from fedsafe.cli import main; "
            f"sys.exit(main(['predict', *{list(args)!r}]))")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_predict_scores_csv_and_npz_with_onnxruntime_alone(tmp_path):
    run_dir = finished_run(tmp_path / "run", "mlp", "breast-cancer", train_epochs=5)
    path, _ = export_model(run_dir)
    run = open_run(run_dir)
    x, y, _ = run.held_out()
    data = tmp_path / "records.csv"
    with open(data, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*(f"f{i}" for i in range(x.shape[1])), "label"])  # a label column is ignored
        writer.writerows([[*map(repr, map(float, row)), int(label)] for row, label in zip(x, y)])
    np.savez(tmp_path / "records.npz", x=x)

    done = _predict_without_torch(str(path), str(data))
    assert done.returncode == 0, done.stderr
    done = _predict_without_torch(str(path), str(tmp_path / "records.npz"), "--out", str(tmp_path / "npz.csv"))
    assert done.returncode == 0, done.stderr

    with torch.no_grad():
        expected = run.model(torch.from_numpy(x)).argmax(dim=1).numpy()
    for written in (tmp_path / "records.predictions.csv", tmp_path / "npz.csv"):
        rows = list(csv.DictReader(open(written)))
        assert [int(r["prediction"]) for r in rows] == expected.tolist()
        assert all(abs(float(r["p_0"]) + float(r["p_1"]) - 1) < 1e-9 for r in rows)


def test_predict_bad_input_gets_one_line(tmp_path):
    run_dir = finished_run(tmp_path / "run", "mlp", "breast-cancer")
    path, _ = export_model(run_dir)
    narrow = tmp_path / "narrow.csv"
    narrow.write_text("a,b\n1,2\n")
    nan = tmp_path / "nan.csv"
    nan.write_text(",".join(f"f{i}" for i in range(30)) + "\n" + ",".join(["1"] * 29 + ["nan"]) + "\n")
    lone = tmp_path / "lone.onnx"
    lone.write_bytes(path.read_bytes())  # no spec beside it
    for args, message in [((str(path), str(narrow)), "records have 2 values each; the model takes 30"),
                          ((str(path), str(nan)), "record 0 has a missing, infinite or NaN value"),
                          ((str(lone), str(narrow)), "lone.onnx.json is missing"),
                          ((str(path), str(tmp_path / "none.csv")), "data file not found")]:
        done = _predict_without_torch(*args)
        assert done.returncode == 2
        assert message in done.stderr and "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_model_card_privacy_record_equals_the_ledgers(tmp_path, flower_task_identity):
    """A real (in-process) federated DP run writes the card at its end; its figures are the ledgers' own."""
    from fedsafe.client.accounting import epsilon

    from inprocess import federate

    cfg, outcome, _ = federate(tmp_path, nodes=2, num_rounds=2, local_epochs=1, epsilon=2.0)
    run_dir = Path(cfg.out_dir)
    card = json.loads((run_dir / "model_card.json").read_text())
    assert "ε reported" in (run_dir / "MODEL_CARD.md").read_text()
    privacy = card["privacy"]
    assert (privacy["accountant"], privacy["delta"], privacy["clipping_norm"]) == (cfg.accountant, cfg.delta,
                                                                                    cfg.max_grad_norm)
    assert privacy["secagg"] is False and privacy["client_level_dp"] == "off" and privacy["record_level_dp"]
    assert privacy["dp_does_not_cover"]
    reported = {str(k): v for k, v in outcome.node_epsilon.items()}
    assert {k: v["epsilon"] for k, v in privacy["nodes_reported"].items()} == reported

    ledgers = {json.loads(p.read_text())["data_key"]: json.loads(p.read_text())
               for p in (run_dir / "ledgers").glob("*.json")}
    assert len(ledgers) == 2 and len(privacy["ledgers"]) == 2
    for entry in privacy["ledgers"]:
        ledger = ledgers[entry["data"]]
        (plan,) = ledger["runs"].values()
        spend = [tuple(s) for s in ledger["accountant"]["history"]]
        assert entry["noise_multiplier"] == plan["noise_multiplier"] and entry["sample_rate"] == plan["sample_rate"]
        assert entry["steps"] == sum(s[2] for s in spend) and entry["rounds"] == 2
        assert entry["epsilon_run"] == pytest.approx(epsilon(spend, cfg.delta, cfg.accountant), rel=1e-9)
        assert entry["epsilon_run"] <= cfg.epsilon + 1e-9
    # each node reported what its ledger says it spent, and the σ and q its ledger fixed for the run (what a
    # deployed coordinator's card shows: it never sees the ledgers)
    assert sorted(e["epsilon_all_runs_on_this_data"] for e in privacy["ledgers"]) == pytest.approx(sorted(reported.values()))
    assert sorted((v["noise_multiplier"], v["sample_rate"]) for v in privacy["nodes_reported"].values()) == sorted(
        (plan["noise_multiplier"], plan["sample_rate"]) for ledger in ledgers.values() for plan in ledger["runs"].values())
    assert "| σ | sampling rate q |" in (run_dir / "MODEL_CARD.md").read_text()
    # the metrics are the run's own final evaluation, with an interval around them
    accuracy = card["metrics"]["accuracy"]
    assert accuracy["value"] == pytest.approx(outcome.history[-1]["eval"]["accuracy"])
    assert accuracy["low"] <= accuracy["value"] <= accuracy["high"] and accuracy["method"] == "Wilson score"
    # data by name only
    assert set(card["data"]) == {"training", "held_out", "partitioner"} and "breast-cancer" in card["data"]["training"]


def test_wilson_interval_matches_the_formula():
    from fedsafe.after.card import wilson_interval

    low, high = wilson_interval(132, 143)
    assert (round(low, 4), round(high, 4)) == (0.8675, 0.9565)  # Wilson, z=1.96: the published formula
    assert wilson_interval(0, 10)[0] == pytest.approx(0.0, abs=1e-12) and wilson_interval(10, 10)[1] == pytest.approx(1.0)


@pytest.mark.parametrize("model, dataset, rows", [("mlp", "breast-cancer", 30), ("cnn", "digits", 64)])
def test_integrated_gradients_are_complete(tmp_path, model, dataset, rows):
    """IG's attributions of each record add up to f(x) - f(baseline), computed here independently."""
    from fedsafe.after.explain import attributions, explain_run

    run_dir = finished_run(tmp_path / "run", model, dataset, train_epochs=2)
    result = explain_run(run_dir, records=50)
    run = open_run(run_dir)
    x, _, _ = run.held_out()
    attr, explained, _, _ = attributions(run, x[:50], "ig")
    with torch.no_grad():
        out = run.model(torch.from_numpy(x[:50]))
        target = out.argmax(dim=1)
        base = run.model(torch.zeros_like(torch.from_numpy(x[:50]))).gather(1, target[:, None]).squeeze(1)
        difference = out.gather(1, target[:, None]).squeeze(1) - base
    sums = attr.reshape(50, -1).sum(axis=1)
    tolerance = 1e-3 if model == "mlp" else 0.02  # ReLU/max-pool kinks cost the 64-step integral accuracy
    assert np.max(np.abs(sums - difference.numpy())) <= tolerance * max(1.0, float(difference.abs().max()))
    assert len(list(csv.reader(open(result.csv)))) == rows + 1 and Path(result.png).stat().st_size > 0
    assert "no ε" in result.privacy


def test_explain_refuses_a_nodes_data(tmp_path, capsys):
    from fedsafe.cli import main

    run_dir = finished_run(tmp_path / "run", "mlp", "breast-cancer")
    node_data = tmp_path / "node.npz"
    np.savez(node_data, x=np.zeros((3, 30), np.float32), y=np.zeros(3, np.int64))
    assert main(["explain", str(run_dir), "--data", str(node_data)]) == 2
    err = capsys.readouterr().err.strip()
    assert "refusing to explain" in err and "ε" in err and len(err.splitlines()) == 1
    assert not (run_dir / "explain").exists()


@pytest.mark.parametrize("model, min_ratio", [("mlp", 4.0), ("cnn", 4.0)])  # measured 4.20x, 4.19x (README)
def test_compression_shrinks_and_keeps_accuracy(tmp_path, model, min_ratio):
    from fedsafe.after.compress import compress_run
    from fedsafe.after.predict import predict

    run_dir = finished_run(tmp_path / "run", model, "digits", train_epochs=15)
    result = compress_run(run_dir)
    assert result.before >= 0.95  # a model worth compressing
    assert result.after >= result.before - 0.01  # within one point of accuracy, measured by ONNX Runtime
    assert result.gzip_ratio >= min_ratio and result.weight_ratio >= 3.5 and result.ratio >= 2.0
    # the compressed model is an ordinary export: predict runs it
    x, y, _ = open_run(run_dir).held_out()
    np.savez(tmp_path / "held.npz", x=x)
    rows = list(csv.DictReader(open(predict(result.model, tmp_path / "held.npz"))))
    assert np.mean([int(r["prediction"]) == label for r, label in zip(rows, y)]) == pytest.approx(result.after)


def test_run_dir_errors_are_one_line(tmp_path, capsys):
    from fedsafe.cli import main

    assert main(["export", str(tmp_path)]) == 2
    assert "is not a finished fedsafe run: metrics.json is missing" in capsys.readouterr().err
    run_dir = finished_run(tmp_path / "run", "mlp", "breast-cancer")
    assert main(["export", str(run_dir), "--weights", "best"]) == 2
    assert "best_model.pt is missing" in capsys.readouterr().err
    assert main(["compress", str(finished_run(tmp_path / "gan", "gan", "digits"))]) == 2
    assert "compress serves classifiers and regressors" in capsys.readouterr().err


def test_bootstrap_metrics_equal_sklearn():
    from sklearn.metrics import f1_score, r2_score, roc_auc_score

    from fedsafe.after.card import auroc, macro_f1, r2

    rng = np.random.default_rng(0)
    y, predicted = rng.integers(0, 4, 200), rng.integers(0, 5, 200)
    assert macro_f1(y, predicted) == pytest.approx(f1_score(y, predicted, average="macro", zero_division=0))
    labels, scores = rng.integers(0, 2, 200), np.round(rng.random(200), 1)  # with ties
    assert auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores))
    target = rng.standard_normal(50)
    guess = target + rng.standard_normal(50)
    assert r2(target, guess) == pytest.approx(r2_score(target, guess))


def test_the_cards_ledger_figures_are_each_ledgers_own_and_an_edited_one_is_named(tmp_path):
    """The card reads every ledger in a simulation's ledger directory once, audited as a node audits it: a good
    ledger's figures are its own; an edited one is listed as unreadable with its problem, not counted."""
    from fedsafe.after.card import ledger_records
    from fedsafe.client.accounting import epsilon
    from fedsafe.client.ledger import PrivacyLedger

    for key, steps in (("node-a", 20), ("node-b", 30)):
        ledger = PrivacyLedger.open(tmp_path, key)
        sigma = ledger.plan_run("run", sample_rate=0.1, steps_per_round=steps, planned_rounds=2, run_epsilon=2.0,
                                max_epsilon=5.0, delta=1e-5).noise_multiplier
        ledger.reserve("run", 1, (sigma, 0.1, steps), max_epsilon=5.0, delta=1e-5)
        ledger.settle("run", 1, steps)
    edited = PrivacyLedger.open(tmp_path, "node-b").path
    edited.write_text(edited.read_text().replace('"steps_per_round": 30', '"steps_per_round": 3'))
    good, bad = sorted(ledger_records(tmp_path, "run", 1e-5, "rdp"), key=lambda r: "error" in r)
    spend = PrivacyLedger.open(tmp_path, "node-a").history
    assert good["data"] == "node-a" and good["steps"] == 20 and good["rounds"] == 1
    assert good["epsilon_run"] == good["epsilon_all_runs_on_this_data"] == epsilon(spend, 1e-5)
    assert bad["ledger"] == edited.name and bad["error"].startswith("unreadable: privacy ledger") and "hash chain" in bad["error"]


def test_the_cards_f1_interval_is_the_record_bootstraps_drawn_from_confusion_counts():
    """The card draws each bootstrap resample as its confusion counts (multinomial over the (true, predicted)
    cells): each resample's F1 is macro_f1's for records with those counts, the interval is reproducible, and
    it agrees with the bootstrap that resamples the records one by one within the resampling noise."""
    from fedsafe.after.card import _macro_f1_of_confusions, bootstrap_interval, macro_f1, macro_f1_interval

    rng = np.random.default_rng(5)
    confusions = rng.integers(0, 4, (30, 4, 4)) * (rng.random((30, 4, 4)) < 0.6)
    confusions[0] = 0
    confusions[0, 1, 1] = 3  # one class present only
    for confusion, value in zip(confusions, _macro_f1_of_confusions(confusions)):
        true, predicted = np.nonzero(confusion)
        y = np.repeat(true, confusion[true, predicted])
        guess = np.repeat(predicted, confusion[true, predicted])
        assert value == pytest.approx(macro_f1(y, guess), rel=1e-12)
    for n, classes, offset in [(3000, 4, 0), (800, 10, -3)]:
        y = rng.integers(0, classes, n) + offset
        predicted = np.where(rng.random(n) < 0.7, y, rng.integers(0, classes + 1, n) + offset)
        low, high = macro_f1_interval(y, predicted)
        assert (low, high) == macro_f1_interval(y, predicted)  # seeded
        plain_low, plain_high = bootstrap_interval(macro_f1, (y, predicted))
        assert low < macro_f1(y, predicted) < high
        assert abs(low - plain_low) < 0.25 * (plain_high - plain_low)
        assert abs(high - plain_high) < 0.25 * (plain_high - plain_low)


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path("/tmp/fedsafe-after-payload-ran"),))


def test_a_tampered_run_directory_is_refused_in_one_line(tmp_path, capsys):
    """A checkpoint that would run code when unpickled, or a hand-edited metrics.json, stops with one line."""
    import pickle

    from fedsafe.cli import main

    marker = Path("/tmp/fedsafe-after-payload-ran")
    marker.unlink(missing_ok=True)
    run_dir = finished_run(tmp_path / "run", "mlp", "breast-cancer")
    torch.save({"model_state": _Payload()}, run_dir / "checkpoint.pt", pickle_protocol=pickle.HIGHEST_PROTOCOL)
    assert main(["export", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "checkpoint.pt" in err and "Traceback" not in err
    assert not marker.exists()
    (run_dir / "metrics.json").write_text('{"config": {"model": "mlp", "no-such-key": 1}}')
    assert main(["card", str(run_dir)]) == 2
    assert "the run's config cannot be read back" in capsys.readouterr().err
