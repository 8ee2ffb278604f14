"""Score data with an exported ONNX model: `fedsafe predict MODEL DATA`.

Needs only onnxruntime and numpy (and the standard library): an application team can run an exported
model without PyTorch, Opacus or Flower. This module must not import anything else.

DATA is a .csv (a header row; one record per row, its values flattened in C order; a `label` column, if
present, is ignored) or a .npz (array `x`, or its only array), shaped to the model's input spec
(<model file>.json, written by `fedsafe export`). For a GAN's generator, DATA holds the noise vectors
(latent_dim values per row). The predictions go to a CSV, one row per record:

* classification: `prediction` (the class) and `p_<class>` (softmax probabilities);
* regression: `prediction` (or `prediction_<k>` for k targets);
* reconstruction: `anomaly_score` (mean squared reconstruction error; higher is more unusual);
* generation: the generated record, flattened, as `x_<i>`.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

LABEL_COLUMN = "label"


class PredictError(ValueError):
    """Input a prediction cannot use; the message is one line naming the problem."""


def spec_path(model_path: str | Path) -> Path:
    """Where the input spec of the model at `model_path` is: model.onnx -> model.onnx.json."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.name + ".json")


def read_spec(model_path: Path) -> dict[str, Any]:
    path = spec_path(model_path)
    if not path.is_file():
        raise PredictError(f"{path} is missing: export the model with `fedsafe export`, which writes it")
    try:
        spec = json.loads(path.read_text())
        spec["input_shape"] = [int(d) for d in spec["input_shape"]]
        spec["task"], spec["output_names"] = str(spec["task"]), list(spec["output_names"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise PredictError(f"{path} is not a fedsafe input spec ({err})") from None
    return spec


def _read_csv(path: Path) -> np.ndarray:
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    if len(rows) < 2:
        raise PredictError(f"{path}: expected a header row and at least one record")
    header = [name.strip() for name in rows[0]]
    keep = [i for i, name in enumerate(header) if name != LABEL_COLUMN]
    values = np.empty((len(rows) - 1, len(keep)), dtype=np.float32)
    for r, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise PredictError(f"{path} line {r}: {len(row)} values, the header has {len(header)}")
        try:
            values[r - 2] = [float(row[i]) for i in keep]
        except ValueError:
            raise PredictError(f"{path} line {r}: a value is not a number") from None
    return values


def _read_npz(path: Path) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as archive:
            names = list(archive.files)
            name = "x" if "x" in names else (names[0] if len(names) == 1 else None)
            if name is None:
                raise PredictError(f"{path}: holds {names}; name the records' array 'x'")
            return np.asarray(archive[name], dtype=np.float32)
    except (OSError, ValueError) as err:
        raise PredictError(f"{path} is not a readable .npz ({err})") from None


def read_records(path: str | Path, input_shape: list[int]) -> np.ndarray:
    """The records of `path` shaped (n, *input_shape), float32; PredictError naming what does not fit."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise PredictError(f"data file not found: {path}")
    readers = {".csv": _read_csv, ".npz": _read_npz}
    if path.suffix.lower() not in readers:
        raise PredictError(f"{path}: expected a .csv or .npz file")
    x = readers[path.suffix.lower()](path)
    width = int(np.prod(input_shape))
    if x.ndim == 0 or len(x) == 0:
        raise PredictError(f"{path}: no records")
    if int(np.prod(x.shape[1:])) != width:
        raise PredictError(f"{path}: records have {int(np.prod(x.shape[1:]))} values each; the model takes "
                           f"{width} (shape {'x'.join(map(str, input_shape))})")
    if not np.isfinite(x).all():
        bad = int(np.argwhere(~np.isfinite(x.reshape(len(x), -1)))[0][0])
        raise PredictError(f"{path}: record {bad} has a missing, infinite or NaN value")
    return np.ascontiguousarray(x.reshape(len(x), *input_shape))


def run_model(model_path: str | Path, x: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001 - onnxruntime's own error types: one line
        raise PredictError(f"{model_path} is not a usable ONNX model ({str(err).splitlines()[0]})") from None
    return session.run(None, {session.get_inputs()[0].name: x})


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def prediction_table(spec: dict[str, Any], outputs: list[np.ndarray]) -> tuple[list[str], np.ndarray]:
    """(column names, rows) of the predictions of a model of `spec`'s task."""
    task, first = spec["task"], outputs[0]
    if task == "classification":
        probs = _softmax(first.astype(np.float64))
        return ["prediction", *[f"p_{k}" for k in range(probs.shape[1])]], np.column_stack([probs.argmax(axis=1), probs])
    if task == "regression":
        first = first.reshape(len(first), -1)
        names = ["prediction"] if first.shape[1] == 1 else [f"prediction_{k}" for k in range(first.shape[1])]
        return names, first
    if task == "reconstruction":
        return ["anomaly_score"], outputs[spec["output_names"].index("anomaly_score")].reshape(-1, 1)
    flat = first.reshape(len(first), -1)
    return [f"x_{i}" for i in range(flat.shape[1])], flat


def predict(model_path: str | Path, data_path: str | Path, out_path: str | Path | None = None) -> Path:
    """Score `data_path` with the exported ONNX model at `model_path`; write the predictions CSV."""
    model_path = Path(model_path).expanduser()
    if not model_path.is_file():
        raise PredictError(f"model not found: {model_path}")
    if model_path.suffix != ".onnx":
        raise PredictError(f"{model_path}: predict runs ONNX models (export with --format onnx)")
    spec = read_spec(model_path)
    x = read_records(data_path, spec["input_shape"])
    names, rows = prediction_table(spec, run_model(model_path, x))
    out = Path(out_path).expanduser() if out_path else Path(data_path).expanduser().with_suffix(".predictions.csv")
    with open(out, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(names)
        integer = spec["task"] == "classification"
        for row in rows:
            writer.writerow([int(row[0]) if integer else repr(float(row[0])), *(repr(float(v)) for v in row[1:])])
    return out


def main(argv: list[str] | None = None, prog: str = "fedsafe predict") -> int:
    parser = argparse.ArgumentParser(prog=prog, description="Score a CSV/NPZ with a model from `fedsafe export` "
                                     "(needs only onnxruntime and numpy).")
    parser.add_argument("model", help="the exported model.onnx (its model.onnx.json beside it)")
    parser.add_argument("data", help="records to score: .csv (header row; a 'label' column is ignored) or .npz")
    parser.add_argument("--out", default=None, help="predictions CSV (default: DATA with .predictions.csv)")
    args = parser.parse_args(argv)
    try:
        out = predict(args.model, args.data, args.out)
    except PredictError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except ImportError:
        print(f"{prog}: error: needs onnxruntime: pip install onnxruntime", file=sys.stderr)
        return 2
    print(f"predictions: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
