"""Nothing leaves a node unaccounted: every reply, of every kind, is audited against the gate's allowlist.

What the coordinator receives is checked as the bytes Flower would put on the wire (the whole Message:
content, error code and reason). An update reply may hold the trained arrays and the public metrics of
fedsafe.client.gate.PUBLIC_METRICS; an error reply a fixed code and its fixed category. A poisoned CSV
(a name in a feature cell, a telling directory name, labels beyond the model's classes) never reaches
the coordinator as text; the node's own operator still reads the detail on stderr.
"""

from __future__ import annotations

import csv

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.serde import message_to_proto

from fedsafe.client.app import make_client_app, train_round
from fedsafe.client.data import load_dataset
from fedsafe.client.gate import PUBLIC_METRICS
from fedsafe.protocol import BUDGET_EXHAUSTED, DATA_UNUSABLE, INTERNAL_ERROR, LEDGER_DAMAGED, REFUSALS, REQUEST_REFUSED
from fedsafe.client.policy import NodePolicy
from fedsafe.server.config import RunConfig
from tests.node_harness import node_context, train_message

pytestmark = pytest.mark.usefixtures("flower_task_identity")

CFG = RunConfig(num_rounds=2, model="mlp", dataset="breast-cancer", num_partitions=3, epsilon=1.0,
                local_epochs=1, batch_size=32, seed=3)
LEDGER_FIGURES = {"epsilon", "delta", "dp-steps", "noise-multiplier", "sample-rate", "max-epsilon", "run-epsilon",
                  "epsilon-next", "run-epsilon-next"}
SECRET = "Jane Roe"
SECRET_DIR = "ward-7-oncology"


def wire(reply: Message) -> bytes:
    """The reply as Flower serialises it for the coordinator."""
    return message_to_proto(reply).SerializeToString()


def audit(reply: Message, model_keys=None) -> set[str] | int:
    """Every field of `reply` against the allowlist: the metric names of an update, or an error's code."""
    if reply.has_error():
        # The fixed category; a malformed request (only) also hears what was wrong with what it sent.
        fixed, _, request_problem = reply.error.reason.partition(": ")
        assert REFUSALS.get(reply.error.code) == fixed, reply.error
        assert not request_problem or (reply.error.code == REQUEST_REFUSED and request_problem.startswith("train request"))
        assert not reply.has_content()
        return reply.error.code
    content = reply.content
    assert set(content.keys()) == {"arrays", "metrics"} and not content.config_records
    if model_keys is not None:
        assert set(content["arrays"].keys()) <= set(model_keys)
    metrics = set(content["metrics"].keys())
    assert metrics <= set(PUBLIC_METRICS), metrics - set(PUBLIC_METRICS)
    assert all(np.isfinite(float(v)) for v in content["metrics"].values())
    return metrics


def _policy(tmp_path, **kw) -> NodePolicy:
    return NodePolicy(state_dir=str(tmp_path / "ledgers"), seed_noise=True, **kw)


def _csv_node(tmp_path, poison_cell: bool = False, top_label: int | None = None):
    """A node's own CSV of breast-cancer records under a telling directory name."""
    data = load_dataset("breast-cancer").train
    path = tmp_path / SECRET_DIR / "patients.csv"
    path.parent.mkdir()
    labels = data.y.copy()
    if top_label is not None:
        labels[:5] = top_label
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([f"f{i}" for i in range(data.x.shape[1])] + ["label"])
        for i, (row, label) in enumerate(zip(data.x, labels)):
            cells = [repr(float(v)) for v in row]
            if poison_cell and i == 3:
                cells[5] = SECRET
            writer.writerow(cells + [int(label)])
    return path


def test_every_reply_kind_sends_only_allowlisted_fields(tmp_path, monkeypatch):
    model_keys = set(train_message(CFG, 1).content["arrays"].keys())
    policy = _policy(tmp_path)

    first = train_round(train_message(CFG, 1), node_context(), policy)
    assert audit(first, model_keys) == {"num-examples", "startup-seconds", *LEDGER_FIGURES}
    assert "train-loss" not in first.content["metrics"] and "train-seconds" not in first.content["metrics"]

    replayed = train_round(train_message(CFG, 1), node_context(), policy)
    assert audit(replayed, model_keys) == {"num-examples", "startup-seconds", "replayed", *LEDGER_FIGURES}

    plain = RunConfig(**{**CFG.__dict__, "dp": False})
    assert audit(train_round(train_message(plain, 1), node_context(), policy)) == REQUEST_REFUSED
    allowed = _policy(tmp_path / "plain", allow_non_private=True)
    assert audit(train_round(train_message(plain, 1), node_context(), allowed), model_keys) == {
        "num-examples", "startup-seconds"}

    spent = _policy(tmp_path, max_epsilon=float(first.content["metrics"]["epsilon"]))
    assert audit(train_round(train_message(CFG, 2), node_context(), spent)) == BUDGET_EXHAUSTED

    def crash(*args, **kwargs):
        raise RuntimeError(f"CUDA said no while reading {SECRET}")

    with monkeypatch.context() as patch:
        patch.setattr("fedsafe.client.training.train", crash)
        crashed = train_round(train_message(CFG, 2), node_context(), _policy(tmp_path / "crash"))
    assert audit(crashed) == INTERNAL_ERROR and SECRET.encode() not in wire(crashed)

    for ledger in (tmp_path / "ledgers").glob("*.json"):
        ledger.write_text(f"{{ hand-edited by {SECRET}")
    damaged = train_round(train_message(CFG, 2), node_context(), policy)
    assert audit(damaged) == LEDGER_DAMAGED and SECRET.encode() not in wire(damaged)


def test_node_config_errors_and_evaluate_messages_get_a_fixed_refusal(tmp_path, capsys):
    app = make_client_app()
    message = train_message(CFG, 1)
    context = Context(run_id=7, node_id=1, node_config={"data-path": str(tmp_path / SECRET_DIR / "x.csv"),
                                                        "max-epsilon": SECRET}, state=RecordDict(), run_config={})
    refused = app(message, context)
    assert audit(refused) == REQUEST_REFUSED
    assert SECRET.encode() not in wire(refused) and SECRET_DIR.encode() not in wire(refused)
    assert SECRET in capsys.readouterr().err  # the operator sees which key is wrong

    # A malformed request is the one refusal that says what was wrong: with what the coordinator itself sent.
    message.content["config"]["learning-rate"] = 0.1
    malformed = train_round(message, node_context(), _policy(tmp_path))
    assert audit(malformed) == REQUEST_REFUSED and "'learning-rate'" in malformed.error.reason

    evaluate = Message(RecordDict({"arrays": message.content["arrays"], "config": ConfigRecord({})}),
                       dst_node_id=1, message_type=MessageType.EVALUATE)
    assert audit(app(evaluate, node_context())) == REQUEST_REFUSED


def test_a_poisoned_csv_never_reaches_the_coordinator_as_text(tmp_path, capsys):
    path = _csv_node(tmp_path, poison_cell=True)
    policy = NodePolicy(state_dir=str(tmp_path / "ledgers"), data_path=str(path))
    context = Context(run_id=7, node_id=1, node_config={}, state=RecordDict(), run_config={})
    reply = train_round(train_message(CFG, 1), context, policy)
    assert audit(reply) == DATA_UNUSABLE
    sent = wire(reply)
    assert SECRET.encode() not in sent and SECRET_DIR.encode() not in sent and b"patients" not in sent
    assert "non-numeric feature value in column(s) ['f5']" in capsys.readouterr().err  # the operator's line

    # A missing file: its path stays on the node too.
    missing = NodePolicy(state_dir=str(tmp_path / "ledgers"), data_path=str(tmp_path / SECRET_DIR / "gone.csv"))
    gone = train_round(train_message(CFG, 1), context, missing)
    assert audit(gone) == DATA_UNUSABLE and SECRET_DIR.encode() not in wire(gone)


def test_probing_num_classes_gets_no_label_value_back(tmp_path, capsys):
    path = _csv_node(tmp_path, top_label=7)  # a rare label 7 among the 0/1 labels: the secret
    policy = NodePolicy(state_dir=str(tmp_path / "ledgers"), data_path=str(path))
    context = Context(run_id=7, node_id=1, node_config={}, state=RecordDict(), run_config={})
    answers = set()
    for classes in range(2, 8):
        message = train_message(CFG, 1)
        message.content["config"]["num-classes"] = classes
        reply = train_round(message, context, policy)
        assert audit(reply) == DATA_UNUSABLE
        answers.add((reply.error.code, reply.error.reason))
    assert answers == {(DATA_UNUSABLE, REFUSALS[DATA_UNUSABLE])}  # every probe reads the same
    assert "labels reach 7" in capsys.readouterr().err
    assert not list((tmp_path / "ledgers").glob("*.json"))  # refused before any spend


def test_secagg_replies_hold_protocol_records_and_public_metrics_only(tmp_path):
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    from fed_harness import federation, run

    cfg, grid, strategy = federation(tmp_path, nodes=3, secagg=True, num_rounds=1)
    outcome = run(cfg, grid, strategy)
    assert outcome.history[-1]["aggregated"]
    assert grid.received and not any(r.has_error() for r in grid.received)
    protocol = {"pk1", "pk2", "ctxts", "dsts", "masked_params", "nids", "shares"}  # SecAgg+'s four stages
    for reply in grid.received:
        content = reply.content
        assert set(content.config_records) <= {RECORD_KEY_CONFIGS, "fitres.status", "fitres.metrics"}
        assert set(content.config_records[RECORD_KEY_CONFIGS]) <= protocol
        if "fitres.status" in content.config_records:  # Flower's FitRes shell: OK, no message, no metrics
            assert dict(content.config_records["fitres.status"]) == {"code": 0, "message": ""}
            assert not content.config_records["fitres.metrics"]
        assert all(len(a) == 0 for a in content.array_records.values())  # the masked vector only
        assert set(content.metric_records) <= {"metrics", "fitres.num_examples"}
        if "metrics" in content.metric_records:
            metrics = set(content.metric_records["metrics"])
            assert metrics <= set(PUBLIC_METRICS) and "epsilon" in metrics, metrics - set(PUBLIC_METRICS)


def test_the_gate_steps_one_by_one_reserve_before_training_settle_what_was_done_release_the_public(tmp_path):
    from types import SimpleNamespace

    import torch

    from fedsafe.client.gate import PrivacyGate
    from fedsafe.client.ledger import PrivacyLedger
    from fedsafe.client.policy import TrainRequest, resolve_terms

    msg = train_message(CFG, 1)
    policy = _policy(tmp_path)
    request = TrainRequest.from_config(msg.content["config"], "flower-run")
    gate = PrivacyGate(msg, policy, request, resolve_terms(policy, request), "hospital-a")

    plan = gate.reserve(100)
    assert plan.private and plan.noise_multiplier > 0 and plan.steps > 1
    assert PrivacyLedger.open(policy.state_dir, "hospital-a").total_steps == plan.steps  # on disk before training

    # What the DP optimizer recorded (training.DPSpendRecorder); anything else withholds the update
    # (tests/test_ledger_integrity.py).
    done = SimpleNamespace(dp_spend=((plan.noise_multiplier, plan.sample_rate, plan.steps),))
    figures = gate.settle(plan, done)
    assert figures["dp-steps"] == plan.steps == PrivacyLedger.open(policy.state_dir, "hospital-a").total_steps

    state = {"w": torch.ones(2)}
    reply = gate.release("digest-1", state, {**figures, "num-examples": 100, "train-loss": 0.25})
    assert audit(reply) == {"num-examples", *LEDGER_FIGURES}  # train-loss dropped at the gate
    again = gate.replay("digest-1")
    assert audit(again) == {"num-examples", "replayed", *LEDGER_FIGURES}
    assert np.array_equal(again.content["arrays"]["w"].numpy(), np.ones(2))
    assert gate.replay("another request") is None
