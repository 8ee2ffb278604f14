"""Run a federation of virtual nodes on this machine (or a Ray cluster) with Flower's simulation engine."""

from __future__ import annotations

import contextlib
import logging
import os
import random
from unittest import mock
from dataclasses import dataclass
from pathlib import Path

from server.config import ConfigError, RunConfig
from server.loop import ProgressSink, RunOutcome, check_out_dir, print_progress

FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_DEDUP_LOGS": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",  # Ray's future default, and it stops Ray's warning
}


def quiet_flower_environment() -> None:
    """No telemetry, no update checks, no runtime `uv sync`: offline and reproducible."""
    for key, value in FLOWER_ENV.items():
        os.environ.setdefault(key, value)


PARTITION_REPORT_MAX_NODES = 200  # above this the per-node report costs more than it tells


@dataclass(frozen=True)
class SimulationOptions:
    num_nodes: int
    # One CPU per virtual node: one Ray actor per core, each training with one thread. On 2 cores this
    # measured 0.68 s per steady round against 0.87 s for one actor with two threads (benchmarks/sim_overhead.py).
    client_cpus: float = 1.0
    client_gpus: float = 0.0
    ray_address: str | None = None  # join an existing Ray cluster instead of starting one
    ledger_dir: str | None = None  # default: <out-dir>/ledgers
    verbose: bool = False
    # Simulated Byzantine nodes (simulations/attacks.py) — for tests and research only.
    attack: str = "none"  # none, scale or sign-flip
    attackers: int = 0  # partitions 0 .. attackers-1 send poisoned updates
    attack_factor: float = 10.0

    def __post_init__(self) -> None:
        if self.num_nodes < 1:
            raise ConfigError(f"nodes must be >= 1; got {self.num_nodes}")
        try:
            self.attack_spec()
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if self.attackers > self.num_nodes:
            raise ConfigError(f"attackers ({self.attackers}) exceed nodes ({self.num_nodes})")
        if self.client_cpus <= 0 or self.client_gpus < 0:
            raise ConfigError(f"client CPUs must be > 0 and GPUs >= 0; got {self.client_cpus}, {self.client_gpus}")

    def attack_spec(self):
        from .attacks import Attack

        return Attack(self.attack, self.attackers, self.attack_factor)


def validate_against_data(cfg: RunConfig, options: SimulationOptions) -> None:
    from client.data import DataError, load_dataset, make_partitioner

    try:
        split = load_dataset(cfg.dataset, cfg.partition_by or None)
        if options.num_nodes > len(split.train):
            raise ConfigError(
                f"more nodes ({options.num_nodes}) than training samples ({len(split.train)}) in {cfg.dataset}"
            )
        make_partitioner(split.train, partition_scheme(cfg, options.num_nodes))
    except DataError as err:
        raise ConfigError(str(err)) from None
    from server.app import global_model_setup

    global_model_setup(cfg)  # the model, its options, init checkpoint and frozen names: ConfigError if unusable


def partition_scheme(cfg: RunConfig, num_nodes: int):
    from client.data import PartitionScheme

    return PartitionScheme(
        kind=cfg.partitioner, num_partitions=num_nodes, alpha=cfg.alpha, classes_per_node=cfg.classes_per_node,
        partition_by=cfg.partition_by or None, seed=cfg.seed,
    )


@contextlib.contextmanager
def deterministic_node_ids(seed: int):
    """Flower draws simulated node ids from os.urandom, and samples nodes from a set of them, so the
    same seed would still train different nodes. Seeded ids make client sampling reproducible."""
    from flwr.server.superlink.linkstate import in_memory_linkstate

    rng = random.Random(seed)

    def seeded(num_bytes: int, exclude: set[int] | None = None) -> int:
        while True:
            value = rng.getrandbits(8 * num_bytes)
            if value and not (exclude and value in exclude):
                return value

    with mock.patch.object(in_memory_linkstate, "generate_rand_int_from_bytes", seeded):
        yield


def _dispatch_pending_messages(state, queue, nodes_mapping, f_stop) -> None:
    """Flower's simulation engine polls every registered node for messages ten times a second, and
    each poll scans every stored message: O(nodes × messages) under one lock, which stalls 10,000
    virtual nodes. This does the same job by polling only the nodes that have a message waiting."""
    while not f_stop.is_set():
        with state.lock:
            waiting = {m.metadata.dst_node_id for m in state.message_ins_store.values()
                       if m.metadata.delivered_at == ""}
        for node_id in waiting & nodes_mapping.keys():
            for message in state.get_message_ins(node_id=node_id, limit=1):
                queue.put(message)
        f_stop.wait(0.1)


@contextlib.contextmanager
def scalable_engine():
    from flwr.server.superlink.fleet.vce import vce_api

    with mock.patch.object(vce_api, "add_messages_to_queue", _dispatch_pending_messages):
        yield


def _simulated_federation(cfg: RunConfig, options: SimulationOptions, max_epsilon: float | None = None,
                          node_caps: dict[int, float] | None = None):
    """The run's config for `options.num_nodes` nodes, and the virtual nodes' ClientApp.
    `node_caps` gives some partitions their own lifetime ε cap (heterogeneous operators)."""
    from client.app import make_client_app
    from client.policy import DEFAULT_MAX_EPSILON, NodePolicy

    cfg = RunConfig(**{**cfg.__dict__, "num_partitions": options.num_nodes,
                       "min_nodes": options.num_nodes})
    if options.num_nodes <= PARTITION_REPORT_MAX_NODES:
        from client.data import load_dataset

        from .partition_report import write_partition_report

        data = load_dataset(cfg.dataset, cfg.partition_by or None).train
        write_partition_report(data, partition_scheme(cfg, options.num_nodes), cfg.out_path)
    ledger_dir = options.ledger_dir or str(Path(cfg.out_dir) / "ledgers")
    # The researcher is every virtual node's operator: the node policy travels inside the ClientApp
    # (pickled to the Ray actors), not in module globals, which the actors would never see.
    policy = NodePolicy(
        state_dir=ledger_dir,
        max_epsilon=max_epsilon or (cfg.epsilon if cfg.dp else DEFAULT_MAX_EPSILON),
        delta=cfg.delta,
        allow_non_private=not cfg.dp,
        seed_noise=True,
    )
    attack = options.attack_spec()
    mods = [attack.mod] if attack.active else []
    caps = dict(node_caps or {})

    def policy_source(context):
        cap = caps.get(int(context.node_config.get("partition-id", -1)))
        return policy if cap is None else policy.with_overrides(max_epsilon=cap)

    return cfg, make_client_app(policy_source=policy_source, extra_mods=mods)


def simulate_in_process(cfg: RunConfig, options: SimulationOptions, progress: ProgressSink | None = None,
                        max_epsilon: float | None = None, drop=None) -> RunOutcome:
    """`simulate()` without Ray: the nodes' ClientApp is called in this process (simulations/local.py).
    `max_epsilon` overrides the virtual nodes' lifetime cap; `drop(node, message)` loses messages."""
    quiet_flower_environment()
    validate_against_data(cfg, options)
    from server.app import run_server

    from .local import LocalGrid

    cfg, client_app = _simulated_federation(cfg, options, max_epsilon)
    if not options.verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    return run_server(LocalGrid(client_app, options.num_nodes, drop=drop), cfg, progress)


def simulate(cfg: RunConfig, options: SimulationOptions, progress: ProgressSink | None = print_progress) -> RunOutcome:
    """Run `cfg` over `options.num_nodes` virtual nodes; returns the final model and per-round history."""
    quiet_flower_environment()
    validate_against_data(cfg, options)
    check_out_dir(cfg)
    import torch
    from flwr.simulation import run_simulation

    from server.app import make_server_app

    cfg, client_app = _simulated_federation(cfg, options)
    outcomes: list[RunOutcome] = []
    server_app = make_server_app(config_source=lambda _ctx: cfg, on_finish=outcomes.append, progress=progress)

    cpus = options.client_cpus
    backend_config = {
        "client_resources": {"num_cpus": cpus, "num_gpus": options.client_gpus},
        "init_args": {"num_cpus": int(os.cpu_count() or 1)} if options.ray_address is None
        else {"address": options.ray_address},
    }
    if not options.verbose:
        # Flower's INFO lines and its run_simulation deprecation notice; fedsafe prints its own progress
        # and logs refusals and rejected updates under "fedsafe.*".
        logging.getLogger("flwr").setLevel(logging.ERROR)
    torch.set_num_threads(os.cpu_count() or 1)  # the driver: central evaluation
    with deterministic_node_ids(cfg.seed), scalable_engine():
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=options.num_nodes,
            backend_config=backend_config,
            verbose_logging=options.verbose,
        )
    if not outcomes:
        raise RuntimeError("the simulation ended without finishing its rounds; see the log above")
    return outcomes[0]
