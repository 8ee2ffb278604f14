"""In-process federations for tests: the real server loop, strategies and node ClientApp, no Ray."""

from __future__ import annotations

from fedsafe.server.app import build_run_strategy, global_model_setup
from fedsafe.server.config import RunConfig
from fedsafe.server.loop import run_rounds
from fedsafe.simulations.local import LocalGrid
from fedsafe.simulations.run import SimulationOptions, _simulated_federation


def federation(tmp_path, nodes: int = 5, drop=None, node_caps=None, attack="none", attackers=0, factor=5.0,
               **overrides):
    """(cfg, grid, strategy) for `nodes` virtual nodes; `overrides` are RunConfig fields."""
    cfg = RunConfig(**{"num_rounds": 3, "local_epochs": 1, "out_dir": str(tmp_path / "run"), **overrides})
    options = SimulationOptions(num_nodes=nodes, attack=attack, attackers=attackers, attack_factor=factor)
    federation = _simulated_federation(cfg, options, node_caps=node_caps)
    return federation.cfg, LocalGrid(federation.client_app, nodes, drop=drop), build_run_strategy(federation.cfg)


def run(cfg, grid, strategy, progress=None):
    initial, model_config, evaluator = global_model_setup(cfg)
    return run_rounds(grid, cfg, strategy, initial, model_config, evaluator, progress)
