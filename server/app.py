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


def run_server(grid: Grid, cfg: RunConfig, progress: ProgressSink | None = print_progress) -> RunOutcome:
    from strategies import build_strategy

    initial, model_config, evaluator = global_model_setup(cfg)
    # The loop samples the nodes (server/sampling.py); the strategy trains all it is shown.
    strategy = build_strategy(cfg.strategy, fraction_train=1.0, min_train_nodes=1, min_available_nodes=1)
    return run_rounds(grid, cfg, strategy, initial, model_config, evaluator, progress)


def make_server_app(
    config_source: Callable[[Context], RunConfig] = lambda ctx: RunConfig.from_mapping(ctx.run_config),
    on_finish: Callable[[RunOutcome], Any] | None = None,
) -> ServerApp:
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        outcome = run_server(grid, config_source(context))
        if on_finish is not None:
            on_finish(outcome)

    return server_app


app = make_server_app()
