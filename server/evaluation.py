"""The global model a run starts from, and how the coordinator judges it on held-out data.

The coordinator builds the model from the same pieces the nodes use: models.resolve_spec (task and
input view for the family), models.build_model with the run's model options, and models.task_for;
the spec goes to the nodes in every train message, so both sides hold the same function and the
server evaluates exactly what the nodes trained.

What the evaluation reports, by task:

* classification: loss, accuracy, macro precision/recall/F1, AUROC;
* regression: mse, mae, r2 (0 is the mean predictor);
* reconstruction: mse and mae on normal records; on an anomaly set (fedsafe.client.data.DataSplit.outliers)
  also ``outlier_mse`` and ``anomaly_auroc`` (reconstruction error as the outlier score);
* generation: GenerationTask.quality: Fréchet distance to held-out records, and on 8x8 digits the
  reference classifier's score (``digits_is``), coverage and confidence.

With early stopping the held-out set is halved (seeded, stratified): ``val_*`` metrics on one half
choose when to stop and which round is best; the other half gives the reported metrics, so the
reported figures are not the ones the selection was made on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedsafe.client.data import ArrayDataset, DataSplit
from fedsafe.models import DataSpec

log = logging.getLogger("fedsafe.server")

VALIDATION_PREFIX = "val_"
GAN_SAMPLES = 1000  # generated samples per quality score


@dataclass
class GlobalModel:
    model: nn.Module
    spec: DataSpec  # what the nodes build the model from
    task: object  # fedsafe.models.tasks task
    frozen: list[str]  # parameter names not trained (transfer learning)


def server_device(cfg) -> torch.device:
    """The device the coordinator evaluates on (run setting server-device); ConfigError, in one line,
    when it names a device this machine lacks."""
    from fedsafe.client.training import resolve_device

    from .config import ConfigError

    try:
        return resolve_device(cfg.server_device)
    except ValueError as err:
        raise ConfigError(f"server-device: {err}") from None


def build_global_model(cfg, data_spec: DataSpec) -> GlobalModel:
    """The run's initial global model for data described by `data_spec`; ConfigError, naming the
    key, for anything the run cannot use: model options, the init checkpoint, freeze prefixes,
    augmentation of non-images, a model DP-SGD cannot train."""
    from fedsafe.client.data import DataError
    from fedsafe.client.dp_modes import NotPrivatisable, check_privatisable
    from fedsafe.client.precision import PrecisionError, check_precision, grad_sample_mode
    from fedsafe.client.regularize import can_augment
    from fedsafe.models import ModelConfigError, build_model, parse_model_options, preferred_grad_sample_mode, resolve_spec
    from fedsafe.models import task_for
    from fedsafe.models.transfer import check_prefixes, load_matching, parse_prefixes, read_state_dict

    from .config import ConfigError

    try:
        spec = resolve_spec(cfg.model, data_spec)
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model, spec, parse_model_options(cfg.model_options))
        task = task_for(spec.task, spec.num_classes)
        if cfg.init_checkpoint:
            loaded, skipped = load_matching(model, read_state_dict(cfg.init_checkpoint))
            log.info("init-checkpoint %s: loaded %d tensors%s", cfg.init_checkpoint, len(loaded),
                     f"; kept the fresh initialisation of {len(skipped)} that do not fit" if skipped else "")
        frozen = check_prefixes(cfg.model, [n for n, _ in model.named_parameters()], parse_prefixes(cfg.freeze))
        if cfg.augment and not can_augment(spec.input_shape):
            raise ConfigError(f"augment=true shifts image pixels; {cfg.model} on {cfg.dataset} reads inputs "
                              f"shaped {spec.input_shape}, not images")
        if cfg.dp:
            trial = build_model(cfg.model, spec, parse_model_options(cfg.model_options))
            for name, p in trial.named_parameters():
                p.requires_grad_(name not in frozen)
            private = getattr(trial, "discriminator", trial) if spec.task == "generation" else trial
            mode = grad_sample_mode(preferred_grad_sample_mode(cfg.model), cfg.precision, spec.task)
            check_privatisable(private, task.per_sample_loss, mode, spec.input_shape, task.targets, cfg.precision)
        else:
            check_precision(cfg.precision, None, spec.task)
    except (ModelConfigError, DataError, NotPrivatisable, PrecisionError) as err:
        raise ConfigError(str(err)) from None
    return GlobalModel(model, spec, task, frozen)


def split_validation(test: ArrayDataset, seed: int = 0) -> tuple[ArrayDataset, ArrayDataset]:
    """(validation, test) halves of a held-out set, stratified by label where labels are classes."""
    from sklearn.model_selection import train_test_split

    stratify = None
    if np.issubdtype(test.y.dtype, np.integer) and len(test.y):
        counts = np.bincount(test.y)
        stratify = test.y if counts[counts > 0].min() >= 2 else None
    val_idx, test_idx = train_test_split(np.arange(len(test)), test_size=0.5, random_state=seed, stratify=stratify)
    return test.subset(np.sort(val_idx)), test.subset(np.sort(test_idx))


def _real_records(x, n: int, seed: int) -> np.ndarray:
    """The real records a GAN's samples are compared with: all of an in-memory set; of a set read lazily
    (an image folder), a seeded draw of at most `n`, so that scoring never loads the whole folder."""
    if isinstance(x, np.ndarray):
        return x
    rows = np.random.default_rng(seed).choice(len(x), size=min(n, len(x)), replace=False)
    return x[np.sort(rows)]


def judge(model: nn.Module, task, data: ArrayDataset, outliers: bool, seed: int = 0) -> dict[str, float]:
    """The task's metrics of `model` on `data` (see the module docstring)."""
    from fedsafe.models import anomaly_auroc, anomaly_scores, evaluate

    if task.name == "generation":
        return task.quality(model, _real_records(data.x, GAN_SAMPLES, seed), n=GAN_SAMPLES, seed=seed)
    if outliers:
        normal = data.y == 0
        result = evaluate(model, task, data.x[normal], data.y[normal])
        if (~normal).any():
            result["outlier_mse"] = float(anomaly_scores(model, data.x[~normal]).mean())
            result["anomaly_auroc"] = anomaly_auroc(model, data.x[normal], data.x[~normal])
        return result
    return evaluate(model, task, data.x, data.y)


def make_evaluator(
    global_model: GlobalModel, split: DataSplit, validation: bool, seed: int = 0,
    device: torch.device = torch.device("cpu"),
) -> Callable[[object], dict[str, float]]:
    """The coordinator's evaluator: ArrayRecord of the global model -> metrics on held-out data
    (with `validation`, ``val_*`` metrics on half of it too), computed on `device` (run setting
    server-device). Its own copy of the model moves there once; each round's weights are copied into it
    and each held-out batch moves there once (fedsafe.models.evaluate)."""
    import copy

    from fedsafe.client.data import fit_view

    model, task = copy.deepcopy(global_model.model).to(device), global_model.task
    test = fit_view(split.test, global_model.spec.input_shape)
    val = None
    if validation:
        val, test = split_validation(test)

    def evaluator(arrays) -> dict[str, float]:
        model.load_state_dict(arrays.to_torch_state_dict())
        metrics = judge(model, task, test, split.outliers, seed)
        if val is not None:
            metrics.update({VALIDATION_PREFIX + k: v for k, v in judge(model, task, val, split.outliers, seed + 1).items()})
        return metrics

    return evaluator
