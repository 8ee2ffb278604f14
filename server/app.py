"""The coordinator's Flower ServerApp."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from .config import RunConfig
from .loop import ProgressSink, RunOutcome, print_progress, run_rounds


def global_model_setup(cfg: RunConfig):
    """The initial global model, the spec every node must build it from, and the central evaluator."""
    import torch

    from client.data import load_dataset
    from models import build_model, evaluate, task_for

    split = load_dataset(cfg.dataset, cfg.partition_by or None)
    spec = split.train.spec
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, spec)
    task = task_for(spec.task, spec.num_classes)
    model_config = {"input-shape": list(spec.input_shape), "num-classes": spec.num_classes, "task": spec.task}

    def evaluator(arrays: ArrayRecord) -> dict[str, float]:
        model.load_state_dict(arrays.to_torch_state_dict())
        return evaluate(model, task, split.test.x, split.test.y)

    return ArrayRecord(model.state_dict()), model_config, evaluator


def run_server(grid: Grid, cfg: RunConfig, progress: ProgressSink | None = print_progress) -> RunOutcome:
    from strategies import build_strategy

    initial, model_config, evaluator = global_model_setup(cfg)
    # The loop samples the nodes (server/sampling.py); the strategy trains all it is shown.
    strategy = build_strategy(cfg.strategy, fraction_train=1.0, min_train_nodes=1, min_available_nodes=1)
    return run_rounds(grid, cfg, strategy, initial, model_config, evaluator, progress)


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
