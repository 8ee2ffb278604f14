"""The node's Flower ClientApp: resolve policy, check the ledger, train with DP-SGD, reply.

Heavy libraries (torch, opacus, scikit-learn) are imported inside the handler so that a fresh
ClientApp process, which Flower's deployment engine starts per message, reaches user code quickly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from flwr.app import ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from .policy import NodePolicy, PolicyError, TrainRequest, resolve_terms

log = logging.getLogger("fedsafe.client")

# Error codes of fedsafe's refusals (Flower's own codes are small integers).
BUDGET_EXHAUSTED = 4001
REQUEST_REFUSED = 4002

PolicySource = Callable[[Context], NodePolicy]


def policy_from_node_config(context: Context) -> NodePolicy:
    return NodePolicy.from_node_config(context.node_config)


def simulated_partition(context: Context, request: TrainRequest) -> tuple[int, int] | None:
    """(partition id, partition count) of a simulated node; None for a node with its own data."""
    if "partition-id" not in context.node_config:
        return None
    count = int(context.node_config.get("num-partitions", request.num_partitions))
    return int(context.node_config["partition-id"]), count


def load_local_data(policy: NodePolicy, request: TrainRequest, partition: tuple[int, int] | None):
    from .data import PartitionScheme, load_file, load_partition

    if policy.data_path:
        return load_file(policy.data_path)
    if partition is not None:
        scheme = PartitionScheme(
            kind=request.partitioner, num_partitions=partition[1], alpha=request.alpha,
            classes_per_node=request.classes_per_node, partition_by=request.partition_by or None,
            seed=request.seed,
        )
        return load_partition(request.dataset, partition[0], scheme)
    raise PolicyError("this node has no data: set node-config data-path=<file>")


def _refuse(msg: Message, code: int, reason: str) -> Message:
    log.warning("node refuses round: %s", reason)
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

    from models import build_model, parse_model_options, preferred_grad_sample_mode, task_for
    from models.transfer import freeze

    from .ledger import PrivacyLedger
    from .regularize import can_augment
    from .training import TrainSettings, poisson_schedule, resolve_device, train

    global_arrays: ArrayRecord = msg.content["arrays"]
    spec, data = _spec_from_request(msg, data)
    model = build_model(request.model, spec, parse_model_options(request.model_options))
    model.load_state_dict(global_arrays.to_torch_state_dict(), strict=True)
    # Frozen parameters (transfer learning) are neither trained, noised nor uploaded.
    frozen = set(freeze(model, request.freeze, request.model)) if request.freeze else set()
    task = task_for(spec.task, spec.num_classes)
    if request.augment and not can_augment(spec.input_shape):
        raise PolicyError(f"augment=true shifts image pixels; this model's inputs are shaped {spec.input_shape}")

    generator = None
    if policy.seed_noise:
        node_index = partition[0] if partition else 0
        seed = (request.seed * 1_000_003 + request.server_round * 10_007 + node_index) % 2**31
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)

    settings = TrainSettings(
        local_epochs=request.local_epochs, batch_size=request.batch_size, optimizer=request.optimizer,
        lr=request.lr, momentum=request.momentum, weight_decay=request.weight_decay,
        max_grad_norm=request.max_grad_norm, proximal_mu=request.proximal_mu,
        grad_sample_mode=preferred_grad_sample_mode(request.model),
        l1=request.l1, augment=request.augment,
    )
    metrics: dict[str, float] = {"num-examples": len(data)}
    ledger = None
    if terms.private:
        ledger = PrivacyLedger.open(policy.state_dir, policy.data_key(request, partition))
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
        log.info(
            "round %d: %d DP-SGD steps at σ=%.3f, q=%.4f will spend ε %.3f → %.3f (cap %g, δ=%g)",
            request.server_round, steps, plan.noise_multiplier, sample_rate, before, after,
            terms.max_epsilon, terms.delta,
        )
        settings = TrainSettings(**{**settings.__dict__, "noise_multiplier": plan.noise_multiplier})

    started = time.perf_counter()
    outcome = train(model, task, data, settings, resolve_device(policy.device), generator)
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
    content = RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord(metrics)})
    return Message(content, reply_to=msg)


def _spec_from_request(msg: Message, data):
    """The model's data spec, as the coordinator built the global model, and the node's data in the
    shape it asks for (client.data.fit_view); DataError if the data cannot fit it."""
    from models import DataSpec

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
