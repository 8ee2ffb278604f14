"""The coordinator's Flower ServerApp."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from .config import RunConfig
from .loop import ProgressSink, RunOutcome, print_progress, run_rounds


def global_model_setup(cfg: RunConfig):
    """The initial global model, the spec every node must build it from, and the central evaluator
    (server/evaluation.py: the task's metrics, the same model builder and task as the nodes)."""
    from client.data import load_dataset

    from .evaluation import build_global_model, make_evaluator

    split = load_dataset(cfg.dataset, cfg.partition_by or None)
    built = build_global_model(cfg, split.train.spec)
    spec = built.spec
    model_config = {"input-shape": list(spec.input_shape), "num-classes": spec.num_classes, "task": spec.task}
    evaluator = make_evaluator(built, split, validation=cfg.early_stopping_patience > 0)
    return ArrayRecord(built.model.state_dict()), model_config, evaluator


def build_run_strategy(cfg: RunConfig):
    """The run's strategy chain: [budget-aware selection →] [SecAgg+ →] [client-level DP →] Flower strategy.

    The round loop samples the nodes (server/sampling.py) and shows the chain only those, so every
    strategy here trains all the nodes it is shown.
    """
    from strategies import build_strategy

    if cfg.client_dp != "off":
        from strategies.client_dp import build_client_dp

        sampled = cfg.expected_sample_size() or max(int(cfg.min_nodes * cfg.fraction_train), cfg.min_train_nodes())
        common = dict(fraction_train=1.0, fraction_evaluate=0.0, min_evaluate_nodes=0, min_available_nodes=1)
        strategy = build_client_dp(
            cfg.strategy, common, cfg.strategy_params(), mode=cfg.client_dp,
            noise_multiplier=cfg.client_noise_multiplier, clipping_norm=cfg.client_clipping_norm,
            num_sampled=sampled, population=max(cfg.num_partitions or cfg.min_nodes, sampled),
            delta=cfg.client_level_delta, max_epsilon=cfg.client_level_epsilon or None,
            target_quantile=cfg.client_target_quantile, clip_lr=cfg.client_clip_lr,
        )
    else:
        strategy = build_strategy(
            cfg.strategy, fraction_train=1.0, min_train_nodes=1, min_available_nodes=1,
            params=cfg.strategy_params(),
        )
    if cfg.secagg:
        from strategies.secagg import SecAggPlusAggregation

        strategy = SecAggPlusAggregation(
            strategy, num_shares=cfg.secagg_shares, reconstruction_threshold=cfg.secagg_threshold,
            clipping_range=cfg.secagg_clipping_range, timeout=cfg.round_timeout,
        )
    if cfg.budget_aware:
        from strategies.budget_aware import BudgetAwareSelection

        strategy = BudgetAwareSelection(strategy)
    return strategy


def run_server(grid: Grid, cfg: RunConfig, progress: ProgressSink | None = print_progress) -> RunOutcome:
    initial, model_config, evaluator = global_model_setup(cfg)
    return run_rounds(grid, cfg, build_run_strategy(cfg), initial, model_config, evaluator, progress)


def make_server_app(
    config_source: Callable[[Context], RunConfig] = lambda ctx: RunConfig.from_mapping(ctx.run_config),
    on_finish: Callable[[RunOutcome], Any] | None = None,
    progress: ProgressSink | None = print_progress,
) -> ServerApp:
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        outcome = run_server(grid, config_source(context), progress)
        if on_finish is not None:
            on_finish(outcome)

    return server_app


app = make_server_app()
