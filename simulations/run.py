"""Run a federation of virtual nodes on this machine (or a Ray cluster) with Flower's simulation engine."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from server.config import ConfigError, RunConfig
from server.loop import ProgressSink, RunOutcome, check_out_dir, print_progress

FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_DEDUP_LOGS": "0",
}


def quiet_flower_environment() -> None:
    """No telemetry, no update checks, no runtime `uv sync`: offline and reproducible."""
    for key, value in FLOWER_ENV.items():
        os.environ.setdefault(key, value)


@dataclass(frozen=True)
class SimulationOptions:
    num_nodes: int
    client_cpus: float = 0.0  # 0: every core to one actor (fastest on small machines, measured)
    client_gpus: float = 0.0
    ray_address: str | None = None  # join an existing Ray cluster instead of starting one
    ledger_dir: str | None = None  # default: <out-dir>/ledgers
    verbose: bool = False

    def __post_init__(self) -> None:
        if self.num_nodes < 1:
            raise ConfigError(f"nodes must be >= 1; got {self.num_nodes}")
        if self.client_cpus < 0 or self.client_gpus < 0:
            raise ConfigError("client CPUs and GPUs must be >= 0")


def validate_against_data(cfg: RunConfig, options: SimulationOptions) -> None:
    from client.data import DataError, load_dataset

    try:
        split = load_dataset(cfg.dataset)
    except DataError as err:
        raise ConfigError(str(err)) from None
    if options.num_nodes > len(split.train):
        raise ConfigError(
            f"more nodes ({options.num_nodes}) than training samples ({len(split.train)}) in {cfg.dataset}"
        )


def simulate(cfg: RunConfig, options: SimulationOptions, progress: ProgressSink | None = print_progress) -> RunOutcome:
    """Run `cfg` over `options.num_nodes` virtual nodes; returns the final model and per-round history."""
    quiet_flower_environment()
    validate_against_data(cfg, options)
    check_out_dir(cfg)
    import torch
    from flwr.simulation import run_simulation

    from client.app import make_client_app
    from client.policy import DEFAULT_MAX_EPSILON, NodePolicy
    from server.app import make_server_app

    cfg = RunConfig(**{**cfg.__dict__, "num_partitions": options.num_nodes,
                       "min_nodes": options.num_nodes})
    ledger_dir = options.ledger_dir or str(Path(cfg.out_dir) / "ledgers")
    # The researcher is every virtual node's operator: the node policy travels inside the ClientApp
    # (pickled to the Ray actors), not in module globals, which the actors would never see.
    policy = NodePolicy(
        state_dir=ledger_dir,
        max_epsilon=cfg.epsilon if cfg.dp else DEFAULT_MAX_EPSILON,
        delta=cfg.delta,
        allow_non_private=not cfg.dp,
        seed_noise=True,
    )
    outcomes: list[RunOutcome] = []
    server_app = make_server_app(config_source=lambda _ctx: cfg, on_finish=outcomes.append)
    client_app = make_client_app(policy_source=lambda _ctx: policy)

    cpus = options.client_cpus or float(os.cpu_count() or 1)
    backend_config = {
        "client_resources": {"num_cpus": cpus, "num_gpus": options.client_gpus},
        "init_args": {"num_cpus": int(os.cpu_count() or 1)} if options.ray_address is None
        else {"address": options.ray_address},
    }
    if not options.verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    torch.set_num_threads(max(1, int(cpus)))
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
