"""Export a finished run's model as ONNX or TorchScript, with its input spec and model card.

What is exported, by task (the model's forward as a deployment calls it):

* classification / regression (mlp, cnn, lstm, gru, transformer): ``input`` (batch, *shape) -> ``output``
  (logits, or the regression targets);
* reconstruction (autoencoder): ``input`` -> ``reconstruction`` and ``anomaly_score`` (each record's mean
  squared reconstruction error, models.tasks.anomaly_scores);
* generation (gan): the generator, ``noise`` (batch, latent_dim) -> ``sample``. The discriminator saw the
  nodes' records and stays behind; the generator is private by post-processing (models/gan.py).

Every export is checked before it is reported done: the exported file is loaded back (onnxruntime for
ONNX, torch.jit for TorchScript) and run on the coordinator's held-out data (the GAN: seeded noise);
the largest absolute difference from PyTorch's outputs is written into the spec and must be at most
PARITY_TOLERANCE.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .predict import spec_path
from .run import FinishedRun, RunDirError, open_run

EXPORT_FORMATS = ("onnx", "torchscript")
SUFFIX = {"onnx": ".onnx", "torchscript": ".pt"}
PARITY_TOLERANCE = 1e-5
PARITY_SAMPLES = 256  # held-out records the export is checked on
ONNX_OPSET = 17


class ExportError(RuntimeError):
    """An export that failed or whose outputs differ from PyTorch's."""


class ReconstructionWithScore(nn.Module):
    """An autoencoder's reconstruction and each record's anomaly score, in one graph."""

    def __init__(self, autoencoder: nn.Module) -> None:
        super().__init__()
        self.autoencoder = autoencoder

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        reconstruction = self.autoencoder(x)
        score = (reconstruction - x).square().flatten(1).mean(dim=1)
        return reconstruction, score


@dataclass
class InputSpec:
    """What an exported model takes and gives; written next to it as <model file>.json."""

    family: str
    task: str
    input_name: str
    input_shape: list[int]  # per record; the batch dimension comes first and is free
    output_names: list[str]
    num_classes: int
    weights: str  # "global" (checkpoint.pt) or "best" (best_model.pt)
    format: str
    run: str
    dtype: str = "float32"
    parity_max_abs_error: float | None = None
    parity_samples: int = 0
    notes: list[str] = field(default_factory=list)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1))


def serving_module(run: FinishedRun) -> tuple[nn.Module, str, list[int], list[str]]:
    """(module, input name, per-record input shape, output names) of what is exported for `run`."""
    model = run.model.eval()
    if run.spec.task == "generation":
        return model.generator.eval(), "noise", [int(model.latent_dim)], ["sample"]
    if run.spec.task == "reconstruction":
        return ReconstructionWithScore(model).eval(), "input", list(run.spec.input_shape), ["reconstruction", "anomaly_score"]
    return model, "input", list(run.spec.input_shape), ["output"]


def parity_inputs(run: FinishedRun, n: int = PARITY_SAMPLES, seed: int = 0) -> np.ndarray:
    """What exports are checked on: up to `n` held-out records (the GAN: `n` seeded noise vectors)."""
    if run.spec.task == "generation":
        return np.random.default_rng(seed).standard_normal((n, run.model.latent_dim)).astype(np.float32)
    x, _, _ = run.held_out()
    return x[:n]


def torch_outputs(module: nn.Module, x: np.ndarray) -> list[np.ndarray]:
    with torch.no_grad():
        out = module(torch.from_numpy(x))
    return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]


def onnx_outputs(path: Path, x: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})


def torchscript_outputs(path: Path, x: np.ndarray) -> list[np.ndarray]:
    return torch_outputs(torch.jit.load(str(path), map_location="cpu").eval(), x)


def max_abs_difference(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return math.inf
    return max(float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))) for x, y in zip(a, b))


def write_onnx(module: nn.Module, example: torch.Tensor, path: Path, input_name: str, output_names: list[str]) -> None:
    # The TorchScript-based exporter: the dynamo one needs onnxscript, not a dependency here.
    torch.onnx.export(
        module, (example,), str(path), dynamo=False, opset_version=ONNX_OPSET, input_names=[input_name],
        output_names=output_names, dynamic_axes={name: {0: "batch"} for name in [input_name, *output_names]},
    )


def write_torchscript(module: nn.Module, example: torch.Tensor, path: Path) -> None:
    with torch.no_grad():
        traced = torch.jit.trace(module, example, check_trace=False)
    traced.save(str(path))


def export_model(run_dir: str | Path, out_dir: str | Path | None = None, fmt: str = "onnx",
                 weights: str = "global") -> tuple[Path, InputSpec]:
    """Export `run_dir`'s global (or best) model to `out_dir` (default <run>/export) as model.onnx or
    model.pt, with model.onnx.json / model.pt.json (the input spec and the measured parity) and the run's model card.
    ExportError if the exported model's outputs differ from PyTorch's by more than PARITY_TOLERANCE."""
    from .card import card_paths, write_model_card

    if fmt not in EXPORT_FORMATS:
        raise ExportError(f"format must be one of: {', '.join(EXPORT_FORMATS)}; got {fmt!r}")
    run = open_run(run_dir, weights)
    out = Path(out_dir).expanduser() if out_dir else run.directory / "export"
    out.mkdir(parents=True, exist_ok=True)
    module, input_name, shape, output_names = serving_module(run)
    x = parity_inputs(run)
    if not len(x):
        raise RunDirError(f"run {run.directory}: no held-out records to check the export on")
    path = out / f"model{SUFFIX[fmt]}"
    example = torch.from_numpy(x[:2])
    try:
        if fmt == "onnx":
            write_onnx(module, example, path, input_name, output_names)
            exported = onnx_outputs(path, x)
        else:
            write_torchscript(module, example, path)
            exported = torchscript_outputs(path, x)
    except Exception as err:  # noqa: BLE001 - exporter and runtime errors: one line, no traceback
        raise ExportError(f"exporting {run.family} as {fmt} failed: {type(err).__name__}: {str(err).splitlines()[0]}") from None
    error = max_abs_difference(torch_outputs(module, x), exported)
    spec = InputSpec(
        family=run.family, task=run.spec.task, input_name=input_name, input_shape=shape, output_names=output_names,
        num_classes=int(run.spec.num_classes), weights=weights, format=fmt, run=str(run.directory),
        parity_max_abs_error=error, parity_samples=len(x),
        notes=(["the generator only: the discriminator saw the nodes' records and is not exported"]
               if run.spec.task == "generation" else []),
    )
    spec.save(spec_path(path))
    if not error <= PARITY_TOLERANCE:
        raise ExportError(f"the exported {fmt} model differs from PyTorch's by {error:.3g} "
                          f"(more than {PARITY_TOLERANCE:g}) on {len(x)} held-out records; not usable")
    markdown, document = card_paths(run.directory)
    if not (markdown.is_file() and document.is_file()):
        write_model_card(run.directory)
    for source in (markdown, document):
        shutil.copy2(source, out / source.name)
    return path, spec
