"""The node's Flower ClientApp: a round as policy → data → (replay) → reserve → train → settle → reply.

Each step is a function of its own; the ledger and the reply are touched only through the privacy gate
(client/gate.py), so what the node spends and what it sends can be read in one file.

Heavy libraries (torch, opacus, scikit-learn) are imported inside the handler so that a fresh
ClientApp process, which Flower's deployment engine starts per message, reaches user code quickly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedsafe import protocol
from fedsafe.protocol import BUDGET_EXHAUSTED, REQUEST_REFUSED  # noqa: F401  (re-exported: tests import them here)

from .gate import PrivacyGate, refusal_reply, refuse, say
from .policy import NodePolicy, PolicyError, TrainRequest, resolve_terms

log = logging.getLogger("fedsafe.client")

PolicySource = Callable[[Context], NodePolicy]


def process_age() -> float | None:
    """Seconds since this process started (Linux: /proc, both clocks counted from boot; None elsewhere)."""
    try:
        import os

        with open("/proc/self/stat") as handle:
            stat = handle.read()
        start_ticks = int(stat[stat.rindex(")") + 2:].split()[19])
        with open("/proc/uptime") as handle:
            uptime = float(handle.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def policy_from_node_config(context: Context) -> NodePolicy:
    return NodePolicy.from_node_config(context.node_config)


def simulated_partition(context: Context, request: TrainRequest) -> tuple[int, int] | None:
    """(partition id, partition count) of a simulated node; None for a node with its own data."""
    if "partition-id" not in context.node_config:
        return None
    count = int(context.node_config.get("num-partitions", request.num_partitions))
    return int(context.node_config["partition-id"]), count


def load_local_data(policy: NodePolicy, request: TrainRequest, partition: tuple[int, int] | None):
    from .data import PartitionScheme, is_builtin, load_file, load_partition, load_stored_partition

    if policy.data_path:
        return load_file(policy.data_path)
    if partition is not None:
        if not (policy.simulated or is_builtin(request.dataset)):
            raise PolicyError("the run names a data file for this node to load; only a simulated node loads the "
                              "file a run names (a deployed node trains on its own data-path)")
        scheme = PartitionScheme(
            kind=request.partitioner, num_partitions=partition[1], alpha=request.alpha,
            classes_per_node=request.classes_per_node, partition_by=request.partition_by or None,
            seed=request.seed,
        )
        if policy.partition_store:
            stored = load_stored_partition(policy.partition_store, request.dataset, partition[0], scheme)
            if stored is not None:
                return stored
        return load_partition(request.dataset, partition[0], scheme)
    raise PolicyError("this node has no data: set node-config data-path=<file>")


def warm_up_simulated_node(dataset: str, scheme, partition_store: str | None = None) -> None:
    """What a virtual node's first round would otherwise pay inside the round: PyTorch, Opacus and the
    training stack imported; the driver's partition store opened or, without one, the federation's
    dataset and partitioner loaded (`scheme` is the driver's fedsafe.client.data.PartitionScheme). Run once
    per simulation actor at its creation. Only an optimisation: a failure is logged and left for the
    round to report."""
    try:
        import opacus.accountants.analysis.rdp  # noqa: F401
        import torch._dynamo  # noqa: F401  (imported lazily by the optimizer's first step: ~1 s)

        from . import accounting, ledger, training  # noqa: F401
        from .data import load_stored_partition, prepare_partitions

        if partition_store is None or load_stored_partition(partition_store, dataset, 0, scheme) is None:
            prepare_partitions(dataset, scheme)
    except Exception as err:  # the round reports it with the node's context
        log.warning("simulated node warm-up failed: %s: %s", type(err).__name__, err)


def train_round(msg: Message, context: Context, policy: NodePolicy) -> Message:
    """One round, or a refusal: every failure leaves the node as a fixed code and category (client/gate.py)."""
    try:
        return _serve_round(msg, context, policy)
    except Exception as err:  # noqa: BLE001 - the detail stays in the node's log; Flower would send str(err)
        return refuse(msg, err)


def _serve_round(msg: Message, context: Context, policy: NodePolicy) -> Message:
    """policy → data → (replay) → reserve → train → settle → reply; only `gate` writes the ledger or a reply."""
    request = TrainRequest.from_config(msg.content["config"], run_id=str(msg.metadata.run_id))
    terms = resolve_terms(policy, request)
    policy.check_model(request.model)  # the model code the run names: only what the operator allows
    policy.check_model(request.task)  # and its task code, under the same allow-list
    partition = simulated_partition(context, request)
    device = node_device(policy)
    startup = _startup_seconds()
    data = load_local_data(policy, request, partition)
    spec, data = _spec_from_request(request, data)
    gate = PrivacyGate(msg, policy, request, terms, policy.data_key(request, partition, data),
                       records=_own_records(policy, data))

    digest = _request_digest(msg)
    if (replayed := gate.replay(digest)) is not None:
        return replayed

    model, task, frozen = _global_model(msg, request, spec)
    dp_mode = _grad_sample_mode(request, spec)  # before any ε is reserved: a precision it cannot train in
    plan = gate.reserve(len(data))
    seed = _noise_seed(policy, request, gate)
    outcome = _train_locally(model, task, data, request, plan, device, seed, dp_mode)
    figures = gate.settle(plan, outcome)
    update = _update(model, frozen, policy, request)
    if _debug_poison(policy, request) == "no-dp":  # TEST ONLY: the reply of a node that trains without DP
        figures = {}
    return gate.release(digest, update, {protocol.NUM_EXAMPLES: len(data), **startup, **figures})


def _own_records(policy: NodePolicy, data):
    """The record hashes of a node's own data file (None for simulated partitions): the ledger keeps them,
    so that data sharing records with another ledger's is refused (fedsafe.client.ledger)."""
    from .data import record_hashes

    return record_hashes(data) if policy.data_path else None


def node_device(policy: NodePolicy):
    """The torch device the operator chose; PolicyError if this machine lacks it."""
    from .training import resolve_device

    try:
        return resolve_device(policy.device)
    except ValueError as err:
        raise PolicyError(f"node-config device: {err}") from None


def _startup_seconds() -> dict[str, float]:
    """This ClientApp process' start to its training libraries loaded, taken before any record is read
    (so it says nothing about the data)."""
    import opacus  # noqa: F401

    import fedsafe.models  # noqa: F401

    from . import training  # noqa: F401

    age = process_age()
    return {} if age is None else {protocol.STARTUP_SECONDS: age}


def _request_digest(msg: Message) -> str:
    from .replay import request_digest

    arrays = msg.content["arrays"]
    return request_digest(dict(msg.content["config"].items()), {k: v.numpy() for k, v in arrays.items()})


def _global_model(msg: Message, request: TrainRequest, spec):
    """The coordinator's global model, its task and the names of its frozen parameters."""
    from fedsafe.models import build_model, parse_model_options, task_for
    from fedsafe.models.transfer import freeze

    from .dp_modes import check_no_batchnorm
    from .regularize import can_augment

    model = build_model(request.model, spec, parse_model_options(request.model_options))
    if request.dp:
        check_no_batchnorm(model)  # before any ε is reserved: Opacus would fail on it mid-round
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict(), strict=True)
    # Frozen parameters (transfer learning) are neither trained, noised nor uploaded.
    frozen = set(freeze(model, request.freeze, request.model)) if request.freeze else set()
    if request.augment and not can_augment(spec.input_shape):
        raise PolicyError(f"augment=true shifts image pixels; this model's inputs are shaped {spec.input_shape}")
    return model, task_for(spec.task, spec.num_classes), frozen


def _noise_seed(policy: NodePolicy, request: TrainRequest, gate: PrivacyGate) -> int | None:
    """None (fresh OS randomness) unless the operator asked for seeded noise (simulations and tests only:
    reproducible, hence predictable). Seeded by the release's place in its data's ledger too: a second run
    on the same ledger (same seed, same rounds) draws fresh noise, never a stream already charged."""
    if not policy.seed_noise:
        return None
    import torch

    from .training import derive_seed

    seed = derive_seed(request.seed, request.server_round, gate.data_key, gate.ledger_position)
    torch.manual_seed(seed)
    return seed


def _grad_sample_mode(request: TrainRequest, spec) -> str:
    """The family's Opacus mode at the run's precision (fedsafe.client.precision); PolicyError where the
    model cannot train correctly at that precision."""
    from fedsafe.models import preferred_grad_sample_mode

    from .precision import PrecisionError, grad_sample_mode

    try:
        return grad_sample_mode(preferred_grad_sample_mode(request.model), request.precision, spec.task)
    except PrecisionError as err:
        raise PolicyError(str(err)) from None


def _train_locally(model, task, data, request: TrainRequest, plan, device, seed: int | None, dp_mode: str):
    """DP-SGD (or, where the operator allows it, plain SGD) with exactly the noise the gate reserved."""
    from .training import TrainSettings, train

    settings = TrainSettings.of(request, grad_sample_mode=dp_mode,
                                noise_multiplier=plan.noise_multiplier if plan.private else None)
    return train(model, task, data, settings, device, seed)


def _update(model, frozen: set[str], policy: NodePolicy, request: TrainRequest) -> dict:
    """The trained tensors to upload: every parameter and buffer but the frozen ones."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items() if k not in frozen}
    kind = _debug_poison(policy, request)
    if kind is not None:
        say(f"TEST ONLY: debug-poison={kind}: round {request.server_round} sends a deliberately bad update")
        state = poison_update(state, kind)
    return state


def _debug_poison(policy: NodePolicy, request: TrainRequest) -> str | None:
    """TEST ONLY: the bad update this round sends (node-config debug-poison, cycling by round), if any."""
    if not policy.debug_poison:
        return None
    return policy.debug_poison[(request.server_round - 1) % len(policy.debug_poison)]


def poison_update(state: dict, kind: str) -> dict:
    """TEST ONLY (node-config debug-poison): an update the coordinator's validation must reject."""
    import torch

    state = {k: v.clone() for k, v in state.items()}
    first = next(k for k, v in state.items() if v.is_floating_point())
    if kind == "nan":
        state[first].fill_(float("nan"))
    elif kind == "shape":
        state[first] = torch.cat([state[first], state[first][:1]])
    elif kind == "norm":
        for key, value in state.items():
            if value.is_floating_point():
                state[key] = value + 1e6
    elif kind == "no-dp":
        pass  # the update is as trained; its reply lacks the DP fields (_serve_round)
    else:
        raise ValueError(f"unknown debug-poison {kind!r}")
    return state


def _spec_from_request(request: TrainRequest, data):
    """The model's data spec, as the coordinator built the global model, and the node's data in the
    shape it asks for (fedsafe.client.data.fit_view); DataError if the data cannot fit it."""
    from fedsafe.models import DataSpec

    from .data import DataError, fit_view

    spec = DataSpec(input_shape=request.input_shape, num_classes=request.num_classes, task=request.task)
    try:
        data = fit_view(data, spec.input_shape)
    except DataError as err:
        raise DataError(f"local {err}") from None
    classes = getattr(data, "classes", None)  # an image folder's class names, numbered in their order
    if spec.task == "classification" and classes is not None and len(classes) != spec.num_classes:
        # Fewer or more classes than the run's model: numbered in order, they would not mean what they mean
        # on the other nodes. The names go to the node's log only.
        raise DataError(f"local image folder has {len(classes)} classes {list(classes)}; the run's model has "
                        f"{spec.num_classes}: declare the run's classes in the folder's schema")
    if spec.task == "classification" and len(data.y) and int(data.y.max()) >= spec.num_classes:
        # The label value goes to the node's log only: the coordinator learns "does not fit", no label.
        raise DataError(f"local labels reach {int(data.y.max())}; the model has {spec.num_classes} classes")
    return spec, data


def make_client_app(policy_source: PolicySource = policy_from_node_config, extra_mods=()) -> ClientApp:
    """A ClientApp whose node policy comes from `policy_source` (node-config, by default).

    Its outermost mod runs the node's side of SecAgg+ when the server asks for it (client/secagg.py);
    `extra_mods` sit inside it, next to the training handler (simulated attackers use this).
    """
    from .secagg import secagg_mod

    client_app = ClientApp(mods=[secagg_mod, *extra_mods])

    @client_app.train()
    def _train_handler(msg: Message, context: Context) -> Message:
        try:
            policy = policy_source(context)
        except Exception as err:  # noqa: BLE001 - a PolicyError names a node-config key: the node's log only
            return refuse(msg, err)
        return train_round(msg, context, policy)

    @client_app.evaluate()
    def _evaluate_handler(msg: Message, context: Context) -> Message:
        # Evaluating on the private data would release a figure the ledger does not account for.
        say("refusing an evaluate message: this node evaluates nothing on its private data")
        return refusal_reply(msg, REQUEST_REFUSED)

    return client_app


app = make_client_app()
