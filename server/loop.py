"""The coordinator's round loop: send, collect, validate, aggregate, evaluate, record, checkpoint.

Flower's `Strategy.start` has no checkpoints, resume, or per-node view of replies; this loop drives the
same strategy methods (`configure_train`, `aggregate_train`) and adds them.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from statistics import mean
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message

from strategies import UpdateRejected, load_strategy_state, strategy_state, validate_update

from .checkpoint import CHECKPOINT_NAME, CheckpointError, RunState, load_checkpoint, save_checkpoint
from .config import RunConfig
from .results import ResultsWriter

log = logging.getLogger("fedsafe.server")

BUDGET_EXHAUSTED = 4001  # the node's error code for a refused round (client.app.BUDGET_EXHAUSTED)

Evaluator = Callable[[ArrayRecord], dict[str, float]]
ProgressSink = Callable[[dict[str, Any], RunConfig], None]


@dataclass
class RunOutcome:
    arrays: ArrayRecord
    history: list[dict[str, Any]]
    node_epsilon: dict[int, float] = field(default_factory=dict)


def exchange(grid, messages: list[Message], timeout: float, poll_interval: float):
    """Push `messages`, then poll for their replies until all arrived or `timeout` seconds passed.

    Flower's `Grid.send_and_receive` polls every 3 s; a round's latency is mostly such waits, so this
    polls every `poll_interval` s. Returns (replies, each paired with the node it was sent to — error
    replies made by the SuperLink carry the SuperLink as sender —, node ids that did not reply).
    """
    if not messages:
        return [], []
    destination = {}
    for message_id, message in zip(list(grid.push_messages(messages)), messages):
        if message_id:  # None: Flower could not push it (logged by Flower)
            destination[message_id] = int(message.metadata.dst_node_id)
    unpushed = [int(m.metadata.dst_node_id) for m in messages] if not destination else []
    pending = set(destination)
    deadline = time.monotonic() + timeout
    replies: list[tuple[int, Message]] = []
    while pending:
        for reply in grid.pull_messages(sorted(pending)):
            message_id = reply.metadata.reply_to_message_id
            if message_id in pending:
                pending.discard(message_id)
                replies.append((destination[message_id], reply))
        remaining = deadline - time.monotonic()
        if not pending or remaining <= 0:
            break
        time.sleep(min(poll_interval, remaining))
    return replies, sorted(destination[m] for m in pending) + unpushed


def _split_replies(replies: list[tuple[int, Message]], global_arrays: ArrayRecord, cfg: RunConfig):
    valid, failures, budget_refusals, rejected = [], [], [], []
    for node, reply in replies:
        if reply.has_error():
            entry = {"node": node, "code": reply.error.code, "reason": reply.error.reason}
            (budget_refusals if reply.error.code == BUDGET_EXHAUSTED else failures).append(entry)
            continue
        try:
            content = reply.content
            if "arrays" not in content or "metrics" not in content:
                raise UpdateRejected("reply lacks 'arrays' or 'metrics'")
            if len(content.array_records) != 1 or len(content.metric_records) != 1:
                raise UpdateRejected("reply must hold exactly one ArrayRecord and one MetricRecord")
            examples = content["metrics"].get("num-examples")
            if not isinstance(examples, (int, float)) or not math.isfinite(examples) or examples <= 0:
                raise UpdateRejected(f"metrics lack a positive 'num-examples' (got {examples!r})")
            validate_update(global_arrays, content["arrays"], cfg.max_update_norm or None)
        except UpdateRejected as err:
            rejected.append({"node": node, "reason": str(err)})
            continue
        valid.append((node, reply))
    # Flower's strategies refuse to aggregate replies whose metrics have different keys (the whole round
    # would fail): keep the keys all valid replies share.
    if valid:
        common = set.intersection(*(set(r.content["metrics"].keys()) for _, r in valid))
        for node, reply in valid:
            extra = sorted(set(reply.content["metrics"].keys()) - common)
            if extra:
                log.info("node %s: metrics %s not reported by every node; not aggregated", node, extra)
                for key in extra:
                    del reply.content["metrics"][key]
    # Aggregate in node order: float sums then do not depend on which reply arrived first, so a resumed
    # run reproduces an uninterrupted one bit for bit.
    valid.sort(key=lambda pair: pair[0])
    return [reply for _, reply in valid], failures, budget_refusals, rejected


def check_out_dir(cfg: RunConfig) -> None:
    """A new run must not overwrite an earlier run's checkpoint (that would lose the way to resume it)."""
    path = cfg.out_path / CHECKPOINT_NAME
    if not cfg.resume and path.exists():
        raise CheckpointError(
            f"{path} holds the checkpoint of an earlier run; continue that run with resume=true, "
            "or give this run another out-dir"
        )


def _resume_state(cfg: RunConfig, initial_arrays: ArrayRecord, strategy) -> RunState:
    """The checkpoint to resume from, checked to belong to this run's configuration and model."""
    out = cfg.out_path
    state = load_checkpoint(out)
    changed = cfg.differences(state.config)
    if changed:
        listed = ", ".join(f"{k}: {old!r} → {new!r}" for k, (old, new) in sorted(changed.items()))
        raise CheckpointError(
            f"cannot resume from {out / CHECKPOINT_NAME}: the run config differs from the checkpointed run's "
            f"({listed}); resume with the same settings, or start a new run in another out-dir"
        )
    expected = {k: tuple(v.shape) for k, v in initial_arrays.items()}
    found = {k: tuple(v.shape) for k, v in state.model_state.items()}
    if expected != found:
        raise CheckpointError(
            f"cannot resume from {out / CHECKPOINT_NAME}: its model does not fit {cfg.model!r} "
            f"(parameters {sorted(found)[:4]}… vs {sorted(expected)[:4]}…)"
        )
    load_strategy_state(strategy, state.strategy_state)
    return state


def run_rounds(
    grid,
    cfg: RunConfig,
    strategy,
    initial_arrays: ArrayRecord,
    model_config: dict[str, Any],
    evaluator: Evaluator | None,
    progress: ProgressSink | None = None,
) -> RunOutcome:
    """Run `cfg.num_rounds` rounds (from the checkpoint's next round when `cfg.resume`)."""
    out = cfg.out_path
    if cfg.resume:
        state = _resume_state(cfg, initial_arrays, strategy)
        arrays = ArrayRecord(state.model_state)
        history, run_key, first_round = state.history, state.run_key, state.completed_round + 1
        log.warning("resuming run %s after round %d of %d (checkpoint %s)", run_key, state.completed_round,
                    cfg.num_rounds, out / CHECKPOINT_NAME)
    else:
        check_out_dir(cfg)
        arrays, history, run_key, first_round = initial_arrays, [], uuid.uuid4().hex, 1
        if evaluator is not None:
            history.append({"round": 0, "eval": evaluator(arrays)})
    results = ResultsWriter(out, cfg.to_mapping())
    node_epsilon: dict[int, float] = {}
    for entry in history:
        node_epsilon.update({int(k): v for k, v in entry.get("node_epsilon", {}).items()})

    train_config = ConfigRecord({**cfg.train_config(), **model_config, "run-key": run_key})
    for rnd in range(first_round, cfg.num_rounds + 1):
        started = time.perf_counter()
        messages = list(strategy.configure_train(rnd, arrays, train_config, grid))
        sent_at = time.perf_counter()
        replies, silent = exchange(grid, messages, cfg.round_timeout, cfg.poll_interval)
        wait_seconds = time.perf_counter() - sent_at
        valid, failures, refusals, rejected = _split_replies(replies, arrays, cfg)
        failures += [{"node": node, "code": None, "reason": f"no reply within round-timeout={cfg.round_timeout:g}s"}
                     for node in silent]
        for entry in failures:
            log.warning("round %d: node %s failed: %s", rnd, entry["node"], entry["reason"])
        for entry in refusals:
            log.warning("round %d: node %s refused: %s", rnd, entry["node"], entry["reason"])
        for entry in rejected:
            if hasattr(strategy, "record_rejection"):
                strategy.record_rejection(entry["node"], entry["reason"], rnd)
            else:
                log.warning("round %d: node %s update rejected: %s", rnd, entry["node"], entry["reason"])
        if hasattr(strategy, "record_accepted"):
            for reply in valid:
                strategy.record_accepted(reply.metadata.src_node_id)

        round_eps, startup = {}, {}
        for reply in valid:
            metrics = reply.content["metrics"]
            if "epsilon" in metrics:
                round_eps[reply.metadata.src_node_id] = float(metrics["epsilon"])
            if "startup-seconds" in metrics:
                startup[str(reply.metadata.src_node_id)] = float(metrics["startup-seconds"])
        node_epsilon.update(round_eps)

        aggregated = False
        train_loss = None
        if len(valid) >= cfg.min_replies:
            new_arrays, agg_metrics = strategy.aggregate_train(rnd, valid)
            if new_arrays is not None:
                arrays, aggregated = new_arrays, True
            if agg_metrics is not None and "train-loss" in agg_metrics:
                train_loss = float(agg_metrics["train-loss"])
        else:
            log.warning(
                "round %d skipped: %d valid replies, %d needed (min-replies); the global model is unchanged",
                rnd, len(valid), cfg.min_replies,
            )

        record: dict[str, Any] = {
            "round": rnd,
            "aggregated": aggregated,
            "sent": len(messages),
            "replies": len(valid),
            "failures": len(failures),
            "budget_refusals": len(refusals),
            "rejected": len(rejected),
            "train_loss": train_loss,
            "epsilon_max": max(round_eps.values()) if round_eps else None,
            "epsilon_mean": mean(round_eps.values()) if round_eps else None,
            "node_epsilon": {str(k): v for k, v in round_eps.items()},
            "clientapp_startup_seconds": startup,  # per node: ClientApp process start to first training step
            "problems": failures + refusals + rejected,
        }
        if getattr(strategy, "excluded", None):
            record["excluded"] = sorted(strategy.excluded)
        if evaluator is not None:
            record["eval"] = evaluator(arrays)
        record["wait_seconds"] = wait_seconds  # pushing the messages until the last reply (or the timeout)
        record["seconds"] = time.perf_counter() - started
        history.append(record)
        results.write(history)
        save_checkpoint(
            out,
            RunState(run_key=run_key, completed_round=rnd, model_state=arrays.to_torch_state_dict(),
                     history=history, config=cfg.to_mapping(), strategy_state=strategy_state(strategy)),
        )
        if progress is not None:
            progress(record, cfg)

    summary = {
        "final": history[-1].get("eval", {}) if history else {},
        "epsilon_max_all_nodes": max(node_epsilon.values()) if node_epsilon else None,
        "nodes_seen": len(node_epsilon),
    }
    results.write(history, summary)
    results.plot([h for h in history if h["round"] >= 0])
    return RunOutcome(arrays=arrays, history=history, node_epsilon=node_epsilon)


def progress_line(record: dict[str, Any], cfg: RunConfig) -> str:
    ev = record.get("eval", {})
    eps = record.get("epsilon_max")
    eps_text = "ε off" if not cfg.dp else (
        f"ε max {eps:.2f} mean {record['epsilon_mean']:.2f}" if eps is not None else "ε n/a"
    )
    parts = [
        f"round {record['round']:>3}/{cfg.num_rounds}",
        f"acc {ev.get('accuracy', float('nan')):.3f}",
        f"loss {ev.get('loss', float('nan')):.3f}",
        eps_text,
        f"replies {record['replies']}/{record['sent']}",
    ]
    if record["budget_refusals"]:
        parts.append(f"{record['budget_refusals']} out of budget")
    if record["failures"] or record["rejected"]:
        parts.append(f"{record['failures']} failed, {record['rejected']} rejected")
    parts.append(f"{record['seconds']:.1f}s")
    return " | ".join(parts)


def print_progress(record: dict[str, Any], cfg: RunConfig) -> None:
    print(progress_line(record, cfg), flush=True)
