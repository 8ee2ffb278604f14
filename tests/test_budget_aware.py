"""Budget-aware selection: nodes whose ledger cannot afford the next round are not sampled."""

from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict

from fed_harness import federation, run
from fedsafe.simulations.local import NODE_ID_BASE
from fedsafe.strategies.budget_aware import BudgetAwareSelection


def test_nodes_report_their_cap_and_projection_and_an_exhausted_node_is_skipped_with_its_reason(tmp_path):
    # Run A spends ε ≈ 1 on every node's data.
    cfg, grid, strategy = federation(tmp_path, num_rounds=2, epsilon=1.0, budget_aware=True)
    first = run(cfg, grid, strategy)
    reply_metrics = [r.content["metrics"] for r in grid.received if not r.has_error()]
    assert all({"max-epsilon", "epsilon-next", "run-epsilon", "run-epsilon-next"} <= set(m) for m in reply_metrics)
    assert all(m["epsilon-next"] > m["epsilon"] for m in reply_metrics)
    assert first.history[-1]["skipped"] == 0

    # Run B on the same ledgers: node 0's operator has lowered its cap below what it already spent; the
    # others raised theirs to fund run B (at a cap of 1 their σ would drown the update: refused for noise).
    # (A new run may not overwrite run A's checkpoint: remove it, keep the ledgers beside it.)
    (tmp_path / "run" / "checkpoint.pt").unlink()
    cfg_b, grid, strategy = federation(tmp_path, num_rounds=3, epsilon=1.0, budget_aware=True,
                                       node_caps={0: 0.9, 1: 3.0, 2: 3.0, 3: 3.0, 4: 3.0},
                                       out_dir=str(tmp_path / "run"))
    second = run(cfg_b, grid, strategy)
    r1, r2, r3 = second.history[1:]
    assert r1["budget_refusals"] == 1 and r1["skipped"] == 0  # it had not told us yet
    for later in (r2, r3):
        assert later["sent"] == 4 and later["budget_refusals"] == 0 and later["aggregated"]
        assert later["skipped_nodes"][0]["node"] == NODE_ID_BASE
        assert "refused its last round: privacy budget exhausted" in later["skipped_nodes"][0]["reason"]


def test_a_node_whose_next_round_would_pass_its_cap_is_skipped(flower_task_identity):
    from flwr.serverapp.strategy import FedAvg

    wrapper = BudgetAwareSelection(FedAvg(fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=3))
    sent = [Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=n, message_type="train") for n in (1, 2, 3)]
    figures = {
        1: {"epsilon": 2.5, "max-epsilon": 3.0, "epsilon-next": 3.2, "run-epsilon": 3.0, "run-epsilon-next": 3.2},
        2: {"epsilon": 1.0, "max-epsilon": 3.0, "epsilon-next": 1.5, "run-epsilon": 3.0, "run-epsilon-next": 1.5},
    }
    replies = [Message(RecordDict({"metrics": MetricRecord({"num-examples": 10, **figures[n]})}), reply_to=sent[n - 1])
               for n in (1, 2)]
    replies.append(Message(Error(code=4001, reason="privacy budget exhausted: cap 3"), reply_to=sent[2]))
    wrapper.observe_replies(1, replies)

    class Grid:
        def get_node_ids(self):
            return [1, 2, 3]

    from flwr.app import Array, ArrayRecord
    import numpy as np

    messages = list(wrapper.configure_train(2, ArrayRecord({"w": Array(np.zeros(2, np.float32))}),
                                            ConfigRecord({}), Grid()))
    assert [m.metadata.dst_node_id for m in messages] == [2]
    report = wrapper.round_report(2)
    reasons = {s["node"]: s["reason"] for s in report["skipped_nodes"]}
    assert "would reach ε=3.200, over its cap ε=3" in reasons[1]
    assert "refused its last round" in reasons[3]
    # The view of the ledgers is part of the checkpoint.
    restored = BudgetAwareSelection(FedAvg(fraction_evaluate=0.0))
    restored.fedsafe_load_state_dict(wrapper.fedsafe_state_dict())
    assert restored.why_not(1) == wrapper.why_not(1) and restored.why_not(2) is None
