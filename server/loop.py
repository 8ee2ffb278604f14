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

from fedsafe.protocol import BUDGET_EXHAUSTED, RUN_KEY

from fedsafe.strategies import (
    UpdateRejected,
    complete_update,
    conform_arrays,
    keep_frozen,
    load_strategy_state_dict,
    observe_replies,
    round_report,
    strategy_state_dict,
    validate_update,
)
from fedsafe.strategies.state import chain

from .checkpoint import CHECKPOINT_NAME, CheckpointError, RunState, load_checkpoint, save_checkpoint
from .config import RunConfig
from .early_stopping import EarlyStopping
from .results import ResultsWriter, headline_text
from .sampling import NodeSampler, SampledGrid

log = logging.getLogger("fedsafe.server")


Evaluator = Callable[[ArrayRecord], dict[str, float]]
ProgressSink = Callable[[dict[str, Any], RunConfig], None]


@dataclass
class RunOutcome:
    arrays: ArrayRecord
    history: list[dict[str, Any]]
    node_epsilon: dict[int, float] = field(default_factory=dict)
    started_at: float = 0.0  # time.perf_counter() when the round loop began
    stop_reason: str | None = None  # why the run ended before its last round (a privacy budget), if it did
    best: dict[str, Any] | None = None  # early stopping: the best round, its metrics, best_model.pt


def _stop_exceptions() -> tuple[type[BaseException], ...]:
    """What a strategy raises, before a round starts, to end the run cleanly."""
    from flwr.serverapp.exception import PrivacyBudgetExhausted

    from fedsafe.strategies.client_dp import RunStop

    return (PrivacyBudgetExhausted, RunStop)


def exchange(grid, messages: list[Message], timeout: float, poll_interval: float):
    """Push `messages`, then poll for their replies until all arrived or `timeout` seconds passed.

    Flower's `Grid.send_and_receive` polls every 3 s; a round's latency is mostly such waits, so this
    polls every `poll_interval` s. Returns (replies, each paired with the node it was sent to — error
    replies made by the SuperLink carry the SuperLink as sender —, node ids that did not reply).
    """
    if not messages:
        return [], []
    if not hasattr(grid, "pull_messages"):  # an in-process grid (simulations/local.py)
        replies = list(grid.send_and_receive(messages, timeout=timeout))
        answered = {int(r.metadata.src_node_id) for r in replies}
        return ([(int(r.metadata.src_node_id), r) for r in replies],
                sorted(int(m.metadata.dst_node_id) for m in messages if int(m.metadata.dst_node_id) not in answered))
    destination = {}
    for message_id, message in zip(list(grid.push_messages(messages)), messages):
        if message_id:  # None: Flower could not push it (logged by Flower)
            destination[message_id] = int(message.metadata.dst_node_id)
    unpushed = [int(m.metadata.dst_node_id) for m in messages] if not destination else []
    pending = set(destination)
    deadline = time.monotonic() + timeout
    replies: list[tuple[int, Message]] = []

    def pull() -> None:
        for reply in grid.pull_messages(sorted(pending)):
            message_id = reply.metadata.reply_to_message_id
            if message_id in pending:
                pending.discard(message_id)
                replies.append((destination[message_id], reply))

    while pending:
        pulled_at = time.monotonic()
        pull()
        remaining = deadline - time.monotonic()
        if not pending or remaining <= 0:
            break
        time.sleep(min(poll_interval, remaining))
    if pending and pulled_at < deadline:
        # The last pull began in time but outlasted the deadline: Flower retries a reply whose upload
        # never finished (a node killed mid-upload) for minutes before giving up on it. Replies that
        # arrived meanwhile were in time; collect them rather than call their nodes silent.
        pull()
    return replies, sorted(destination[m] for m in pending) + unpushed


def _split_replies(
    replies: list[tuple[int, Message]], global_arrays: ArrayRecord, cfg: RunConfig, masked: bool = False, frozen=()
):
    valid, failures, budget_refusals, rejected = [], [], [], []
    for node, reply in replies:
        if reply.has_error():
            entry = {"node": node, "code": reply.error.code, "reason": reply.error.reason}
            (budget_refusals if reply.error.code == BUDGET_EXHAUSTED else failures).append(entry)
            continue
        try:
            content = reply.content
            if "metrics" not in content or (not masked and "arrays" not in content):
                raise UpdateRejected("reply lacks 'arrays' or 'metrics'")
            # (SecAgg+ replies carry the protocol's records beside the metrics, and no plain arrays.)
            if not masked and (len(content.metric_records) != 1 or len(content.array_records) != 1):
                raise UpdateRejected("reply must hold exactly one ArrayRecord and one MetricRecord")
            examples = content["metrics"].get("num-examples")
            if not isinstance(examples, (int, float)) or not math.isfinite(examples) or examples <= 0:
                raise UpdateRejected(f"metrics lack a positive 'num-examples' (got {examples!r})")
            if not masked:  # under secure aggregation the server never holds an update to check
                validate_update(global_arrays, content["arrays"], cfg.max_update_norm or None, frozen)
                # nodes do not upload frozen parameters: aggregate whole models, frozen ones unchanged
                content["arrays"] = complete_update(global_arrays, content["arrays"], frozen)
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
    load_strategy_state_dict(strategy, state.strategy_state)
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
    started_at = time.perf_counter()
    out = cfg.out_path
    sampler = NodeSampler(cfg.seed, cfg.fraction_train, cfg.min_nodes, min_sample=cfg.min_train_nodes())
    if cfg.resume:
        state = _resume_state(cfg, initial_arrays, strategy)
        arrays = ArrayRecord(state.model_state)
        history, run_key, first_round = state.history, state.run_key, state.completed_round + 1
        if state.sampler_state:
            sampler.load_state_dict(state.sampler_state)
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
    frozen = _frozen_keys(arrays, cfg)
    stopper = _early_stopping(cfg, history, arrays, evaluator)

    train_config = ConfigRecord({**cfg.train_config(), **model_config, RUN_KEY: run_key})
    masked = any(getattr(link, "hides_updates", False) for link in chain(strategy))
    stop_reason = None
    for rnd in range(first_round, cfg.num_rounds + 1):
        if stopper is not None and stopper.should_stop:
            break
        started = time.perf_counter()
        strikes = next((link for link in chain(strategy) if hasattr(link, "record_rejection")), None)
        excluded = set(strikes.excluded) if strikes is not None else set()
        eligible = [n for n in sampler.wait_for_nodes(grid, cfg.round_timeout) if n not in excluded]
        if not eligible:
            stop_reason = f"every connected node is excluded for rejected updates: {sorted(excluded)}"
            log.warning("run stopped before round %d: %s", rnd, stop_reason)
            break
        sampled = sampler.sample(eligible)  # excluded nodes take no sampling slot
        try:
            messages = list(strategy.configure_train(rnd, arrays, train_config, SampledGrid(grid, sampled)))
        except _stop_exceptions() as err:
            stop_reason = str(err)
            log.warning("run stopped before round %d: %s", rnd, stop_reason)
            break
        sent_at = time.perf_counter()
        replies, silent = exchange(grid, messages, cfg.round_timeout, cfg.poll_interval)
        wait_seconds = time.perf_counter() - sent_at
        observe_replies(strategy, rnd, [reply for _, reply in replies])
        valid, failures, refusals, rejected = _split_replies(replies, arrays, cfg, masked, frozen)
        failures += [{"node": node, "code": None, "reason": f"no reply within round-timeout={cfg.round_timeout:g}s"}
                     for node in silent]
        for entry in failures:
            log.warning("round %d: node %s failed: %s", rnd, entry["node"], entry["reason"])
        for entry in refusals:
            log.warning("round %d: node %s refused: %s", rnd, entry["node"], entry["reason"])
        for entry in rejected:
            if strikes is not None:
                strikes.record_rejection(entry["node"], entry["reason"], rnd)
            else:
                log.warning("round %d: node %s update rejected: %s", rnd, entry["node"], entry["reason"])
        if strikes is not None:
            for reply in valid:
                strikes.record_accepted(reply.metadata.src_node_id)

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
                arrays, aggregated = keep_frozen(arrays, conform_arrays(arrays, new_arrays), frozen), True
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
            "clientapp_startup_seconds": startup,  # per node: ClientApp process start to its libraries loaded
            "problems": failures + refusals + rejected,
            **round_report(strategy, rnd),
        }
        if getattr(strategy, "excluded", None):
            record["excluded"] = sorted(strategy.excluded)
        if evaluator is not None:
            record["eval"] = evaluator(arrays)
        if stopper is not None and stopper.observe(rnd, record["eval"], arrays):
            record["early_stopped"] = rnd < cfg.num_rounds
        record["wait_seconds"] = wait_seconds  # pushing the messages until the last reply (or the timeout)
        record["seconds"] = time.perf_counter() - started
        history.append(record)
        results.write(history)
        results.add_round(record)
        save_checkpoint(
            out,
            RunState(run_key=run_key, completed_round=rnd, model_state=arrays.to_torch_state_dict(),
                     history=history, config=cfg.to_mapping(), sampler_state=sampler.state_dict(),
                     strategy_state=strategy_state_dict(strategy)),
        )
        if progress is not None:
            progress(record, cfg)

    summary = {
        "final": history[-1].get("eval", {}) if history else {},
        "epsilon_max_all_nodes": max(node_epsilon.values()) if node_epsilon else None,
        "nodes_seen": len(node_epsilon),
        "stop_reason": stop_reason,
    }
    if history and history[-1].get("client_level_epsilon") is not None:
        summary["client_level_epsilon"] = history[-1]["client_level_epsilon"]
    if stopper is not None:
        summary["best"] = stopper.summary()
        summary["best"]["stopped_early"] = any(h.get("early_stopped") for h in history)
    results.write(history, summary)
    results.write_node_epsilon(history)
    results.plot(history)
    from fedsafe.after.card import write_card_at_end_of_run

    write_card_at_end_of_run(out)  # MODEL_CARD.md + model_card.json: the run's privacy record and metrics
    return RunOutcome(arrays=arrays, history=history, node_epsilon=node_epsilon, started_at=started_at,
                      stop_reason=stop_reason, best=summary.get("best"))


def _frozen_keys(arrays: ArrayRecord, cfg: RunConfig) -> list[str]:
    """The parameters the run freezes (nodes neither train nor upload them)."""
    from fedsafe.models.transfer import frozen_names, parse_prefixes

    return frozen_names(arrays.keys(), parse_prefixes(cfg.freeze))


def _early_stopping(cfg: RunConfig, history, arrays: ArrayRecord, evaluator) -> EarlyStopping | None:
    """The run's early stopping (None when off), caught up with `history`; best_model.pt written for
    the initial model of a new run."""
    if not cfg.early_stopping_patience:
        return None
    if evaluator is None:
        from .config import ConfigError

        raise ConfigError("early stopping needs the coordinator's held-out data (central evaluation)")
    stopper = EarlyStopping(cfg.out_path, cfg.early_stopping_patience, cfg.early_stopping_metric)
    stopper.replay(history)
    if not cfg.resume:
        stopper.keep(arrays)  # the initial model is the best so far
    return stopper


def progress_line(record: dict[str, Any], cfg: RunConfig) -> str:
    ev = record.get("eval", {})
    eps = record.get("epsilon_max")
    eps_text = "ε off" if not cfg.dp else (
        f"ε max {eps:.2f} mean {record['epsilon_mean']:.2f}" if eps is not None else "ε n/a"
    )
    parts = [
        f"round {record['round']:>3}/{cfg.num_rounds}",
        headline_text(ev),
        eps_text,
        f"replies {record['replies']}/{record['sent']}",
    ]
    if record.get("client_level_epsilon") is not None:
        parts.append(f"client-level ε {record['client_level_epsilon']:.2f}")
    if record.get("secagg"):
        parts.append("secagg " + ("abandoned" if "abandoned" in record["secagg"]
                                   else f"{record['secagg']['summed']} summed, {record['secagg']['dropped']} dropped"))
    if record.get("skipped"):
        parts.append(f"{record['skipped']} skipped (budget)")
    if record["budget_refusals"]:
        parts.append(f"{record['budget_refusals']} out of budget")
    if record["failures"] or record["rejected"]:
        parts.append(f"{record['failures']} failed, {record['rejected']} rejected")
    parts.append(f"{record['seconds']:.1f}s")
    return " | ".join(parts)


def print_progress(record: dict[str, Any], cfg: RunConfig) -> None:
    print(progress_line(record, cfg), flush=True)
