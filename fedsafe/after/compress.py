"""A smaller model from a finished run: magnitude pruning, then int8 quantisation, measured before and after.

1. Pruning: torch.nn.utils.prune's global L1 (magnitude) pruning of the weights of every Linear and Conv
   layer (`amount`: the fraction of those weights set to zero), made permanent with prune.remove.
2. Quantisation: the pruned model is exported to ONNX and quantised by ONNX Runtime's static int8
   quantisation (QOperator format: QGemm/QLinearMatMul/QLinearConv; activation ranges calibrated on
   held-out records).
   ONNX Runtime's dynamic quantisation would leave the Gemm of every Linear layer in float32.
3. Names: the int8 graph's internal tensor and node names ("/fc1/Gemm_output_0_quantized_scale", …) are
   replaced by short ones and its doc strings dropped (`shorten_names`): on models of a few thousand
   parameters they were ~7 % of the gzip-compressed file. The graph's input and output names stay.

The result, model.int8.onnx, runs with `fedsafe predict` like any export. Sizes: the files' bytes on disk,
gzip-compressed (how they travel: pruned zeros compress), and the weights' bytes alone (a model of a few
thousand parameters is mostly graph description, which quantisation does not shrink); the metric is the task's headline
(accuracy, or r2 for regression) on the coordinator's held-out data, PyTorch's float model before and
ONNX Runtime's int8 model after. Everything here uses the coordinator's data only: no ε.
"""

from __future__ import annotations

import gzip
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .export import onnx_outputs, serving_module, torch_outputs, write_onnx
from .run import FinishedRun, RunDirError, open_run

CALIBRATION_RECORDS = 128
DEFAULT_PRUNE = 0.4  # measured on the digits MLP and CNN (README "After training"): within a point of accuracy
PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)


class CompressError(ValueError):
    """A run `compress` cannot make smaller; one line naming why."""


@dataclass
class Compression:
    metric: str
    before: float
    after_pruning: float
    after: float
    bytes_before: int
    bytes_after: int
    gzip_bytes_before: int
    gzip_bytes_after: int
    weight_bytes_before: int
    weight_bytes_after: int
    pruned_fraction: float
    records: int
    model: str

    @property
    def ratio(self) -> float:
        return self.bytes_before / self.bytes_after

    @property
    def gzip_ratio(self) -> float:
        return self.gzip_bytes_before / self.gzip_bytes_after

    @property
    def weight_ratio(self) -> float:
        return self.weight_bytes_before / self.weight_bytes_after


def prune_weights(model: nn.Module, amount: float) -> float:
    """Zero the `amount` fraction of smallest-magnitude weights over all Linear/Conv layers, permanently;
    returns the fraction of those weights that are zero afterwards."""
    from torch.nn.utils import prune

    targets = [(m, "weight") for m in model.modules() if isinstance(m, PRUNABLE)]
    if not targets:
        raise CompressError("the model has no Linear or Conv layer to prune")
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=amount)
    for module, name in targets:
        prune.remove(module, name)
    zeros = sum(int((m.weight == 0).sum()) for m, _ in targets)
    return zeros / sum(m.weight.numel() for m, _ in targets)


def headline(run: FinishedRun, outputs: np.ndarray, y: np.ndarray) -> tuple[str, float]:
    metrics = run.task.metrics(torch.from_numpy(outputs), torch.from_numpy(y))
    name = "accuracy" if "accuracy" in metrics else "r2"
    return name, float(metrics[name])


def quantise_int8(float_path: Path, out_path: Path, calibration: np.ndarray, input_name: str) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Records(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter([{input_name: calibration[i : i + 1]} for i in range(len(calibration))])

        def get_next(self):
            return next(self._batches, None)

    # QOperator (QLinearMatMul, QGemm, QLinearConv) and one scale per tensor: measured on the digits MLP and CNN
    # (~5k parameters), the smallest files at the same accuracy; QDQ and per-channel scales add graph and
    # scale overhead that, on models this small, outweighs what they save.
    quiet = logging.getLogger()  # ONNX Runtime's quantiser advises pre-processing on the root logger
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        quantize_static(str(float_path), str(out_path), Records(), quant_format=QuantFormat.QOperator,
                        per_channel=False, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
    finally:
        quiet.setLevel(level)


def shorten_names(path: Path) -> None:
    """Rename `path`'s internal tensors and nodes to short hexadecimal names and drop its doc strings, in
    place; the graph's inputs and outputs keep their names (the input spec and `fedsafe predict` use them)."""
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    kept = {value.name for value in graph.input} | {value.name for value in graph.output}
    short: dict[str, str] = {}

    def rename(name: str) -> str:
        if not name or name in kept:
            return name
        return short.setdefault(name, format(len(short), "x"))

    for tensor in graph.initializer:
        tensor.name, tensor.doc_string = rename(tensor.name), ""
    for node in graph.node:
        node.input[:] = [rename(name) for name in node.input]
        node.output[:] = [rename(name) for name in node.output]
        node.name, node.doc_string = "", ""
    del graph.value_info[:]  # shape annotations of internal tensors: ONNX Runtime infers them
    model.doc_string = graph.doc_string = ""
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def weight_bytes(path: Path) -> int:
    """Bytes of an ONNX file's tensors (initializers): the model's weights without its graph."""
    import onnx
    from onnx import numpy_helper

    return sum(numpy_helper.to_array(t).nbytes for t in onnx.load(str(path)).graph.initializer)


def _gzip_size(path: Path) -> int:
    return len(gzip.compress(path.read_bytes(), compresslevel=9))


def compress_run(run_dir: str | Path, out_dir: str | Path | None = None, amount: float = DEFAULT_PRUNE,
                 weights: str = "global") -> Compression:
    """Prune `amount` of `run_dir`'s weights, quantise to int8, and measure; writes model.onnx (float,
    unpruned: the reference), model.int8.onnx with its input spec, and compression.json to `out_dir`
    (default <run>/compressed)."""
    from .export import InputSpec
    from .predict import spec_path

    if not 0.0 <= amount < 1.0:
        raise CompressError(f"prune amount must be in [0, 1); got {amount}")
    run = open_run(run_dir, weights)
    if run.spec.task not in ("classification", "regression"):
        raise CompressError(f"compress serves classifiers and regressors; {run.family} is a {run.spec.task} model")
    x, y, _ = run.held_out()
    out = Path(out_dir).expanduser() if out_dir else run.directory / "compressed"
    out.mkdir(parents=True, exist_ok=True)
    module, input_name, shape, output_names = serving_module(run)
    reference, pruned_float, quantised = out / "model.onnx", out / "model.pruned.onnx", out / "model.int8.onnx"
    example = torch.from_numpy(x[:2])
    metric, before = headline(run, torch_outputs(module, x)[0], y)
    write_onnx(module, example, reference, input_name, output_names)

    fraction = prune_weights(module, amount)
    _, after_pruning = headline(run, torch_outputs(module, x)[0], y)
    write_onnx(module, example, pruned_float, input_name, output_names)
    calibration = x[np.random.default_rng(0).permutation(len(x))[:CALIBRATION_RECORDS]]
    try:
        quantise_int8(pruned_float, quantised, calibration, input_name)
        shorten_names(quantised)
    except Exception as err:  # noqa: BLE001 - ONNX Runtime's errors: one line
        raise CompressError(f"int8 quantisation of {run.family} failed: {type(err).__name__}: {str(err).splitlines()[0]}") from None
    finally:
        pruned_float.unlink(missing_ok=True)
    _, after = headline(run, onnx_outputs(quantised, x)[0], y)
    InputSpec(family=run.family, task=run.spec.task, input_name=input_name, input_shape=shape,
              output_names=output_names, num_classes=int(run.spec.num_classes), weights=weights, format="onnx",
              run=str(run.directory), notes=[f"{fraction:.0%} of weights pruned, int8 (ONNX Runtime static quantisation)"]
              ).save(spec_path(quantised))
    result = Compression(metric, before, after_pruning, after, reference.stat().st_size, quantised.stat().st_size,
                         _gzip_size(reference), _gzip_size(quantised), weight_bytes(reference), weight_bytes(quantised),
                         fraction, len(x), str(quantised))
    (out / "compression.json").write_text(json.dumps({**asdict(result), "ratio": result.ratio,
                                                      "gzip_ratio": result.gzip_ratio,
                                                      "weight_ratio": result.weight_ratio}, indent=1))
    return result


__all__ = ["compress_run", "prune_weights", "Compression", "CompressError", "RunDirError"]
