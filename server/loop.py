"""The coordinator's round loop: sample → send and collect → validate → aggregate → evaluate → record
and checkpoint, one named function per phase (`run_rounds` reads as that sequence).

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

from fedsafe.protocol import (
    ARRAYS, BUDGET_EXHAUSTED, EPSILON, METRICS, NOISE_MULTIPLIER, NOISE_TOO_HIGH, NUM_EXAMPLES, REFUSALS,
    RUN_EPSILON, RUN_KEY, SAMPLE_RATE, STARTUP_SECONDS,
)
from fedsafe.strategies import (
    NormBound,
    StrikesStrategy,
    UpdateRejected,
    complete_update,
    conform_arrays,
    keep_frozen,
    load_strategy_state_dict,
    observe_replies,
    round_report,
    strategy_state_dict,
    num_examples_cap,
    update_norm_bound,
    validate_dp_metrics,
    validate_update,
)
from fedsafe.strategies.state import excluded_nodes, find_link, hides_updates
from fedsafe.strategies.validation import NUM_EXAMPLES_FACTOR, global_reference
from fedsafe.traffic import MeteredGrid, Traffic

from .checkpoint import CHECKPOINT_NAME, CheckpointError, RunState, load_checkpoint, save_checkpoint
from .config import RunConfig
from .early_stopping import EarlyStopping
from .node_names import NodeNames
from .results import ResultsWriter, headline_text
from .run_dir import reused_out_dir
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
    finished_at: float = 0.0  # time.perf_counter() when the last round (and the results) were written
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


@dataclass
class Collected:
    """What came back for one round's messages."""

    replies: list[tuple[int, Message]]  # (the node a message went to, its reply)
    silent: list[int]  # nodes that did not reply within the round timeout
    wait_seconds: float  # pushing the messages until the last reply (or the timeout)


@dataclass
class Checked:
    """One round's replies after validation: the updates to aggregate and every problem, per node."""

    valid: list[Message] = field(default_factory=list)  # in node order
    valid_nodes: list[int] = field(default_factory=list)  # the nodes they were sent to, in the same order
    failures: list[dict[str, Any]] = field(default_factory=list)  # error replies and silent nodes
    refusals: list[dict[str, Any]] = field(default_factory=list)  # nodes that refused the round for budget
    rejected: list[dict[str, Any]] = field(default_factory=list)  # updates that failed validation
    # Each valid reply's own figures, read before the metrics are cut down to the keys every reply shares,
    # so what one node reports never depends on what the others sent.
    epsilon: dict[int, float] = field(default_factory=dict)  # lifetime ε: the node's ledger, all runs on its data
    run_grant: dict[int, float] = field(default_factory=dict)  # the ε each node granted this run
    noise: dict[int, dict[str, float]] = field(default_factory=dict)  # each node's σ and q, as its ledger fixed them
    startup_seconds: dict[int, float] = field(default_factory=dict)
    norm_bound: NormBound | None = None  # the bound the round's updates were held to (None: SecAgg+)
    update_norms: dict[int, float] = field(default_factory=dict)  # each checked update's distance from the model
    examples_cap: dict[str, Any] | None = None  # the num-examples cap and whom it capped (None: SecAgg+)

    @property
    def problems(self) -> list[dict[str, Any]]:
        return self.failures + self.refusals + self.rejected


class RunStopped(RuntimeError):
    """The run ends cleanly before a round (a privacy budget, every node excluded); the message says why."""


def _decode_compressed(content, global_arrays: ArrayRecord, frozen) -> None:
    """compress-updates: replace the node's 8-bit codes by the update they encode, against the global model
    this coordinator sent (fedsafe.update_compression; post-processing of the node's DP output, no ε).
    UpdateRejected names what is malformed: a strike like any invalid update."""
    from fedsafe.update_compression import CompressionError, decode

    if not isinstance(content.get(ARRAYS), ArrayRecord):
        raise UpdateRejected(f"reply lacks '{ARRAYS}'")
    try:
        content[ARRAYS] = decode(content[ARRAYS], global_arrays, frozen)
    except CompressionError as err:
        raise UpdateRejected(f"malformed compressed update: {err}") from None


def _check_reply(reply: Message, global_arrays: ArrayRecord, cfg: RunConfig, masked: bool, frozen,
                 reference=None) -> float | None:
    """Raise UpdateRejected unless `reply` is an update fit to aggregate (decodes a compressed update and
    completes frozen arrays in place); returns its norm (None under secure aggregation), which the round's
    bound is checked against later."""
    content = reply.content
    if cfg.compress_updates and not masked:
        _decode_compressed(content, global_arrays, frozen)
    if METRICS not in content or (not masked and ARRAYS not in content):
        raise UpdateRejected(f"reply lacks '{ARRAYS}' or '{METRICS}'")
    # (SecAgg+ replies carry the protocol's records beside the metrics, and no plain arrays.)
    if not masked and (len(content.metric_records) != 1 or len(content.array_records) != 1):
        raise UpdateRejected("reply must hold exactly one ArrayRecord and one MetricRecord")
    examples = content[METRICS].get(NUM_EXAMPLES)
    if not isinstance(examples, (int, float)) or not math.isfinite(examples) or examples <= 0:
        raise UpdateRejected(f"metrics lack a positive '{NUM_EXAMPLES}' (got {examples!r})")
    if cfg.dp:
        validate_dp_metrics(content[METRICS])
    if masked:  # under secure aggregation the server never holds an update to check
        return None
    norm = validate_update(global_arrays, content[ARRAYS], None, frozen, reference)
    # nodes do not upload frozen parameters: aggregate whole models, frozen ones unchanged
    content[ARRAYS] = complete_update(global_arrays, content[ARRAYS], frozen)
    return norm


def _enforce_norm_bound(candidates: list[tuple[int, Message, float | None]], cfg: RunConfig,
                        checked: Checked) -> list[tuple[int, Message]]:
    """The candidates within the round's update-norm bound (recorded in `checked`); the others rejected."""
    examples = {node: float(reply.content[METRICS][NUM_EXAMPLES]) for node, reply, _ in candidates}
    norms = {node: norm for node, _, norm in candidates if norm is not None}
    if not norms:  # no update, or SecAgg+: nothing the server can bound
        return [(node, reply) for node, reply, _ in candidates]
    bound = update_norm_bound([(norms[n], examples[n]) for n in norms], cfg.batch_size, cfg.max_update_norm)
    checked.norm_bound, checked.update_norms = bound, dict(sorted(norms.items()))
    kept = []
    for node, reply, norm in candidates:
        limit = bound.for_node(examples[node])
        if norm > limit:
            checked.rejected.append({"node": node, "reason": f"update norm {norm:.4g} exceeds the bound {limit:.4g} "
                                                             f"({bound.source})"})
        else:
            kept.append((node, reply))
    return kept


def _cap_num_examples(valid: list[tuple[int, Message]], checked: Checked, names: NodeNames) -> None:
    """Cap each valid update's FedAvg weight (`num-examples`) at the round's cap, in place; record it.
    (Under SecAgg+ the nodes weight their masked updates themselves, with Flower's own weight cap.)"""
    if not valid:
        return
    cap = num_examples_cap(float(reply.content[METRICS][NUM_EXAMPLES]) for _, reply in valid)
    capped = {}
    for node, reply in valid:
        claimed = float(reply.content[METRICS][NUM_EXAMPLES])
        if claimed > cap:
            capped[str(node)] = claimed
            reply.content[METRICS][NUM_EXAMPLES] = cap
            log.warning("node %s claims num-examples=%g; its update is weighted as %g (the round's cap: "
                        "%g × the lower-median claim)", names.label(node), claimed, cap, NUM_EXAMPLES_FACTOR)
    checked.examples_cap = {"value": cap, "factor": NUM_EXAMPLES_FACTOR, "capped": capped}


def _keep_shared_metrics(valid: list[tuple[int, Message]], names: NodeNames) -> None:
    """Flower's strategies refuse to aggregate replies whose metrics have different keys (the whole round
    would fail): keep the keys all valid replies share."""
    if not valid:
        return
    common = set.intersection(*(set(r.content[METRICS].keys()) for _, r in valid))
    for node, reply in valid:
        extra = sorted(set(reply.content[METRICS].keys()) - common)
        if extra:
            log.info("node %s: metrics %s not reported by every node; not aggregated", names.label(node), extra)
            for key in extra:
                del reply.content[METRICS][key]


def validate_replies(
    collected: Collected, global_arrays: ArrayRecord, cfg: RunConfig, masked: bool = False, frozen=(),
    names: NodeNames | None = None,
) -> Checked:
    """Sort the round's replies into valid updates, failures, budget refusals and rejected updates
    (`names`: what the log calls the nodes)."""
    names = names if names is not None else NodeNames()
    checked = Checked()
    candidates: list[tuple[int, Message, float | None]] = []
    reference = None  # the global model as every update is compared with it, once a round
    for node, reply in collected.replies:
        if reply.has_error():
            entry = {"node": node, "code": reply.error.code, "reason": reply.error.reason}
            (checked.refusals if reply.error.code == BUDGET_EXHAUSTED else checked.failures).append(entry)
            continue
        try:
            if reference is None and not masked:
                reference = global_reference(global_arrays)
            candidates.append((node, reply, _check_reply(reply, global_arrays, cfg, masked, frozen, reference)))
        except UpdateRejected as err:
            checked.rejected.append({"node": node, "reason": str(err)})
    valid = _enforce_norm_bound(candidates, cfg, checked)
    for node, reply in valid:
        metrics = reply.content[METRICS]
        if EPSILON in metrics:
            checked.epsilon[node] = float(metrics[EPSILON])
        if RUN_EPSILON in metrics:
            checked.run_grant[node] = float(metrics[RUN_EPSILON])
        if NOISE_MULTIPLIER in metrics:
            checked.noise[node] = {"noise_multiplier": float(metrics[NOISE_MULTIPLIER]),
                                   **({"sample_rate": float(metrics[SAMPLE_RATE])} if SAMPLE_RATE in metrics else {})}
        if STARTUP_SECONDS in metrics:
            checked.startup_seconds[node] = float(metrics[STARTUP_SECONDS])
    checked.failures += [
        {"node": node, "code": None, "reason": f"no reply within round-timeout={cfg.round_timeout:g}s"}
        for node in collected.silent
    ]
    if not masked:
        _cap_num_examples(valid, checked, names)
    _keep_shared_metrics(valid, names)
    # Aggregate in node order: float sums then do not depend on which reply arrived first, so a resumed
    # run reproduces an uninterrupted one bit for bit.
    valid.sort(key=lambda pair: pair[0])
    checked.valid = [reply for _, reply in valid]
    checked.valid_nodes = [node for node, _ in valid]
    return checked


def check_out_dir(cfg: RunConfig, how_to_resume: str = "resume=true") -> None:
    """A new run must not overwrite an earlier run's checkpoint (that would lose the way to resume it)."""
    reason = reused_out_dir(cfg.out_path, cfg.resume, how_to_resume)
    if reason:
        raise CheckpointError(reason)


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


@dataclass
class _Run:
    """What the loop carries from round to round."""

    cfg: RunConfig
    strategy: Any
    sampler: NodeSampler
    arrays: ArrayRecord
    history: list[dict[str, Any]]
    run_key: str
    first_round: int
    results: ResultsWriter
    frozen: list[str]
    stopper: EarlyStopping | None
    train_config: ConfigRecord
    masked: bool  # the server never sees an update in the clear (SecAgg+)
    node_epsilon: dict[int, float] = field(default_factory=dict)  # every node's latest reported ε
    names: NodeNames = field(default_factory=NodeNames)  # what results and log lines call each node


def start_run(cfg: RunConfig, strategy, initial_arrays: ArrayRecord, model_config: dict[str, Any],
              evaluator: Evaluator | None) -> _Run:
    """A new run (round 0 evaluated), or the checkpointed run resumed when `cfg.resume`."""
    sampler = NodeSampler(cfg.seed, cfg.fraction_train, cfg.min_nodes, min_sample=cfg.min_train_nodes())
    if cfg.resume:
        state = _resume_state(cfg, initial_arrays, strategy)
        arrays = ArrayRecord(state.model_state)
        history, run_key, first_round = state.history, state.run_key, state.completed_round + 1
        if state.sampler_state:
            sampler.load_state_dict(state.sampler_state)
        log.warning("resuming run %s after round %d of %d (checkpoint %s)", run_key, state.completed_round,
                    cfg.num_rounds, cfg.out_path / CHECKPOINT_NAME)
    else:
        check_out_dir(cfg)
        arrays, history, run_key, first_round = initial_arrays, [], uuid.uuid4().hex, 1
        if evaluator is not None:
            history.append({"round": 0, "eval": evaluator(arrays)})
    run = _Run(
        cfg=cfg, strategy=strategy, sampler=sampler, arrays=arrays, history=history, run_key=run_key,
        first_round=first_round, results=ResultsWriter(cfg.out_path, cfg.to_mapping()),
        frozen=_frozen_keys(arrays, cfg), stopper=_early_stopping(cfg, history, arrays, evaluator),
        train_config=ConfigRecord({**cfg.train_config(), **model_config, RUN_KEY: run_key}),
        masked=hides_updates(strategy),
        names=NodeNames({k: v for entry in history for k, v in entry.get("node_names", {}).items()}),
    )
    for entry in history:
        run.node_epsilon.update({int(k): v for k, v in entry.get("node_epsilon", {}).items()})
    return run


def sample_round(run: _Run, grid, rnd: int) -> list[Message]:
    """The round's train messages to the sampled nodes; RunStopped when no round can start."""
    excluded = excluded_nodes(run.strategy)
    eligible = [n for n in run.sampler.wait_for_nodes(grid, run.cfg.round_timeout) if n not in excluded]
    run.names.learn(grid)  # nodes registered since the last round
    if not eligible:
        raise RunStopped(f"every connected node is excluded for rejected updates: {run.names.labels(sorted(excluded))}")
    sampled = run.sampler.sample(eligible)  # excluded nodes take no sampling slot
    try:
        return list(run.strategy.configure_train(rnd, run.arrays, run.train_config, SampledGrid(grid, sampled)))
    except _stop_exceptions() as err:
        raise RunStopped(str(err)) from None


def send_and_collect(grid, messages: list[Message], cfg: RunConfig) -> Collected:
    sent_at = time.perf_counter()
    replies, silent = exchange(grid, messages, cfg.round_timeout, cfg.poll_interval)
    return Collected(replies, silent, time.perf_counter() - sent_at)


def report_problems(strategy, rnd: int, checked: Checked, names: NodeNames | None = None) -> None:
    """Log every node's problem (by `names`' labels) and tell the strikes wrapper (if any) which updates it
    rejected or took."""
    label = (names if names is not None else NodeNames()).label
    if checked.norm_bound is not None:
        log.info("round %d: update-norm bound: %s", rnd, checked.norm_bound.source)
    for entry in checked.failures:
        log.warning("round %d: node %s failed: %s", rnd, label(entry["node"]), entry["reason"])
    for entry in checked.refusals:
        log.warning("round %d: node %s refused: %s", rnd, label(entry["node"]), entry["reason"])
    strikes = find_link(strategy, StrikesStrategy)
    for entry in checked.rejected:
        if strikes is not None:
            strikes.record_rejection(entry["node"], entry["reason"], rnd, label=label(entry["node"]))
        else:
            log.warning("round %d: node %s update rejected: %s", rnd, label(entry["node"]), entry["reason"])
    if strikes is not None:
        for node in checked.valid_nodes:
            strikes.record_accepted(node)


def aggregate_round(run: _Run, rnd: int, checked: Checked) -> bool:
    """Aggregate the valid updates into the global model (when there are min-replies of them); whether it did.
    (Nodes send no training loss: un-noised, it is outside the DP guarantee.)"""
    if len(checked.valid) < run.cfg.min_replies:
        log.warning(
            "round %d skipped: %d valid replies, %d needed (min-replies); the global model is unchanged",
            rnd, len(checked.valid), run.cfg.min_replies,
        )
        return False
    new_arrays, _ = run.strategy.aggregate_train(rnd, checked.valid)
    if new_arrays is None:
        return False
    run.arrays = keep_frozen(run.arrays, conform_arrays(run.arrays, new_arrays), run.frozen)
    return True


def round_record(run: _Run, rnd: int, messages: list[Message], collected: Collected, checked: Checked,
                 aggregated: bool, traffic: Traffic) -> dict[str, Any]:
    """The round's entry in the results: who replied, what failed and why, the nodes' ε, the bytes moved."""
    round_eps = checked.epsilon
    run.node_epsilon.update(round_eps)
    strategy_report = round_report(run.strategy, rnd)
    mentioned = [int(m.metadata.dst_node_id) for m in messages] + list(strategy_report.get("excluded", []))
    return {
        "round": rnd,
        "aggregated": aggregated,
        "sent": len(messages),
        "replies": len(checked.valid),
        "failures": len(checked.failures),
        "budget_refusals": len(checked.refusals),
        "noise_refusals": len(noise_refusals(checked)),
        "rejected": len(checked.rejected),
        "epsilon_max": max(round_eps.values()) if round_eps else None,
        "epsilon_mean": mean(round_eps.values()) if round_eps else None,
        "node_epsilon": {str(k): v for k, v in sorted(round_eps.items())},
        "node_noise": {str(k): v for k, v in sorted(checked.noise.items())},  # σ and q per node (model card)
        # the ε the nodes granted this run (their lifetime ε above also counts earlier runs on their data)
        "run_epsilon_grant": ({"min": min(checked.run_grant.values()), "max": max(checked.run_grant.values())}
                              if checked.run_grant else None),
        "clientapp_startup_seconds": {str(k): v for k, v in sorted(checked.startup_seconds.items())},  # per node: ClientApp process start to its libraries loaded
        "problems": [run.names.with_name(entry) for entry in checked.problems],
        # the name the coordinator registered each node under (its id stays the key everywhere else)
        "node_names": run.names.of(mentioned),
        "update_norm_bound": checked.norm_bound.record() if checked.norm_bound is not None else None,
        "update_norms": {str(k): v for k, v in checked.update_norms.items()},
        "num_examples_cap": checked.examples_cap,
        **strategy_report,
        "wait_seconds": collected.wait_seconds,
        # every message's content as Flower serialises it (fedsafe.traffic), SecAgg+'s protocol stages included
        "upload_bytes": traffic.upload_bytes,  # the nodes' replies (compress-updates shrinks them)
        "download_bytes": traffic.download_bytes,  # the server's requests
    }


def noise_refusals(checked: Checked) -> list[dict[str, Any]]:
    """The nodes that refused the round because the run's σ is above their max-noise-multiplier."""
    return [entry for entry in checked.failures if entry["code"] == NOISE_TOO_HIGH]


def futile_round(rnd: int, messages: list[Message], checked: Checked, aggregated: bool) -> str | None:
    """Why the run cannot make progress, when every node refused the round for noise (or budget); else None.
    σ is fixed for a run, so every later round would be refused the same way: stop rather than loop."""
    noise = noise_refusals(checked)
    if aggregated or not noise or len(noise) + len(checked.refusals) < len(messages):
        return None
    reason = (f"round {rnd}: every node refused, {len(noise)} because {REFUSALS[NOISE_TOO_HIGH]} (σ above their "
              "max-noise-multiplier) and the rest out of budget; the round was not aggregated and the global "
              "model is unchanged. Grant the run more ε or plan fewer rounds")
    log.warning("run stopped: %s", reason)
    return reason


def evaluate_round(run: _Run, rnd: int, record: dict[str, Any], evaluator: Evaluator | None) -> None:
    """Central evaluation of the new global model; a round markedly worse than the best so far is flagged,
    and the keeper of the best model (early stopping's, or best_model.pt alone) sees it."""
    if evaluator is None:
        return
    record["eval"] = evaluator(run.arrays)
    worse = run.stopper.regression(rnd, record["eval"]) if run.stopper is not None else None
    if worse:
        record["worse_than_best"] = worse
        log.warning("%s", worse)
    if run.stopper is not None and run.stopper.observe(rnd, record["eval"], run.arrays):
        record["early_stopped"] = rnd < run.cfg.num_rounds


def record_and_checkpoint(run: _Run, rnd: int, record: dict[str, Any]) -> None:
    """Append the round to the results on disk, then checkpoint: a crash after this resumes at rnd + 1."""
    run.history.append(record)
    run.results.write(run.history)
    run.results.add_round(record)
    save_checkpoint(
        run.cfg.out_path,
        RunState(run_key=run.run_key, completed_round=rnd, model_state=run.arrays.to_torch_state_dict(),
                 history=run.history, config=run.cfg.to_mapping(), sampler_state=run.sampler.state_dict(),
                 strategy_state=strategy_state_dict(run.strategy)),
    )


def finish_run(run: _Run, stop_reason: str | None) -> dict[str, Any]:
    """The run's summary, written with the results, the per-node ε table and the plots."""
    history = run.history
    summary = {
        "final": history[-1].get("eval", {}) if history else {},
        "epsilon_max_all_nodes": max(run.node_epsilon.values()) if run.node_epsilon else None,
        "nodes_seen": len(run.node_epsilon),
        "node_names": {node: name for h in history for node, name in h.get("node_names", {}).items()},
        "stop_reason": stop_reason,
    }
    if history and history[-1].get("client_level_epsilon") is not None:
        summary["client_level_epsilon"] = history[-1]["client_level_epsilon"]
    if run.stopper is not None:
        summary["best"] = run.stopper.summary()
        summary["best"]["stopped_early"] = any(h.get("early_stopped") for h in history)
        if history and history[-1].get("round") != run.stopper.best_round:
            log.warning("the final global model (round %s) is not the best one seen: %s holds round %s's (%s %.3f)",
                        history[-1].get("round"), summary["best"]["path"], run.stopper.best_round,
                        run.stopper.key, run.stopper.best_value)
    run.results.write(history, summary)
    run.results.write_node_epsilon(history)
    run.results.plot(history)
    from fedsafe.after.card import write_card_at_end_of_run

    # MODEL_CARD.md + model_card.json: the run's privacy record and metrics. The run key is the one its checkpoint
    # holds (this run wrote it, or resumed from it): the card need not read the checkpoint back for it.
    checkpointed = (run.cfg.out_path / CHECKPOINT_NAME).is_file()
    write_card_at_end_of_run(run.cfg.out_path, run.run_key if checkpointed else None)
    return summary


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
    run = start_run(cfg, strategy, initial_arrays, model_config, evaluator)
    grid = MeteredGrid(grid)  # every exchange below passes through it: each message measured once
    stop_reason = None
    for rnd in range(run.first_round, cfg.num_rounds + 1):
        if run.stopper is not None and run.stopper.should_stop:
            break
        started = time.perf_counter()
        try:
            messages = sample_round(run, grid, rnd)
        except RunStopped as err:
            stop_reason = str(err)
            log.warning("run stopped before round %d: %s", rnd, stop_reason)
            break
        collected = send_and_collect(grid, messages, cfg)
        observe_replies(strategy, rnd, [reply for _, reply in collected.replies])
        checked = validate_replies(collected, run.arrays, cfg, run.masked, run.frozen, run.names)
        report_problems(strategy, rnd, checked, run.names)
        aggregated = aggregate_round(run, rnd, checked)
        stop_reason = futile_round(rnd, messages, checked, aggregated)
        record = round_record(run, rnd, messages, collected, checked, aggregated, grid.take())
        evaluate_round(run, rnd, record, evaluator)
        record["seconds"] = time.perf_counter() - started
        record_and_checkpoint(run, rnd, record)
        if progress is not None:
            progress(record, cfg)
        if stop_reason is not None:
            break
    summary = finish_run(run, stop_reason)
    return RunOutcome(arrays=run.arrays, history=run.history, node_epsilon=run.node_epsilon, started_at=started_at,
                      finished_at=time.perf_counter(), stop_reason=stop_reason, best=summary.get("best"))


def _frozen_keys(arrays: ArrayRecord, cfg: RunConfig) -> list[str]:
    """The parameters the run freezes (nodes neither train nor upload them)."""
    from fedsafe.models.transfer import frozen_names, parse_prefixes

    return frozen_names(arrays.keys(), parse_prefixes(cfg.freeze))


def _early_stopping(cfg: RunConfig, history, arrays: ArrayRecord, evaluator) -> EarlyStopping | None:
    """The run's keeper of the best model (early stopping where a patience is set; without one it never
    stops the run), caught up with `history`; best_model.pt written for the initial model of a new run.
    None without central evaluation."""
    if evaluator is None:
        if not cfg.early_stopping_patience:
            return None
        from .config import ConfigError

        raise ConfigError("early stopping needs the coordinator's held-out data (central evaluation)")
    stopper = EarlyStopping(cfg.out_path, cfg.early_stopping_patience, cfg.early_stopping_metric)
    stopper.replay(history)
    if not cfg.resume:
        stopper.keep(arrays)  # the initial model is the best so far
    return stopper


def progress_line(record: dict[str, Any], cfg: RunConfig) -> str:
    ev = record.get("eval", {})
    eps, grant = record.get("epsilon_max"), record.get("run_epsilon_grant")
    eps_text = "ε off" if not cfg.dp else (
        f"lifetime ε max {eps:.2f} mean {record['epsilon_mean']:.2f}" if eps is not None else "lifetime ε n/a"
    )
    if cfg.dp and grant is not None:
        eps_text += " | run grant ε " + (f"{grant['max']:g}" if grant["min"] == grant["max"]
                                          else f"{grant['min']:g}–{grant['max']:g}")
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
    if record.get("noise_refusals"):
        parts.append(f"{record['noise_refusals']} refused: noise would drown the update")
    if not record.get("aggregated", True):
        parts.append("not aggregated")
    if record.get("worse_than_best"):
        parts.append("WORSE than the best round (best_model.pt keeps it)")
    if record.get("num_examples_cap") and record["num_examples_cap"]["capped"]:
        parts.append(f"{len(record['num_examples_cap']['capped'])} weight(s) capped")
    if record["failures"] or record["rejected"]:
        names = NodeNames(record.get("node_names", {}))
        troubled = [p["node"] for p in record.get("problems", []) if p.get("code") != BUDGET_EXHAUSTED]
        parts.append(f"{record['failures']} failed, {record['rejected']} rejected"
                     + (f" ({names.labels(troubled)})" if troubled else ""))
    parts.append(f"{record['seconds']:.1f}s")
    return " | ".join(parts)


def print_progress(record: dict[str, Any], cfg: RunConfig) -> None:
    print(progress_line(record, cfg), flush=True)
