"""The coordinator's Flower ServerApp."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from .config import RunConfig
from .loop import ProgressSink, RunOutcome, print_progress, run_rounds


log = logging.getLogger("fedsafe.server")


def central_data(cfg: RunConfig):
    """(model spec, held-out data or None) for the coordinator.

    `eval-path` (a data file) is the held-out set when given; otherwise a built-in dataset's test split,
    or the 25 % split of a `dataset` file. A coordinator without data (nodes bring their own) names the
    model's `input-shape` and `num-classes` and runs without central evaluation.
    """
    from dataclasses import replace

    from client.data import DataError, is_builtin, load_dataset, load_file
    from models import DataSpec

    from .config import ConfigError

    test = None
    spec = None
    try:
        if cfg.eval_path:
            test = load_file(cfg.eval_path)
            spec = test.spec
        elif cfg.dataset and (is_builtin(cfg.dataset) or Path(cfg.dataset).expanduser().exists()):
            split = load_dataset(cfg.dataset)
            test, spec = split.test, split.train.spec
    except DataError as err:
        raise ConfigError(f"central evaluation data: {err}") from None
    if spec is None:
        if cfg.model_input_shape is None or not cfg.num_classes:
            raise ConfigError(
                f"the coordinator has no data to build the model from (dataset={cfg.dataset!r} is not built in "
                "and not a file here): set eval-path=<held-out .npz/.csv>, or input-shape and num-classes"
            )
        spec = DataSpec(input_shape=cfg.model_input_shape, num_classes=cfg.num_classes)
    if cfg.model_input_shape is not None and cfg.model_input_shape != tuple(spec.input_shape):
        raise ConfigError(f"input-shape={cfg.input_shape} but the evaluation data is shaped {tuple(spec.input_shape)}")
    if cfg.num_classes:
        if test is not None and len(test.y) and int(test.y.max()) >= cfg.num_classes:
            raise ConfigError(f"num-classes={cfg.num_classes} but the evaluation data has label {int(test.y.max())}")
        spec = replace(spec, num_classes=cfg.num_classes)
    if test is not None:
        test = replace(test, spec=spec)
    return spec, test


def global_model_setup(cfg: RunConfig):
    """The initial global model, the spec every node must build it from, and the central evaluator
    (None when the coordinator has no held-out data)."""
    import torch

    from models import build_model, evaluate, task_for

    spec, test = central_data(cfg)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, spec)
    task = task_for(spec.task, spec.num_classes)
    model_config = {"input-shape": list(spec.input_shape), "num-classes": spec.num_classes, "task": spec.task}

    evaluator = None
    if test is not None:
        def evaluator(arrays: ArrayRecord) -> dict[str, float]:
            model.load_state_dict(arrays.to_torch_state_dict())
            return evaluate(model, task, test.x, test.y)

    return ArrayRecord(model.state_dict()), model_config, evaluator


def run_server(grid: Grid, cfg: RunConfig, progress: ProgressSink | None = print_progress) -> RunOutcome:
    from strategies import StrikesStrategy, build_strategy

    initial, model_config, evaluator = global_model_setup(cfg)
    strategy = StrikesStrategy(
        build_strategy(cfg.strategy, fraction_train=cfg.fraction_train,
                       min_train_nodes=min(cfg.min_replies, cfg.min_nodes), min_available_nodes=cfg.min_nodes),
        cfg.max_strikes,
    )
    return run_rounds(grid, cfg, strategy, initial, model_config, evaluator, progress)


def make_server_app(
    config_source: Callable[[Context], RunConfig] = lambda ctx: RunConfig.from_mapping(ctx.run_config),
    on_finish: Callable[[RunOutcome], Any] | None = None,
) -> ServerApp:
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        from client.data import DataError

        from .checkpoint import CheckpointError
        from .config import ConfigError

        try:
            cfg = config_source(context)
            outcome = run_server(grid, cfg)
        except (ConfigError, CheckpointError, DataError) as err:
            # `flwr run --stream` exits 0 whatever happens to the run: say it in one line the operator sees.
            log.error("fedsafe: run FAILED: %s", err)
            raise
        last = outcome.history[-1] if outcome.history else {}
        print(f"fedsafe: run finished after round {last.get('round')} of {cfg.num_rounds}; results and checkpoint "
              f"in {cfg.out_path.resolve()}", flush=True)
        if on_finish is not None:
            on_finish(outcome)

    return server_app


app = make_server_app()
