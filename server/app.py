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
    """(model spec, held-out DataSplit or None) for the coordinator.

    `eval-path` (a data file) is the held-out set when given; otherwise a built-in dataset's test split,
    or the 25 % split of a `dataset` file. A coordinator without data (nodes bring their own) names the
    model's `input-shape` and `num-classes` and runs without central evaluation.
    """
    from dataclasses import replace

    from fedsafe.client.data import DataError, DataSplit, is_builtin, load_dataset, load_file
    from fedsafe.models import DataSpec

    from .config import ConfigError

    test = None
    spec = None
    outliers = False
    try:
        if cfg.eval_path:
            test = load_file(cfg.eval_path)
            spec = test.spec
        elif cfg.dataset and (is_builtin(cfg.dataset) or Path(cfg.dataset).expanduser().exists()):
            split = load_dataset(cfg.dataset, cfg.partition_by or None)
            test, spec, outliers = split.test, split.train.spec, split.outliers
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
    if cfg.task:  # the run's own task (a user's loss and metrics) instead of the data's
        spec = replace(spec, task=cfg.task)
    if test is None:
        return spec, None
    test = replace(test, spec=spec)
    return spec, DataSplit(train=test, test=test, outliers=outliers)


def global_model_setup(cfg: RunConfig):
    """The initial global model, the spec every node must build it from, and the central evaluator
    (server/evaluation.py: the task's metrics, the same model builder and task as the nodes; None when
    the coordinator has no held-out data)."""
    from .evaluation import build_global_model, make_evaluator, server_device

    spec, split = central_data(cfg)
    built = build_global_model(cfg, spec)
    spec = built.spec
    model_config = {"input-shape": list(spec.input_shape), "num-classes": spec.num_classes, "task": spec.task}
    evaluator = None
    if split is not None:
        evaluator = make_evaluator(built, split, validation=cfg.early_stopping_patience > 0,
                                   device=server_device(cfg))
    return ArrayRecord(built.model.state_dict()), model_config, evaluator


def build_run_strategy(cfg: RunConfig):
    """The run's strategy chain: [budget-aware selection →] [strikes →] [SecAgg+ →] [client-level DP →]
    Flower strategy.

    The round loop samples the nodes (server/sampling.py) and shows the chain only those, so every
    strategy here trains all the nodes it is shown.
    """
    from fedsafe.strategies import build_strategy

    if cfg.client_dp != "off":
        from fedsafe.strategies.client_dp import build_client_dp

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
        from fedsafe.strategies.secagg import SecAggPlusAggregation

        strategy = SecAggPlusAggregation(
            strategy, num_shares=cfg.secagg_shares, reconstruction_threshold=cfg.secagg_threshold,
            clipping_range=cfg.secagg_clipping_range, timeout=cfg.round_timeout, distributed_dp=cfg.distributed_dp,
        )
    if cfg.max_strikes and not cfg.secagg:  # under SecAgg+ no single update can be checked, so none is struck
        from fedsafe.strategies import StrikesStrategy

        strategy = StrikesStrategy(strategy, cfg.max_strikes)
    if cfg.budget_aware:
        from fedsafe.strategies.budget_aware import BudgetAwareSelection

        strategy = BudgetAwareSelection(strategy)
    return strategy


def run_server(grid: Grid, cfg: RunConfig, progress: ProgressSink | None = print_progress) -> RunOutcome:
    if progress is not None and cfg.picks_line():  # what fedsafe chose where the user did not (fedsafe.picked_defaults)
        print(cfg.picks_line(), flush=True)
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
        from fedsafe.client.data import DataError

        from .checkpoint import CheckpointError
        from .config import ConfigError

        try:
            cfg = config_source(context)
            outcome = run_server(grid, cfg, progress)
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
