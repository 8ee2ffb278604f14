"""The node's side of SecAgg+: Flower's own `secaggplus_mod`, fitted to fedsafe's Message-API handler.

Flower 1.41 ships SecAgg+ for its legacy API only: the mod expects the training handler to answer with a
legacy `FitRes` record. `secagg_mod` sits outermost in the node's ClientApp and, for messages that carry
a SecAgg+ stage, runs `secaggplus_mod` around an adapter that turns fedsafe's reply into that record:
the masked vector is the node's *update* (trained weights − the global model), weighted by its
`num-examples`. The reply that leaves the node holds the masked vector, SecAgg+'s own protocol records
(public keys, encrypted shares) and the public metrics the gate allowed (client/gate.py: ε, ledger
figures, `num-examples`), never the weights. A failure anywhere in the protocol leaves as the gate's
fixed code and category, never as exception text. Messages without a SecAgg+ stage
pass straight through, so the same ClientApp serves plain rounds.

Distributed DP (run setting distributed-dp): while the training handler runs inside a SecAgg+ round,
`current_round()` gives it that round's reconstruction threshold m from the node's own SecAgg+ state, and
the node adds only σ/√m of the noise (client/gate.py). Every node then masks its update with the same
weight (SecAgg+'s max weight, so that Flower's weight ratio is exactly 1): the update is already its noisy
gradient sum over the run's batch size (client/training.py), and equal weights keep each record's
influence and each node's noise on one scale in the sum. An update outside SecAgg+'s clipping range would
be clipped after the noise, which the accounting does not cover: it is withheld instead.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass

from flwr.app import Context, Error, Message, MessageType
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from .gate import refuse
from .policy import PolicyError


@dataclass(frozen=True)
class SecAggRound:
    """What the node's own SecAgg+ state says of the round its training handler is serving."""

    threshold: int  # shares needed to unmask: the fewest live nodes whose sum the server can see
    max_weight: float
    clipping_range: float


_current: ContextVar[SecAggRound | None] = ContextVar("fedsafe_secagg_round", default=None)


def current_round() -> SecAggRound | None:
    """The SecAgg+ round around the running training handler; None outside one (a plain round)."""
    return _current.get()


class _Refused(Exception):
    def __init__(self, error: Error) -> None:
        super().__init__(error.reason)
        self.error = error


def secagg_mod(msg: Message, context: Context, call_next) -> Message:
    if msg.metadata.message_type != MessageType.TRAIN or RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)
    from flwr.client.mod import secaggplus_mod

    if _asks_compression(msg):
        from .policy import RequestError

        return refuse(msg, RequestError("compress-updates cannot be combined with SecAgg+, which quantises the "
                                        "masked update itself"))
    try:
        return secaggplus_mod(msg, context, lambda m, c: _update_as_fitres(m, c, call_next))
    except _Refused as refused:  # keep the node's own error code (e.g. a budget refusal)
        return Message(refused.error, reply_to=msg)
    except Exception as err:  # noqa: BLE001 - Flower would send str(err) to the server
        return refuse(msg, err)


def _asks_compression(msg: Message) -> bool:
    """Whether a SecAgg+ round's train config also asks for compress-updates (the coordinator's
    configuration refuses the pair; a node refuses it too rather than send what SecAgg+ cannot mask)."""
    config = msg.content.config_records.get("config")
    return config is not None and config.get("compress-updates") in (True, "true")


def _update_as_fitres(msg: Message, context: Context, call_next) -> Message:
    import numpy as np
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.compat.common.recorddict_compat import fitres_to_recorddict

    secagg = _secagg_state(context)
    token = _current.set(secagg)
    try:
        reply = call_next(msg, context)
    finally:
        _current.reset(token)
    if reply.has_error():
        raise _Refused(reply.error)
    start, trained = msg.content["arrays"], reply.content["arrays"]
    update = [np.asarray(trained[k].numpy(), dtype=np.float64) - start[k].numpy() for k in start.keys()]
    metrics = reply.content["metrics"]
    weight = int(metrics["num-examples"])
    if msg.content["config"].get("distributed-dp") is True:
        weight = _equal_weight(update, secagg)
    fitres = FitRes(status=Status(Code.OK, ""), parameters=ndarrays_to_parameters(update),
                    num_examples=weight, metrics={})
    content = fitres_to_recorddict(fitres, keep_input=False)
    content["metrics"] = metrics
    return Message(content, reply_to=msg)


def _secagg_state(context: Context) -> SecAggRound:
    """The round's SecAgg+ parameters as this node's secaggplus_mod stored them at its setup stage."""
    from flwr.client.mod.secure_aggregation.secaggplus_mod import SecAggPlusState
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE

    state = SecAggPlusState(**context.state.config_records[RECORD_KEY_STATE])
    return SecAggRound(threshold=int(state.threshold), max_weight=float(state.max_weight),
                       clipping_range=float(state.clipping_range))


def _equal_weight(update, secagg: SecAggRound) -> int:
    """The weight every distributed-DP node masks its update with (PolicyError, withholding the update,
    where SecAgg+ would clip it: clipping after the noise is outside the accounting)."""
    import numpy as np

    largest = max((float(np.max(np.abs(u))) for u in update if u.size), default=0.0)
    if not largest <= secagg.clipping_range:
        raise PolicyError(f"distributed DP: the update reaches {largest:.3g}, beyond SecAgg+'s clipping range "
                          f"±{secagg.clipping_range:g}; withheld (a lower lr keeps updates in range)")
    return max(1, int(secagg.max_weight))
