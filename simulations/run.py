"""Run a federation of virtual nodes on this machine (or a Ray cluster) with Flower's simulation engine."""

from __future__ import annotations

import functools
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsafe.flower.linkstate import deterministic_node_ids, seeded_ids
from fedsafe.flower.simulation import SIMULATED_GRID_POLL_SECONDS, named_virtual_nodes, scalable_engine, warm_actors
from fedsafe.server.config import ConfigError, RunConfig
from fedsafe.server.loop import ProgressSink, RunOutcome, check_out_dir, print_progress
from fedsafe.server.plots import plots_in_background

from .backend import BackendChoice, BackendError, choose_backend
from .engine import LocalRay, quiet_flower_environment, start_local_ray

PARTITION_REPORT_MAX_NODES = 200  # above this the per-node report costs more than it tells
PARTITION_STORE_DIR = "federation"  # under the out-dir: the partitioned training split the virtual nodes read


@dataclass(frozen=True)
class SimulationOptions:
    num_nodes: int
    # One CPU per virtual node: one Ray actor per core, each training with one thread. On 2 cores this
    # measured 0.26-0.29 s per steady round against 0.45-0.48 s for one actor with two threads
    # (benchmarks/sim_overhead.py, 10 of 100 nodes per round).
    client_cpus: float = 1.0
    client_gpus: float = 0.0
    ray_address: str | None = None  # join an existing Ray cluster instead of starting one
    ledger_dir: str | None = None  # default: <out-dir>/ledgers
    verbose: bool = False
    # Simulated Byzantine nodes (simulations/attacks.py) — for tests and research only.
    attack: str = "none"  # none, scale or sign-flip
    attackers: int = 0  # partitions 0 .. attackers-1 send poisoned updates
    attack_factor: float = 10.0
    # The virtual nodes' node-config cap-basis: which ε of a distributed-DP run their cap (ε) counts.
    cap_basis: str = "own-update"
    backend: str = "auto"  # local, ray or auto (simulations/backend.py)
    # The local backend's processes (simulations/workers.py): 1 trains every node in this process, where a
    # caller's own hooks and monkeypatches see them; None forks one worker per core (the CLI's default).
    local_workers: int | None = 1

    def __post_init__(self) -> None:
        if self.num_nodes < 1:
            raise ConfigError(f"nodes must be >= 1; got {self.num_nodes}")
        self.backend_choice()  # ConfigError for an unknown backend, or local with a cluster or GPUs
        try:
            self.attack_spec()
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if self.cap_basis not in ("own-update", "aggregate"):
            raise ConfigError(f"cap-basis must be own-update or aggregate; got {self.cap_basis!r}")
        if self.attackers > self.num_nodes:
            raise ConfigError(f"attackers ({self.attackers}) exceed nodes ({self.num_nodes})")
        if self.client_cpus <= 0 or self.client_gpus < 0:
            raise ConfigError(f"client CPUs must be > 0 and GPUs >= 0; got {self.client_cpus}, {self.client_gpus}")
        if self.client_gpus > 0 and self.ray_address is None:
            import torch

            if not torch.cuda.is_available():  # Ray would wait forever for a GPU to place the nodes on
                raise ConfigError(f"--client-gpus {self.client_gpus:g} asks for a GPU per node, but this machine "
                                  "has no CUDA GPU (torch.cuda.is_available() is False)")

    def backend_choice(self) -> BackendChoice:
        try:
            return choose_backend(self.backend, self.num_nodes, self.ray_address, self.client_gpus,
                                  self.local_workers)
        except BackendError as err:
            raise ConfigError(str(err)) from None

    @property
    def node_device(self) -> str:
        """Where each virtual node trains: "cuda" with a GPU share (Ray makes the share's GPU the actor's only
        visible one, so "cuda" is that GPU), else "cpu" — never "auto": Ray leaves every GPU visible to an
        actor that reserved none (RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0), and "auto" would crowd them all
        onto GPU 0 beyond what Ray accounts for."""
        return "cuda" if self.client_gpus > 0 else "cpu"

    def backend_config(self) -> dict:
        """Flower's Ray backend config: each virtual node's actor reserves client_cpus and client_gpus (a
        fraction: that many nodes share one GPU); init_args join a cluster when one is named."""
        return {
            "client_resources": {"num_cpus": self.client_cpus, "num_gpus": self.client_gpus},
            "init_args": {} if self.ray_address is None else {"address": self.ray_address},
        }

    def attack_spec(self):
        from .attacks import Attack

        return Attack(self.attack, self.attackers, self.attack_factor)


def validate_against_data(cfg: RunConfig, options: SimulationOptions) -> None:
    from fedsafe.client.data import DataError, load_dataset, load_partition, make_partitioner

    try:
        split = load_dataset(cfg.dataset, cfg.partition_by or None)
        if options.num_nodes > len(split.train):
            raise ConfigError(
                f"more nodes ({options.num_nodes}) than training samples ({len(split.train)}) in {cfg.dataset}"
            )
        scheme = partition_scheme(cfg, options.num_nodes)
        make_partitioner(split.train, scheme)
        if options.num_nodes > PARTITION_REPORT_MAX_NODES and scheme.kind in ("dirichlet", "pathological"):
            # flwr-datasets draws these for every node at once, and can fail to; the driver draws them
            # for the partition report up to that size, and beyond it here, so that an impossible split
            # is refused before the run rather than by every sampled node.
            load_partition(cfg.dataset, 0, scheme)
    except DataError as err:
        raise ConfigError(str(err)) from None
    from fedsafe.server.app import global_model_setup

    global_model_setup(cfg)  # the model, its options, init checkpoint and frozen names: ConfigError if unusable


def partition_scheme(cfg: RunConfig, num_nodes: int):
    from fedsafe.client.data import PartitionScheme

    return PartitionScheme(
        kind=cfg.partitioner, num_partitions=num_nodes, alpha=cfg.alpha, classes_per_node=cfg.classes_per_node,
        partition_by=cfg.partition_by or None, seed=cfg.seed,
    )


@dataclass(frozen=True)
class SimulatedFederation:
    """A run's config for its virtual nodes, their ClientApp, the warm-up each Ray actor runs when it is
    created, and the partition store written for the run (None: the nodes partition lazily)."""

    cfg: RunConfig
    client_app: Any
    warm_up: Callable[[], None]
    partition_store: Path | None

    def remove_store(self) -> None:
        """The store serves one run (a resumed run writes it again); one copy of the training split per
        run would otherwise pile up in every sweep."""
        if self.partition_store is not None:
            shutil.rmtree(self.partition_store, ignore_errors=True)


def _simulated_federation(cfg: RunConfig, options: SimulationOptions, max_epsilon: float | None = None,
                          node_caps: dict[int, float] | None = None) -> SimulatedFederation:
    """The federation of `options.num_nodes` virtual nodes for `cfg`; `node_caps` gives some partitions
    their own lifetime ε cap (heterogeneous operators)."""
    from fedsafe.client.app import make_client_app, warm_up_simulated_node
    from fedsafe.client.policy import DEFAULT_MAX_EPSILON, NodePolicy

    cfg = RunConfig(**{**cfg.__dict__, "num_partitions": options.num_nodes, "min_nodes": options.num_nodes,
                       "poll_interval": min(cfg.poll_interval, SIMULATED_GRID_POLL_SECONDS)})
    scheme = partition_scheme(cfg, options.num_nodes)
    partition_store = None
    if options.num_nodes <= PARTITION_REPORT_MAX_NODES:
        # Every node's share is computed here for the report anyway; stored once, it spares each
        # simulation actor loading and partitioning the whole dataset (and importing scikit-learn and
        # HF datasets to do it). Larger federations partition lazily, node by node, in the actors.
        from fedsafe.client.data import load_dataset, partition_indices, save_partitions

        from .partition_report import write_partition_report

        data = load_dataset(cfg.dataset, cfg.partition_by or None).train
        parts = partition_indices(data, scheme)
        write_partition_report(data, scheme, cfg.out_path, parts)
        partition_store = cfg.out_path / PARTITION_STORE_DIR
        save_partitions(partition_store, cfg.dataset, data, scheme, parts)
    ledger_dir = options.ledger_dir or str(Path(cfg.out_dir) / "ledgers")
    # The researcher is every virtual node's operator: the node policy travels inside the ClientApp
    # (pickled to the Ray actors), not in module globals, which the actors would never see.
    policy = NodePolicy(
        state_dir=ledger_dir,
        max_epsilon=max_epsilon or (cfg.epsilon if cfg.dp else DEFAULT_MAX_EPSILON),
        delta=cfg.delta,
        allow_non_private=not cfg.dp,
        allow_models=(cfg.model, cfg.task),  # the researcher's own model and task code, if the run names them
        seed_noise=True,
        simulated=True,
        cap_basis=options.cap_basis,
        device=options.node_device,
        partition_store=None if partition_store is None else str(partition_store),
    )
    attack = options.attack_spec()
    mods = [attack.mod] if attack.active else []
    caps = dict(node_caps or {})

    def policy_source(context):
        cap = caps.get(int(context.node_config.get("partition-id", -1)))
        return policy if cap is None else policy.with_overrides(max_epsilon=cap)

    warm_up = functools.partial(warm_up_simulated_node, cfg.dataset, scheme, policy.partition_store)
    return SimulatedFederation(cfg, make_client_app(policy_source=policy_source, extra_mods=mods), warm_up,
                               partition_store)


def simulate_in_process(cfg: RunConfig, options: SimulationOptions, progress: ProgressSink | None = None,
                        max_epsilon: float | None = None, drop=None) -> RunOutcome:
    """`simulate()` without Ray: the nodes' ClientApp is called in this process (simulations/local.py).
    `max_epsilon` overrides the virtual nodes' lifetime cap; `drop(node, message)` loses messages."""
    quiet_flower_environment()
    with plots_in_background():
        validate_against_data(cfg, options)
        federation = _simulated_federation(cfg, options, max_epsilon)
        try:
            return _run_in_process(federation, options, progress, drop)
        finally:
            federation.remove_store()


def _run_in_process(federation: SimulatedFederation, options: SimulationOptions, progress: ProgressSink | None,
                    drop=None) -> RunOutcome:
    """The round loop over a LocalGrid: every node's ClientApp called in this process or in its forked worker
    processes (simulations/workers.py), each training with one thread (as each Ray actor does), under the
    node ids Flower's engine would give."""
    import torch

    from fedsafe.server.app import run_server

    from .local import LocalGrid

    if not options.verbose:  # as on Ray: fedsafe prints its own progress and logs refusals under "fedsafe.*"
        logging.getLogger("flwr").setLevel(logging.ERROR)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # before any worker is forked: each inherits one thread
    grid = LocalGrid(federation.client_app, options.num_nodes, drop=drop, quiet=not options.verbose,
                     node_ids=simulated_node_ids(federation.cfg.seed, options.num_nodes),
                     workers=options.backend_choice().workers)
    try:
        return run_server(grid, federation.cfg, progress)
    finally:
        grid.close()
        torch.set_num_threads(threads)


def simulated_node_ids(seed: int, num_nodes: int) -> list[int]:
    """The ids Flower's simulation engine gives partitions 0 .. num_nodes-1 under `deterministic_node_ids(seed)`
    (it registers the nodes first, one draw each): the coordinator samples by id, so the same seed samples
    the same partitions in process as on Ray."""
    from flwr.common.constant import NODE_ID_NUM_BYTES, SUPERLINK_NODE_ID

    draw = seeded_ids(seed)  # Flower's draws under deterministic_node_ids, without importing its link state
    ids: list[int] = []
    taken = {SUPERLINK_NODE_ID, 0}
    for _ in range(num_nodes):
        ids.append(draw(NODE_ID_NUM_BYTES, exclude=taken))
        taken.add(ids[-1])
    return ids


def simulate(cfg: RunConfig, options: SimulationOptions, progress: ProgressSink | None = print_progress,
             local_ray: LocalRay | None = None) -> RunOutcome:
    """Run `cfg` over `options.num_nodes` virtual nodes; returns the final model and per-round history.

    On the backend `options.backend` chooses: in this process (local) or on Flower's simulation engine.
    `local_ray`: Ray already starting for this run (fedsafe.simulations.engine.start_local_ray, called by a
    caller with its own preparation to overlap); otherwise it starts here. Either way it is stopped
    when the run ends or fails."""
    quiet_flower_environment()
    with plots_in_background():  # matplotlib imported and the figures drawn on another core
        if options.backend_choice().name == "local":
            if local_ray is not None:
                local_ray.release()
            return _simulate_locally(cfg, options, progress)
        if local_ray is None:
            # Ray boots while the driver checks the run and prepares the federation; on a cluster Flower joins it.
            local_ray = start_local_ray(options.ray_address, options.verbose)
        try:
            return _simulate(cfg, options, progress, local_ray)
        finally:
            if local_ray is not None:
                local_ray.release()


def _simulate_locally(cfg: RunConfig, options: SimulationOptions, progress: ProgressSink | None) -> RunOutcome:
    validate_against_data(cfg, options)
    check_out_dir(cfg)
    federation = _simulated_federation(cfg, options)
    try:
        return _run_in_process(federation, options, progress)
    finally:
        federation.remove_store()


def _simulate(cfg: RunConfig, options: SimulationOptions, progress: ProgressSink | None,
              local_ray: LocalRay | None) -> RunOutcome:
    validate_against_data(cfg, options)
    check_out_dir(cfg)
    federation = _simulated_federation(cfg, options)
    try:
        if local_ray is not None:
            local_ray.ready()
        return _run_on_ray(federation, options, progress)
    finally:
        federation.remove_store()


def _run_on_ray(federation: SimulatedFederation, options: SimulationOptions,
                progress: ProgressSink | None) -> RunOutcome:
    import torch
    from flwr.simulation import run_simulation

    from fedsafe.server.app import make_server_app

    cfg = federation.cfg
    outcomes: list[RunOutcome] = []
    server_app = make_server_app(config_source=lambda _ctx: cfg, on_finish=outcomes.append, progress=progress)
    backend_config = options.backend_config()
    if not options.verbose:
        # Flower's INFO lines and its run_simulation deprecation notice; fedsafe prints its own progress
        # and logs refusals and rejected updates under "fedsafe.*".
        logging.getLogger("flwr").setLevel(logging.ERROR)
    torch.set_num_threads(os.cpu_count() or 1)  # the driver: central evaluation
    with deterministic_node_ids(cfg.seed), named_virtual_nodes(), scalable_engine(), warm_actors(federation.warm_up):
        run_simulation(
            server_app=server_app,
            client_app=federation.client_app,
            num_supernodes=options.num_nodes,
            backend_config=backend_config,
            verbose_logging=options.verbose,
        )
    if not outcomes:
        raise RuntimeError("the simulation ended without finishing its rounds; see the log above")
    return outcomes[0]
