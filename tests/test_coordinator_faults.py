"""The coordinator's round loop under faults, in-process: silent and failing nodes, poisoned updates and
exclusion, a crash and its resume, and the checks that keep a resume honest. The grid is a fake that
answers each train message with a function of the message (no Flower processes, no training)."""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Error, Message, MetricRecord, RecordDict

from fedsafe.server.app import central_data, global_model_setup
from fedsafe.server.checkpoint import CHECKPOINT_NAME, CheckpointError
from fedsafe.server.config import ConfigError, RunConfig
from fedsafe.server.loop import run_rounds
from fedsafe.strategies import StrikesStrategy

Reply = Callable[[Message, int], "Message | None"]


def dp_metrics(rnd: int, examples: int = 10) -> MetricRecord:
    """What a node that trained with DP-SGD reports beside its update (client/app.py)."""
    return MetricRecord({"num-examples": examples, "epsilon": 0.5 * rnd, "delta": 1e-5, "dp-steps": 20 * rnd,
                         "noise-multiplier": 1.1})


def _arrays(message: Message) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in message.content["arrays"].items()}


def good(scale: float = 0.01) -> Reply:
    """A node whose update is a deterministic function of the global model, its id and the round."""
    def reply(message: Message, rnd: int) -> Message:
        node = message.metadata.dst_node_id
        arrays = {k: (v * 0.9 + scale * node / rnd).astype(v.dtype) for k, v in _arrays(message).items()}
        content = RecordDict({"arrays": ArrayRecord({k: Array.from_numpy_ndarray(v) for k, v in arrays.items()}),
                              "metrics": dp_metrics(rnd, 10 + node)})
        return Message(content, reply_to=message)
    return reply


def nan() -> Reply:
    def reply(message: Message, rnd: int) -> Message:
        arrays = {k: np.full_like(v, np.nan) for k, v in _arrays(message).items()}
        content = RecordDict({"arrays": ArrayRecord({k: Array.from_numpy_ndarray(v) for k, v in arrays.items()}),
                              "metrics": dp_metrics(rnd)})
        return Message(content, reply_to=message)
    return reply


def silent() -> Reply:
    return lambda message, rnd: None


def failing() -> Reply:
    return lambda message, rnd: Message(Error(code=0, reason="ClientApp raised"), reply_to=message)


class FakeGrid:
    """push_messages answers at once (or never); pull_messages hands the answers out."""

    def __init__(self, nodes: dict[int, Reply], crash_in_round: int | None = None) -> None:
        self.nodes = nodes
        self.crash_in_round = crash_in_round
        self.sent: list[tuple[int, int]] = []  # (round, node)
        self.pending: dict[str, Message] = {}

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        ids = []
        for message in messages:
            rnd = int(message.content["config"]["server-round"])
            if rnd == self.crash_in_round:
                raise RuntimeError("the coordinator's machine died")
            message.metadata.__dict__["_message_id"] = message.object_id
            node = int(message.metadata.dst_node_id)
            self.sent.append((rnd, node))
            reply = self.nodes[node](message, rnd)
            if reply is not None:
                self.pending[message.object_id] = reply
            ids.append(message.object_id)
        return ids

    def pull_messages(self, message_ids):
        return [self.pending.pop(i) for i in list(message_ids) if i in self.pending]


def _config(tmp_path, **kw) -> RunConfig:
    base = dict(num_rounds=3, out_dir=str(tmp_path / "run"), min_nodes=2, min_replies=1, round_timeout=0.3,
                poll_interval=0.01, max_strikes=2)
    return RunConfig(**{**base, **kw})


def _run(cfg: RunConfig, grid: FakeGrid):
    from fedsafe.server.app import build_run_strategy

    initial, model_config, _ = global_model_setup(cfg)
    return run_rounds(grid, cfg, build_run_strategy(cfg), initial, model_config, evaluator=None)


@pytest.fixture(autouse=True)
def _identity(flower_task_identity):
    yield


def test_silent_and_failing_nodes_do_not_stop_the_run(tmp_path):
    grid = FakeGrid({1: good(), 2: silent(), 3: failing()})
    outcome = _run(_config(tmp_path), grid)
    rounds = outcome.history
    assert [r["aggregated"] for r in rounds] == [True] * 3
    assert all(r["replies"] == 1 and r["failures"] == 2 for r in rounds)
    reasons = {p["node"]: p["reason"] for p in rounds[0]["problems"]}
    assert "no reply within round-timeout" in reasons[2] and "ClientApp raised" in reasons[3]
    assert all(r["wait_seconds"] >= 0.3 for r in rounds)  # waited for the silent node, then moved on


def test_poisoned_node_is_excluded_after_max_strikes_and_the_model_stays_finite(tmp_path):
    grid = FakeGrid({1: good(), 2: good(), 3: nan()})
    outcome = _run(_config(tmp_path, num_rounds=4), grid)
    rounds = outcome.history
    assert [r["rejected"] for r in rounds] == [1, 1, 0, 0]
    assert sorted(n for rnd, n in grid.sent if rnd == 3) == [1, 2]  # excluded after 2 in a row
    assert rounds[-1]["excluded"] == [3]
    assert "NaN" in rounds[0]["problems"][0]["reason"]
    assert all(np.isfinite(v.numpy()).all() for v in outcome.arrays.values())


def test_an_excluded_node_takes_no_sampling_slot(tmp_path):
    grid = FakeGrid({1: good(), 2: good(), 3: good(), 4: nan()})
    _run(_config(tmp_path, num_rounds=8, fraction_train=0.7, max_strikes=1, min_nodes=4), grid)  # 2 of 4, 2 of 3
    sent = {rnd: sorted(n for r, n in grid.sent if r == rnd) for rnd in range(1, 9)}
    struck = min(rnd for rnd, nodes in sent.items() if 4 in nodes)
    assert struck < 8
    for rnd in range(struck + 1, 9):
        assert len(sent[rnd]) == 2 and 4 not in sent[rnd], sent  # two of the three others, every round


def test_the_run_stops_when_every_node_is_excluded(tmp_path):
    outcome = _run(_config(tmp_path, num_rounds=3, max_strikes=1), FakeGrid({1: nan(), 2: nan()}))
    assert [r["round"] for r in outcome.history] == [1]
    assert "every connected node is excluded" in outcome.stop_reason


def test_strikes_count_in_a_window_so_good_updates_between_bad_ones_do_not_wipe_them():
    """Issue 16.2: an accepted update used to reset the count, so a node alternating good and bad updates
    was never excluded."""
    strategy = StrikesStrategy(inner=object(), max_strikes=2, window=4)
    strategy.record_rejection(7, "NaN", 1)
    strategy.record_accepted(7)
    strategy.record_rejection(7, "NaN", 3)
    assert strategy.excluded == {7: "NaN"}  # two of its last three updates rejected
    strategy.record_rejection(8, "NaN", 1)
    for rnd in range(2, 6):
        strategy.record_accepted(8)  # the bad update slides out of the window
    strategy.record_rejection(8, "shape", 6)
    assert 8 not in strategy.excluded and strategy.strikes(8) == 1
    restored = StrikesStrategy(inner=object(), max_strikes=2, window=4)
    restored.fedsafe_load_state_dict(json.loads(json.dumps(strategy.fedsafe_state_dict())))
    assert restored.excluded == {7: "NaN"} and restored.strikes(7) == 2 and restored.strikes(8) == 1


def test_a_node_alternating_good_and_bad_updates_is_excluded(tmp_path):
    def alternating(message, rnd):
        return good()(message, rnd) if rnd % 2 == 0 else nan()(message, rnd)

    grid = FakeGrid({1: good(), 2: good(), 3: alternating})
    outcome = _run(_config(tmp_path, num_rounds=6, max_strikes=3), grid)
    assert [r["rejected"] for r in outcome.history][:5] == [1, 0, 1, 0, 1]
    assert 3 not in {n for rnd, n in grid.sent if rnd == 6} and outcome.history[-1]["excluded"] == [3]


def test_a_crashed_coordinator_resumes_to_the_same_model_and_keeps_exclusions(tmp_path):
    nodes = {1: good(), 2: good(0.02), 3: nan()}
    reference = _run(_config(tmp_path / "a", num_rounds=4), FakeGrid(dict(nodes)))

    cfg = _config(tmp_path / "b", num_rounds=4)
    with pytest.raises(RuntimeError, match="died"):
        _run(cfg, FakeGrid(dict(nodes), crash_in_round=3))  # rounds 1-2 checkpointed; node 3 excluded
    grid = FakeGrid(dict(nodes))
    resumed = _run(RunConfig(**{**cfg.__dict__, "resume": True}), grid)

    assert [r["round"] for r in resumed.history] == [1, 2, 3, 4]
    assert sorted({n for _, n in grid.sent}) == [1, 2]  # the exclusion survived the crash
    for key in reference.arrays.keys():
        assert np.array_equal(reference.arrays[key].numpy(), resumed.arrays[key].numpy())


def test_resume_refuses_another_config_a_corrupt_checkpoint_and_a_missing_one(tmp_path):
    cfg = _config(tmp_path, num_rounds=2)
    _run(cfg, FakeGrid({1: good(), 2: good()}))
    with pytest.raises(CheckpointError, match="holds the checkpoint of an earlier run.*resume=true"):
        _run(cfg, FakeGrid({1: good(), 2: good()}))
    with pytest.raises(CheckpointError, match=r"differs.*lr: 0\.5 → 0\.1"):
        _run(RunConfig(**{**cfg.__dict__, "resume": True, "lr": 0.1}), FakeGrid({1: good()}))
    (cfg.out_path / CHECKPOINT_NAME).write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt or unreadable"):
        _run(RunConfig(**{**cfg.__dict__, "resume": True}), FakeGrid({1: good()}))
    with pytest.raises(CheckpointError, match="no checkpoint to resume from"):
        _run(_config(tmp_path / "none", resume=True), FakeGrid({1: good()}))


def test_metrics_only_some_nodes_report_are_dropped_not_fatal(tmp_path):
    def extra(message, rnd):
        reply = good()(message, rnd)
        reply.content["metrics"]["only-me"] = 1.0
        return reply

    outcome = _run(_config(tmp_path, num_rounds=1), FakeGrid({1: good(), 2: extra}))
    assert outcome.history[0]["aggregated"] and outcome.history[0]["replies"] == 2


def test_central_evaluation_data_eval_path_or_none(tmp_path):
    from fedsafe.client.data import load_dataset

    test = load_dataset("breast-cancer").test
    np.savez(tmp_path / "heldout.npz", x=test.x, y=test.y)
    spec, data = central_data(RunConfig(dataset="", eval_path=str(tmp_path / "heldout.npz")))
    assert spec.input_shape == (30,) and len(data.test) == len(test)

    spec, data = central_data(RunConfig(dataset="", input_shape="30", num_classes=2))
    assert data is None and spec.num_classes == 2
    _, _, evaluator = global_model_setup(RunConfig(dataset="", input_shape="30", num_classes=2))
    assert evaluator is None  # no held-out data: no central evaluation, and no error

    with pytest.raises(ConfigError, match="eval-path=.*input-shape and num-classes"):
        central_data(RunConfig(dataset="site-data"))
    with pytest.raises(ConfigError, match="central evaluation data: data file not found"):
        central_data(RunConfig(eval_path=str(tmp_path / "missing.npz")))
    with pytest.raises(ConfigError, match="input-shape=8 but the evaluation data is shaped"):
        central_data(RunConfig(eval_path=str(tmp_path / "heldout.npz"), input_shape="8"))


def test_replies_that_arrive_while_a_pull_outlasts_the_round_timeout_still_count():
    """Flower retries a reply whose upload never finished (its node killed mid-upload) for minutes inside
    one pull; the other nodes' replies that arrived meanwhile were in time and must not be lost."""
    import time
    from types import SimpleNamespace

    from fedsafe.server.loop import exchange

    def message(node):
        return SimpleNamespace(metadata=SimpleNamespace(dst_node_id=node))

    def reply(message_id):
        return SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=message_id))

    class StallingGrid:
        pulls = 0

        def push_messages(self, messages):
            return [f"m{m.metadata.dst_node_id}" for m in messages]

        def pull_messages(self, ids):
            self.pulls += 1
            if self.pulls == 1:  # only the dead node's half-uploaded reply is there, and it stalls
                time.sleep(0.3)
                return [reply("m1")]  # Flower's error reply, after its retries
            return [reply(i) for i in ids]  # nodes 2 and 3 replied during the stall

    replies, silent = exchange(StallingGrid(), [message(1), message(2), message(3)], timeout=0.1, poll_interval=0.01)
    assert sorted(node for node, _ in replies) == [1, 2, 3] and silent == []


def test_nodes_that_stay_silent_past_the_round_timeout_are_reported():
    from types import SimpleNamespace

    from fedsafe.server.loop import exchange

    class QuietGrid:
        def push_messages(self, messages):
            return [f"m{m.metadata.dst_node_id}" for m in messages]

        def pull_messages(self, ids):
            return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id="m1"))] if "m1" in ids else []

    messages = [SimpleNamespace(metadata=SimpleNamespace(dst_node_id=n)) for n in (1, 2)]
    replies, silent = exchange(QuietGrid(), messages, timeout=0.1, poll_interval=0.01)
    assert [node for node, _ in replies] == [1] and silent == [2]


def stock_flower_node(message: Message, context) -> Message:
    """A stock Flower quickstart ClientApp with the same architecture: it trains without DP (here, a small
    step of its own) and replies with its arrays, `train_loss` and `num-examples` — no ε, no δ, no σ."""
    rng = np.random.default_rng(int(context.node_id))
    arrays = {k: (v + rng.normal(0, 1e-3, v.shape)).astype(v.dtype) for k, v in _arrays(message).items()}
    content = RecordDict({"arrays": ArrayRecord({k: Array.from_numpy_ndarray(v) for k, v in arrays.items()}),
                          "metrics": MetricRecord({"train_loss": 0.4, "num-examples": 120})})
    return Message(content, reply_to=message)


def test_a_non_private_node_in_a_dp_run_is_rejected_and_cannot_wipe_the_others_epsilon(tmp_path):
    """Issue 16.1: a node that trains without DP and sends no ε was averaged in silently, and its reply
    made the loop drop every honest node's ε (only the metric keys all replies share were kept)."""
    from fed_harness import federation, run

    cfg, grid, strategy = federation(tmp_path, nodes=3, num_rounds=3, max_strikes=2)
    stock = min(grid.get_node_ids())
    fedsafe_app = grid.client_app
    grid.client_app = lambda message, context: (
        stock_flower_node(message, context) if context.node_id == stock else fedsafe_app(message, context))
    outcome = run(cfg, grid, strategy)

    rounds = outcome.history[1:]
    honest = sorted(str(n) for n in grid.get_node_ids() if n != stock)
    for record in rounds[:2]:
        assert record["rejected"] == 1 and record["replies"] == 2
        (problem,) = record["problems"]
        assert problem["node"] == stock
        assert "missing epsilon, delta, dp-steps, noise-multiplier" in problem["reason"]
    assert sorted(rounds[0]["node_epsilon"]) == honest and rounds[0]["epsilon_max"] > 0
    assert rounds[-1]["excluded"] == [stock] and rounds[-1]["sent"] == 2  # two strikes: not asked again
    summary = json.loads((cfg.out_path / "metrics.json").read_text())["summary"]
    assert summary["nodes_seen"] == 2 and summary["epsilon_max_all_nodes"] == max(outcome.node_epsilon.values())


@pytest.mark.parametrize("field, value, why", [
    ("epsilon", float("nan"), "epsilon=nan is not finite"),
    ("epsilon", -0.1, "epsilon=-0.1 is not finite and >= 0"),
    ("epsilon", float("inf"), "epsilon=inf"),
    ("delta", 0.0, "delta=0.0 is not in (0, 1)"),
    ("dp-steps", 0, "dp-steps=0 is not a whole number"),
    ("dp-steps", 2.5, "dp-steps=2.5"),
    ("noise-multiplier", 0.0, "noise-multiplier=0.0 is not finite and > 0"),
    ("noise-multiplier", None, "missing noise-multiplier"),
])
def test_dp_fields_out_of_range_are_rejected_and_struck(tmp_path, field, value, why):
    def lying(message, rnd):
        reply = good()(message, rnd)
        if value is None:
            del reply.content["metrics"][field]
        else:
            reply.content["metrics"][field] = value
        return reply

    outcome = _run(_config(tmp_path, num_rounds=2), FakeGrid({1: good(), 2: lying}))
    first = outcome.history[0]
    assert first["rejected"] == 1 and first["problems"][0]["node"] == 2
    assert why in first["problems"][0]["reason"]
    assert outcome.history[-1]["excluded"] == [2]  # max-strikes 2
    assert first["node_epsilon"] == {"1": 0.5}


def test_a_run_without_dp_takes_replies_without_dp_fields(tmp_path):
    outcome = _run(_config(tmp_path, num_rounds=1, dp=False),
                   FakeGrid({1: lambda m, rnd: stock_flower_node(m, type("C", (), {"node_id": 1})), 2: good()}))
    assert outcome.history[0]["replies"] == 2 and outcome.history[0]["rejected"] == 0


def plus(amount: float) -> Reply:
    """A node whose update is the honest one plus `amount` in every weight."""
    def reply(message: Message, rnd: int) -> Message:
        honest = good()(message, rnd)
        arrays = {k: (v + amount).astype(v.dtype) for k, v in _arrays(honest).items()}
        honest.content["arrays"] = ArrayRecord({k: Array.from_numpy_ndarray(v) for k, v in arrays.items()})
        return honest
    return reply


@pytest.mark.parametrize("nodes", [2, 3])
def test_a_huge_update_is_rejected_by_the_default_bound_and_its_node_excluded(tmp_path, nodes):
    """Issue 16.2: with max-update-norm = 0 (the default) a +1e6 update went through (the model's largest
    weight became 5e5) and, accepted, reset its node's strikes."""
    honest = {n: good(0.01 * n) for n in range(1, nodes)}
    cfg = _config(tmp_path, num_rounds=4, max_strikes=3)
    assert cfg.max_update_norm == 0  # the default
    grid = FakeGrid({**honest, 9: plus(1e6)})
    outcome = _run(cfg, grid)
    assert [r["rejected"] for r in outcome.history] == [1, 1, 1, 0]
    reason = outcome.history[0]["problems"][0]["reason"]
    assert outcome.history[0]["problems"][0]["node"] == 9 and "exceeds the bound" in reason
    assert "lower-median update norm" in outcome.history[0]["update_norm_bound"]["source"]
    assert outcome.history[-1]["excluded"] == [9] and (4, 9) not in grid.sent
    assert max(float(np.abs(v.numpy()).max()) for v in outcome.arrays.values()) < 10


def test_an_operator_set_max_update_norm_is_the_bound_and_is_recorded(tmp_path):
    outcome = _run(_config(tmp_path, num_rounds=1, max_update_norm=1e-9), FakeGrid({1: good(), 2: good()}))
    first = outcome.history[0]
    assert first["rejected"] == 2 and first["update_norm_bound"] == {"source": "max-update-norm", "value": 1e-9}


def test_the_default_bound_scales_with_each_nodes_expected_batch():
    from fedsafe.strategies.validation import NORM_BOUND_FACTOR, expected_batch, update_norm_bound

    assert expected_batch(100, 32) == 25 and expected_batch(2, 32) == 2 and expected_batch(64, 32) == 32
    # a 2-record node's DP noise is averaged over 2, not 32: its honest norm is ~16× larger
    bound = update_norm_bound([(1.0, 300), (1.1, 400), (16.0, 2)], batch_size=32)
    assert bound.for_node(2) > 16.0 * 5 and bound.for_node(320) == pytest.approx(NORM_BOUND_FACTOR * bound.reference)
    assert update_norm_bound([(1.0, 300)], 32, max_update_norm=5.0).for_node(2) == 5.0


def test_honest_dp_nodes_are_never_rejected_by_the_default_bound(tmp_path):
    """The default bound must not trip on honest DP-SGD updates, however uneven the data: here a Dirichlet
    α=0.1 split gives one node 2 records, whose noise is averaged over 2 instead of 32 (its update is ~8×
    as long as the others')."""
    from fed_harness import federation, run

    cfg, grid, strategy = federation(tmp_path, nodes=3, num_rounds=2, partitioner="dirichlet", alpha=0.1)
    outcome = run(cfg, grid, strategy)
    rounds = outcome.history[1:]
    assert all(r["rejected"] == 0 and r["replies"] == 3 for r in rounds)
    norms = rounds[0]["update_norms"]
    assert max(norms.values()) > 5 * min(norms.values())  # the uneven case the bound must absorb
    # issue 16.4: the progress line labels the nodes' lifetime ε and the ε they granted this run
    from fedsafe.server.loop import progress_line

    assert rounds[0]["run_epsilon_grant"] == {"min": cfg.epsilon, "max": cfg.epsilon}
    line = progress_line(rounds[-1], cfg)
    assert f"lifetime ε max {rounds[-1]['epsilon_max']:.2f}" in line and f"run grant ε {cfg.epsilon:g}" in line


def claiming(examples: float, shift: float = 0.01) -> Reply:
    """A node whose update is shifted by `shift` and that claims `examples` records."""
    def reply(message: Message, rnd: int) -> Message:
        out = plus(shift)(message, rnd)
        out.content["metrics"]["num-examples"] = examples
        return out
    return reply


def test_one_node_cannot_dominate_fedavg_by_claiming_num_examples(tmp_path):
    """Issue 10.8: `num-examples` was only checked > 0, so one node claiming 10^9 records was the average.
    Now the claim is capped at 10 × the round's lower-median claim (here 12 → 120), and the record says so."""
    honest = {1: good(), 2: good()}  # they claim 11 and 12 records
    liar = _run(_config(tmp_path / "liar", num_rounds=1), FakeGrid({**honest, 3: claiming(1e9)}))
    at_cap = _run(_config(tmp_path / "cap", num_rounds=1), FakeGrid({**honest, 3: claiming(120.0)}))
    record = liar.history[0]
    assert record["replies"] == 3 and record["num_examples_cap"] == {"value": 120.0, "factor": 10.0,
                                                                      "capped": {"3": 1e9}}
    assert at_cap.history[0]["num_examples_cap"]["capped"] == {}
    for key in liar.arrays.keys():  # weighted as if it had claimed the cap
        np.testing.assert_allclose(liar.arrays[key].numpy(), at_cap.arrays[key].numpy(), rtol=1e-6)


def test_the_simulate_summary_counts_the_whole_command_and_its_parts():
    """Issue 16.4: the summary's "wall" time left out start-up and shut-down (16 s printed for 28 s)."""
    from fedsafe.server.loop import RunOutcome
    from fedsafe.simulations.report import wall_time_text

    outcome = RunOutcome(arrays=ArrayRecord(), history=[], started_at=108.0, finished_at=124.0)
    assert wall_time_text(outcome, 100.0, 128.5) == (
        "28.5s in all: start-up 8.0s (imports, Ray, the federation's data), rounds 16.0s, "
        "shut-down 4.5s (results, plots, Ray)")
    assert wall_time_text(outcome, 100.0, 128.5, backend="local") == (  # in process: no Ray to name
        "28.5s in all: start-up 8.0s (imports, the federation's data), rounds 16.0s, shut-down 4.5s (results, plots)")
