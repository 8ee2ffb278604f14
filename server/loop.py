"""The coordinator's round loop: send, collect, validate, aggregate, evaluate, record, checkpoint.

Flower's `Strategy.start` has no checkpoints, resume, or per-node view of replies; this loop drives the
same strategy methods (`configure_train`, `aggregate_train`) and adds them.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from statistics import mean
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message

from strategies import (
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
from strategies.state import chain

from .checkpoint import RunState, load_checkpoint, save_checkpoint
from .config import RunConfig
from .early_stopping import EarlyStopping
from .results import ResultsWriter, headline_text
from .sampling import NodeSampler, SampledGrid

log = logging.getLogger("fedsafe.server")

BUDGET_EXHAUSTED = 4001  # the node's error code for a refused round (client.app.BUDGET_EXHAUSTED)

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

    from strategies.client_dp import RunStop

    return (PrivacyBudgetExhausted, RunStop)


def _split_replies(
    replies: list[Message], global_arrays: ArrayRecord, cfg: RunConfig, masked: bool = False, frozen=()
):
    valid, failures, budget_refusals, rejected = [], [], [], []
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error():
            entry = {"node": node, "code": reply.error.code, "reason": reply.error.reason}
            (budget_refusals if reply.error.code == BUDGET_EXHAUSTED else failures).append(entry)
            continue
        try:
            if "metrics" not in reply.content or (not masked and "arrays" not in reply.content):
                raise UpdateRejected("reply lacks 'arrays' or 'metrics'")
            if "num-examples" not in reply.content["metrics"]:
                raise UpdateRejected("metrics lack 'num-examples'")
            if not masked:  # under secure aggregation the server never holds an update to check
                validate_update(global_arrays, reply.content["arrays"], cfg.max_update_norm or None, frozen)
                # nodes do not upload frozen parameters: aggregate whole models, frozen ones unchanged
                reply.content["arrays"] = complete_update(global_arrays, reply.content["arrays"], frozen)
        except UpdateRejected as err:
            rejected.append({"node": node, "reason": str(err)})
            log.warning("rejected update from node %s: %s", node, err)
            continue
        valid.append(reply)
    return valid, failures, budget_refusals, rejected


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
    results = ResultsWriter(out, cfg.to_mapping())
    sampler = NodeSampler(cfg.seed, cfg.fraction_train, cfg.min_nodes, min_sample=cfg.min_train_nodes())
    if cfg.resume:
        state = load_checkpoint(out)
        arrays = ArrayRecord(state.model_state)
        history, run_key, first_round = state.history, state.run_key, state.completed_round + 1
        if state.sampler_state:
            sampler.load_state_dict(state.sampler_state)
        load_strategy_state_dict(strategy, state.strategy_state)
        log.info("resuming run %s after round %d", run_key, state.completed_round)
    else:
        arrays, history, run_key, first_round = initial_arrays, [], uuid.uuid4().hex, 1
        if evaluator is not None:
            history.append({"round": 0, "eval": evaluator(arrays)})
    node_epsilon: dict[int, float] = {}
    for entry in history:
        node_epsilon.update({int(k): v for k, v in entry.get("node_epsilon", {}).items()})
    frozen = _frozen_keys(arrays, cfg)
    stopper = _early_stopping(cfg, history, arrays, evaluator)

    train_config = ConfigRecord({**cfg.train_config(), **model_config, "run-key": run_key})
    masked = any(getattr(link, "hides_updates", False) for link in chain(strategy))
    stop_reason = None
    for rnd in range(first_round, cfg.num_rounds + 1):
        if stopper is not None and stopper.should_stop:
            break
        started = time.perf_counter()
        sampled = sampler.sample(sampler.wait_for_nodes(grid, cfg.round_timeout))
        try:
            messages = list(strategy.configure_train(rnd, arrays, train_config, SampledGrid(grid, sampled)))
        except _stop_exceptions() as err:
            stop_reason = str(err)
            log.warning("run stopped before round %d: %s", rnd, stop_reason)
            break
        # In node order, not arrival order: float sums then do not depend on which actor finished first.
        replies = sorted(grid.send_and_receive(messages, timeout=cfg.round_timeout),
                         key=lambda reply: reply.metadata.src_node_id)
        observe_replies(strategy, rnd, replies)
        valid, failures, refusals, rejected = _split_replies(replies, arrays, cfg, masked, frozen)
        for entry in failures:
            log.warning("node %s failed round %d: %s", entry["node"], rnd, entry["reason"])
        for entry in refusals:
            log.warning("node %s refused round %d: %s", entry["node"], rnd, entry["reason"])

        round_eps = {}
        for reply in valid:
            metrics = reply.content["metrics"]
            if "epsilon" in metrics:
                round_eps[reply.metadata.src_node_id] = float(metrics["epsilon"])
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
            "problems": failures + refusals + rejected,
            **round_report(strategy, rnd),
        }
        if evaluator is not None:
            record["eval"] = evaluator(arrays)
        if stopper is not None and stopper.observe(rnd, record["eval"], arrays):
            record["early_stopped"] = rnd < cfg.num_rounds
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
    return RunOutcome(arrays=arrays, history=history, node_epsilon=node_epsilon, started_at=started_at,
                      stop_reason=stop_reason, best=summary.get("best"))


def _frozen_keys(arrays: ArrayRecord, cfg: RunConfig) -> list[str]:
    """The parameters the run freezes (nodes neither train nor upload them)."""
    from models.transfer import frozen_names, parse_prefixes

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
