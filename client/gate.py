"""The node's privacy gate: the only code that writes the ledger and the only code that builds a reply.

A round passes it in a straight line (client/app.py):

    replay  = gate.replay(digest)            # a re-sent round: the reply already paid for, or None
    plan    = gate.reserve(num_examples)      # σ, q, steps; written to the ledger before training
    outcome = train(..., plan.noise_multiplier)
    figures = gate.settle(plan, outcome)      # settled from what the optimizer did; withheld if it differs
    reply   = gate.release(plan, state, figures)

What leaves the node is decided here and nowhere else:

* an update reply holds the trained arrays (the DP output; parameter names are the architecture) and a
  MetricRecord whose keys are exactly those of `PUBLIC_METRICS`, each public by declaration (README,
  "What leaves a node"); any other key is dropped before sending;
* with compress-updates, the trained arrays leave as one deflated stream of their 8-bit codes relative to
  the global model the node was sent, with each array's (offset, step) (fedsafe.update_compression): a
  function of the DP output and of what the coordinator sent, so post-processing, no ε;
* an error reply holds a fixed code and a fixed category (fedsafe.protocol.REFUSALS), never exception text: a
  message can quote a cell of the private data, a label or a file path. The detail goes to the node's
  own stderr and log.
"""

from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import Array, ArrayRecord, Error, Message, MetricRecord, RecordDict

from fedsafe import protocol
from fedsafe.protocol import (
    BUDGET_EXHAUSTED,
    DATA_UNUSABLE,
    INTERNAL_ERROR,
    LEDGER_DAMAGED,
    MODEL_UNAVAILABLE,
    NOISE_TOO_HIGH,
    REFUSALS,
    REQUEST_REFUSED,
)

from .accounting import AGGREGATE, OWN_UPDATE

log = logging.getLogger("fedsafe.client")

# Every metric a node may send, and why it may leave the node (README: "What leaves a node").
PUBLIC_METRICS: dict[str, str] = {
    protocol.NUM_EXAMPLES: "the size of the node's data, its aggregation weight: public by declaration",
    protocol.STARTUP_SECONDS: "ClientApp process start to its libraries loaded, measured before any record is read",
    protocol.EPSILON: "ledger: ε spent on this data over all runs (a function of σ, q, steps, δ)",
    protocol.DELTA: "policy: the δ of the guarantee",
    protocol.DP_STEPS: "ledger: DP-SGD steps taken on this data over all runs",
    protocol.NOISE_MULTIPLIER: "ledger: σ of this run (fixed from ε, δ, q, steps)",
    protocol.SAMPLE_RATE: "ledger: q of this run, 1/ceil(n/B): a function of num-examples and the run's batch-size, "
                          "both already public",
    protocol.MAX_EPSILON: "policy: the node's lifetime cap",
    protocol.RUN_EPSILON: "policy: ε granted to this run",
    protocol.EPSILON_NEXT: "ledger: ε after one more round like this one",
    protocol.RUN_EPSILON_NEXT: "ledger: this run's ε after one more round like this one",
    protocol.REPLAYED: "1 when the reply is the stored one of a re-sent round",
    protocol.EPSILON_OWN_UPDATE: "ledger (distributed DP): ε of the node's own updates alone, as if SecAgg+ failed",
    protocol.EPSILON_AGGREGATE: "ledger (distributed DP): ε against a server that sees only the SecAgg+ sum",
    protocol.NOISE_SHARES: "distributed DP: m, the fewest nodes whose noise shares the sum carries (SecAgg+'s "
                           "threshold, sent by the coordinator)",
}


def say(text: str) -> None:
    """A line for the node operator: Flower shows a ClientApp's stderr in the SuperNode's output, while
    its INFO log records are dropped (Flower configures only its own logger). Never sent anywhere."""
    log.info(text)
    print(f"fedsafe node: {text}", file=sys.stderr, flush=True)


def refusal_code(err: BaseException) -> int:
    """The fixed code for an exception raised while serving a round."""
    from fedsafe.models.registry import ModelConfigError, UnknownModelError

    from .data import DataError
    from .dp_modes import NotPrivatisable
    from .ledger import BudgetExhausted, LedgerError, NoiseTooHigh
    from .policy import PolicyError

    if isinstance(err, BudgetExhausted):
        return BUDGET_EXHAUSTED
    if isinstance(err, NoiseTooHigh):
        return NOISE_TOO_HIGH
    if isinstance(err, LedgerError):
        return LEDGER_DAMAGED
    if isinstance(err, DataError):
        return DATA_UNUSABLE
    if isinstance(err, UnknownModelError):  # a user's model module this node lacks (its name is the run's)
        return MODEL_UNAVAILABLE
    if isinstance(err, (PolicyError, ModelConfigError, NotPrivatisable)):
        return REQUEST_REFUSED
    return INTERNAL_ERROR


def refuse(msg: Message, err: BaseException) -> Message:
    """An error reply with a fixed code and category; the exception's text stays on the node, but for a
    malformed request (RequestError), whose text says only what the coordinator itself sent."""
    from .policy import RequestError

    code = refusal_code(err)
    detail = f"{type(err).__name__}: {err}"
    if isinstance(err, RequestError):
        say(f"refusing the round ({REFUSALS[code]}): {detail}")
        return refusal_reply(msg, code, str(err))
    say(f"refusing the round ({REFUSALS[code]}; the coordinator is told only that): {detail}")
    if code == INTERNAL_ERROR:
        log.debug("internal error serving a round:\n%s", "".join(traceback.format_exception(err)))
    return refusal_reply(msg, code)


def refusal_reply(msg: Message, code: int, request_problem: str = "") -> Message:
    """The one builder of an error reply: the code's fixed category, and for a malformed request what
    was wrong with it (one line)."""
    reason = REFUSALS[code] + (f": {' '.join(request_problem.split())[:300]}" if request_problem else "")
    return Message(Error(code=code, reason=reason), reply_to=msg)


def public_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """`metrics` restricted to PUBLIC_METRICS; what is dropped is named in the node's log only."""
    dropped = sorted(set(metrics) - set(PUBLIC_METRICS))
    if dropped:
        log.warning("not sent (not on the public list): %s", ", ".join(dropped))
    return {k: float(v) for k, v in metrics.items() if k in PUBLIC_METRICS}


def update_reply(msg: Message, arrays: ArrayRecord, metrics: Mapping[str, float], compress: bool = False) -> Message:
    """The one builder of a successful reply: the update's arrays (compressed where the run asks for it) and
    the public metrics, nothing else."""
    if compress:
        # Post-processing of the noised arrays (already charged to the ledger): no ε.
        from fedsafe.update_compression import encode

        start = msg.content[protocol.ARRAYS]
        arrays = encode({k: arrays[k].numpy() for k in arrays.keys()}, {k: start[k].numpy() for k in start.keys()})
    content = RecordDict({protocol.ARRAYS: arrays, protocol.METRICS: MetricRecord(public_metrics(metrics))})
    return Message(content, reply_to=msg)


@dataclass(frozen=True)
class Plan:
    """What the gate reserved for a round: the noise training must use and the steps it may take."""

    private: bool
    noise_multiplier: float
    sample_rate: float
    steps: int
    noise_shares: int = 1  # distributed DP: m; the node adds noise_multiplier = σ/√m, its share of σ


class PrivacyGate:
    """One round on one protected dataset: its ledger, its replay cache and its reply."""

    def __init__(self, msg: Message, policy, request, terms, data_key: str, records=None) -> None:
        from .replay import ReplayCache

        self.msg, self.policy, self.request, self.terms = msg, policy, request, terms
        self.data_key = data_key
        self.records = records  # a node's own data: its record hashes (fedsafe.client.data.record_hashes)
        self._replay = ReplayCache(policy.state_dir, data_key)
        self._ledger = None

    # ---- a re-sent round ----------------------------------------------------------------------
    def replay(self, digest: str) -> Message | None:
        """The reply already trained and charged for exactly this request, or None.

        A round the coordinator re-sends after a crash (same run, round and global model) is answered
        with the same bytes again: post-processing of a release already in the ledger, costing nothing."""
        cached = self._replay.lookup(self.request.run_id, self.request.server_round, digest)
        if cached is None:
            return None
        arrays, metrics = cached
        say(f"round {self.request.server_round}: re-sent by the coordinator; answering with the update this node "
            f"already trained for it (no new privacy spend, ε stays {metrics.get('epsilon', float('nan')):.3f})")
        record = ArrayRecord({k: Array.from_numpy_ndarray(v) for k, v in arrays.items()})
        return update_reply(self.msg, record, {**metrics, protocol.REPLAYED: 1.0}, self.request.compress_updates)

    # ---- the ledger ---------------------------------------------------------------------------
    def reserve(self, num_examples: int) -> Plan:
        """Fix the run's σ (once per run) and record this round's spend before training; BudgetExhausted,
        and NoiseTooHigh (σ above the policy's max-noise-multiplier), leave the ledger untouched."""
        from .training import round_steps

        request, terms = self.request, self.terms
        sample_rate, steps = round_steps(num_examples, request.batch_size, request.local_epochs, request.local_steps)
        if not terms.private:
            return Plan(False, 0.0, sample_rate, steps)
        from . import accounting
        from .ledger import PrivacyLedger
        from .policy import PolicyError

        # A fresh process every round: keep the RDP math of this node's runs on its disk (pure functions).
        accounting.use_disk_cache(Path(self.policy.state_dir).expanduser() / "cache" / "accounting.json")
        self._ledger = ledger = PrivacyLedger.open(self.policy.state_dir, self.data_key, records=self.records)
        shares, basis = self._noise_shares(), self.policy.cap_basis
        # One transaction for the run's plan and the round's reservation: the file read once under the lock
        # and, on a run's first round, written once (durably, before training) with both entries, not twice.
        with ledger.transaction():
            run_plan = ledger.plan_run(
                request.run_id, sample_rate=sample_rate, steps_per_round=steps,
                planned_rounds=request.num_rounds, run_epsilon=terms.run_epsilon,
                max_epsilon=terms.max_epsilon, delta=terms.delta, accountant=request.accountant,
                max_noise_multiplier=self.policy.max_noise_multiplier, noise_shares=shares, cap_basis=basis,
            )
            if run_plan.noise_shares > shares:
                raise PolicyError(
                    f"distributed DP: this run's noise share σ/√{run_plan.noise_shares} was fixed for sums of at "
                    f"least {run_plan.noise_shares} nodes, but this round's SecAgg+ threshold guarantees only "
                    f"{shares}: the sum would carry less noise than the ledger records; refusing the round")
            plan = Plan(True, run_plan.noise_multiplier, sample_rate, steps, run_plan.noise_shares)
            before = ledger.epsilon(terms.delta, request.accountant, basis)
            after = ledger.reserve(
                request.run_id, request.server_round, (plan.noise_multiplier, sample_rate, steps),
                max_epsilon=terms.max_epsilon, run_epsilon=terms.run_epsilon, delta=terms.delta,
                accountant=request.accountant, noise_shares=plan.noise_shares, cap_basis=basis,
            )
        shared = (f" (its share of the aggregate's σ={run_plan.aggregate_noise_multiplier:.3f}, summed over >= "
                  f"{plan.noise_shares} nodes by SecAgg+; the cap counts {basis} ε)" if plan.noise_shares > 1 else "")
        say(
            f"round {request.server_round}: {steps} DP-SGD steps at σ={plan.noise_multiplier:.3f}{shared}, "
            f"q={sample_rate:.4f} will spend ε {before:.3f} → {after:.3f} "
            f"(run grant {terms.run_epsilon:g}, cap {terms.max_epsilon:g}, δ={terms.delta:g})"
        )
        return plan

    def _noise_shares(self) -> int:
        """m of a distributed-DP round: the reconstruction threshold of the SecAgg+ round this node is in, as
        its own SecAgg+ state holds it (the protocol refuses to go on with fewer live neighbours), never a
        figure the train message claims. 1 (local DP: all the noise) when the run does not ask for it."""
        if not self.request.distributed_dp:
            return 1
        from .policy import PolicyError
        from .secagg import current_round

        secagg = current_round()
        if secagg is None:
            raise PolicyError("the run asks for distributed-dp, but this train message is not part of a SecAgg+ "
                              "round: the node's noise share would reach the server unsummed; refusing")
        return max(1, secagg.threshold)

    @property
    def ledger_position(self) -> int | None:
        """This round's place in its data's ledger (after reserve(); None when not private): a number no
        other release on this data ever had, so seeded noise keyed on it is never drawn twice."""
        return None if self._ledger is None else len(self._ledger.history) - 1

    def settle(self, plan: Plan, outcome) -> dict[str, float]:
        """Settle the ledger from what the DP optimizer did (SettlementMismatch, and no reply, if it is not
        what was reserved); the ledger's figures for the reply (policy and accounting values, not data:
        the coordinator sees who can afford the next round)."""
        if not plan.private:
            return {}
        request, terms, ledger = self.request, self.terms, self._ledger
        basis = self.policy.cap_basis
        ledger.settle(request.run_id, request.server_round, outcome.dp_spend)
        lifetime_next, run_next = ledger.project(
            request.run_id, (plan.noise_multiplier, plan.sample_rate, plan.steps), terms.delta, request.accountant,
            plan.noise_shares, basis)
        distributed = {
            protocol.EPSILON_OWN_UPDATE: ledger.epsilon(terms.delta, request.accountant, OWN_UPDATE),
            protocol.EPSILON_AGGREGATE: ledger.epsilon(terms.delta, request.accountant, AGGREGATE),
            protocol.NOISE_SHARES: plan.noise_shares,
        } if plan.noise_shares > 1 else {}
        return {
            **distributed,
            protocol.EPSILON: ledger.epsilon(terms.delta, request.accountant, basis),
            protocol.DELTA: terms.delta,
            protocol.DP_STEPS: ledger.total_steps,
            protocol.NOISE_MULTIPLIER: plan.noise_multiplier,
            protocol.SAMPLE_RATE: plan.sample_rate,
            protocol.MAX_EPSILON: terms.max_epsilon,
            protocol.RUN_EPSILON: terms.run_epsilon,
            protocol.EPSILON_NEXT: lifetime_next,
            protocol.RUN_EPSILON_NEXT: run_next,
        }

    # ---- the reply ----------------------------------------------------------------------------
    def release(self, digest: str, state: Mapping[str, Any], metrics: Mapping[str, float]) -> Message:
        """Keep the reply for a re-send of this request, then build it from the public fields only."""
        metrics = public_metrics(metrics)
        self._replay.store(self.request.run_id, self.request.server_round, digest,
                           {k: v.numpy() for k, v in state.items()}, metrics)
        return update_reply(self.msg, ArrayRecord(dict(state)), metrics, self.request.compress_updates)
