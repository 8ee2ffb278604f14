"""The node's Flower ClientApp: resolve policy, check the ledger, train with DP-SGD, reply.

Heavy libraries (torch, opacus, scikit-learn) are imported inside the handler so that a fresh
ClientApp process, which Flower's deployment engine starts per message, reaches user code quickly.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

from flwr.app import Array, ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedsafe.protocol import BUDGET_EXHAUSTED, REQUEST_REFUSED

from .policy import NodePolicy, PolicyError, TrainRequest, resolve_terms

log = logging.getLogger("fedsafe.client")

PolicySource = Callable[[Context], NodePolicy]


def say(text: str) -> None:
    """A line for the node operator: Flower shows a ClientApp's stderr in the SuperNode's output, while
    its INFO log records are dropped (Flower configures only its own logger)."""
    log.info(text)
    print(f"fedsafe node: {text}", file=sys.stderr, flush=True)


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
    from .data import PartitionScheme, load_file, load_partition, load_stored_partition

    if policy.data_path:
        return load_file(policy.data_path)
    if partition is not None:
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


def _refuse(msg: Message, code: int, reason: str) -> Message:
    say(f"refusing the round: {reason}")
    return Message(Error(code=code, reason=reason), reply_to=msg)


def train_round(msg: Message, context: Context, policy: NodePolicy) -> Message:
    from .data import DataError
    from .ledger import BudgetExhausted, LedgerError

    try:
        request = TrainRequest.from_config(msg.content["config"], run_id=str(msg.metadata.run_id))
        terms = resolve_terms(policy, request)
        partition = simulated_partition(context, request)
        data = load_local_data(policy, request, partition)
        return _train(msg, policy, request, terms, data, partition)
    except BudgetExhausted as err:
        return _refuse(msg, BUDGET_EXHAUSTED, str(err))
    except (PolicyError, DataError, LedgerError, ValueError) as err:
        return _refuse(msg, REQUEST_REFUSED, f"{type(err).__name__}: {err}")


def _train(msg, policy, request, terms, data, partition) -> Message:
    import torch

    from fedsafe.models import build_model, parse_model_options, preferred_grad_sample_mode, task_for
    from fedsafe.models.transfer import freeze

    from .ledger import PrivacyLedger
    from .regularize import can_augment
    from .replay import ReplayCache, request_digest
    from .training import TrainSettings, derive_seed, poisson_schedule, resolve_device, train

    global_arrays: ArrayRecord = msg.content["arrays"]
    spec, data = _spec_from_request(msg, data)
    data_key = policy.data_key(request, partition)

    # A round the coordinator re-sends after a crash (same run, round and global model) is answered with
    # the update already trained and charged for it: the same bytes again cost no privacy.
    replay = ReplayCache(policy.state_dir, data_key)
    digest = request_digest(dict(msg.content["config"].items()), {k: v.numpy() for k, v in global_arrays.items()})
    if (cached := replay.lookup(request.run_id, request.server_round, digest)) is not None:
        arrays, metrics = cached
        say(f"round {request.server_round}: re-sent by the coordinator; answering with the update this node "
            f"already trained for it (no new privacy spend, ε stays {metrics.get('epsilon', float('nan')):.3f})")
        content = RecordDict({"arrays": ArrayRecord({k: Array.from_numpy_ndarray(v) for k, v in arrays.items()}),
                              "metrics": MetricRecord({**metrics, "replayed": 1.0})})
        return Message(content, reply_to=msg)

    model = build_model(request.model, spec, parse_model_options(request.model_options))
    model.load_state_dict(global_arrays.to_torch_state_dict(), strict=True)
    # Frozen parameters (transfer learning) are neither trained, noised nor uploaded.
    frozen = set(freeze(model, request.freeze, request.model)) if request.freeze else set()
    task = task_for(spec.task, spec.num_classes)
    if request.augment and not can_augment(spec.input_shape):
        raise PolicyError(f"augment=true shifts image pixels; this model's inputs are shaped {spec.input_shape}")

    settings = TrainSettings.of(request, grad_sample_mode=preferred_grad_sample_mode(request.model))
    metrics: dict[str, float] = {"num-examples": len(data)}
    ledger = None
    if terms.private:
        from . import accounting

        # A fresh process every round: keep the RDP math of this node's runs on its disk (pure functions).
        accounting.use_disk_cache(Path(policy.state_dir).expanduser() / "cache" / "accounting.json")
        ledger = PrivacyLedger.open(policy.state_dir, data_key)
        sample_rate, batches = poisson_schedule(len(data), request.batch_size)
        steps = batches * request.local_epochs
        plan = ledger.plan_run(
            request.run_id, sample_rate=sample_rate, steps_per_round=steps,
            planned_rounds=request.num_rounds, run_epsilon=terms.run_epsilon,
            max_epsilon=terms.max_epsilon, delta=terms.delta, accountant=request.accountant,
        )
        before = ledger.epsilon(terms.delta, request.accountant)
        after = ledger.reserve(
            request.run_id, request.server_round, (plan.noise_multiplier, sample_rate, steps),
            max_epsilon=terms.max_epsilon, run_epsilon=terms.run_epsilon, delta=terms.delta,
            accountant=request.accountant,
        )
        say(
            f"round {request.server_round}: {steps} DP-SGD steps at σ={plan.noise_multiplier:.3f}, "
            f"q={sample_rate:.4f} will spend ε {before:.3f} → {after:.3f} "
            f"(run grant {terms.run_epsilon:g}, cap {terms.max_epsilon:g}, δ={terms.delta:g})"
        )
        settings = TrainSettings(**{**settings.__dict__, "noise_multiplier": plan.noise_multiplier})

    if (age := process_age()) is not None:
        metrics["startup-seconds"] = age  # this ClientApp process' start to its first training step
    started = time.perf_counter()
    seed = None
    if policy.seed_noise:  # simulations and tests only: reproducible, hence predictable, noise
        # Seeded by the release's place in this data's ledger too: a second run on the same ledger
        # (same seed, same rounds) draws fresh noise, never a stream whose release is already charged.
        release = len(ledger.history) - 1 if ledger is not None else None
        seed = derive_seed(request.seed, request.server_round, data_key, release)
        torch.manual_seed(seed)
    outcome = train(model, task, data, settings, resolve_device(policy.device), seed)
    metrics["train-loss"] = outcome.mean_loss
    metrics["train-seconds"] = time.perf_counter() - started
    if ledger is not None:
        ledger.settle(request.run_id, request.server_round, outcome.steps)
        metrics["epsilon"] = ledger.epsilon(terms.delta, request.accountant)
        metrics["delta"] = terms.delta
        metrics["dp-steps"] = ledger.total_steps
        metrics["noise-multiplier"] = settings.noise_multiplier
        # The ledger's figures, so the coordinator can see who can afford the next round (all are
        # policy and accounting values, not data: they are public in the DP sense).
        lifetime_next, run_next = ledger.project(
            request.run_id, (plan.noise_multiplier, sample_rate, steps), terms.delta, request.accountant)
        metrics["max-epsilon"] = terms.max_epsilon
        metrics["run-epsilon"] = terms.run_epsilon
        metrics["epsilon-next"] = lifetime_next
        metrics["run-epsilon-next"] = run_next

    state = {k: v.detach().cpu() for k, v in model.state_dict().items() if k not in frozen}
    if policy.debug_poison:
        kind = policy.debug_poison[(request.server_round - 1) % len(policy.debug_poison)]
        say(f"TEST ONLY: debug-poison={kind}: round {request.server_round} sends a deliberately bad update")
        state = poison_update(state, kind)
    replay.store(request.run_id, request.server_round, digest, {k: v.numpy() for k, v in state.items()}, metrics)
    content = RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord(metrics)})
    return Message(content, reply_to=msg)


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
    else:
        raise ValueError(f"unknown debug-poison {kind!r}")
    return state


def _spec_from_request(msg: Message, data):
    """The model's data spec, as the coordinator built the global model, and the node's data in the
    shape it asks for (fedsafe.client.data.fit_view); DataError if the data cannot fit it."""
    from fedsafe.models import DataSpec

    from .data import DataError, fit_view

    config = msg.content["config"]
    spec = DataSpec(
        input_shape=tuple(int(v) for v in config["input-shape"]),
        num_classes=int(config["num-classes"]),
        task=str(config.get("task", "classification")),
    )
    try:
        data = fit_view(data, spec.input_shape)
    except DataError as err:
        raise DataError(f"local {err}") from None
    if spec.task == "classification" and len(data.y) and int(data.y.max()) >= spec.num_classes:
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
        except PolicyError as err:
            return _refuse(msg, REQUEST_REFUSED, f"node policy: {err}")
        return train_round(msg, context, policy)

    return client_app


app = make_client_app()
