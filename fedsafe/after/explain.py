"""Attributions of a finished run's global model on the coordinator's held-out data (Captum).

What is explained: the predicted class's logit (classification), the prediction (regression), or the
anomaly score (autoencoder: the record's mean squared reconstruction error). Methods: Captum's
Integrated Gradients (baseline: the all-zeros record, the mean of standardised features) or
GradientSHAP (baselines: held-out records). Tabular inputs give a per-feature ranking (mean |attribution|);
image-like inputs (channels x height x width, or a sequence read as steps x features) give saliency maps.

Privacy: attributions are gradients of the model at the records they are computed on, so they reveal
those records. On the coordinator's held-out data they cost no ε (that data is the coordinator's, and the
model itself is already DP-protected as released). On a node's private data they would be a new release
about its records that no ledger has paid for, so `explain` refuses any data but the run's held-out set.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .run import FinishedRun, RunDirError, open_run

METHODS = ("ig", "gradientshap")
HELD_OUT = "held-out"
IG_STEPS = 64
SHAP_SAMPLES = 16
TOP_FEATURES = 20
PRIVACY_NOTE = ("computed on the coordinator's held-out data: no ε spent. The same on a node's private data "
                "would release information about its records beyond its DP guarantee and would have to be "
                "charged to that node's ledger; fedsafe refuses it.")


class ExplainError(ValueError):
    """A request `explain` refuses; one line naming why."""


class ExplainedOutput(nn.Module):
    """The scalar per record that is explained: the target logit, the prediction, or the anomaly score."""

    def __init__(self, model: nn.Module, task: str) -> None:
        super().__init__()
        self.model, self.task = model, task

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if self.task == "reconstruction":
            return (out - x).square().flatten(1).mean(dim=1)
        return out


@dataclass
class Explanation:
    method: str
    records: int
    input_shape: list[int]
    target: str
    completeness_max_abs_error: float | None  # IG: max over records of |sum(attr) - (f(x) - f(baseline))|
    csv: str
    png: str
    privacy: str = PRIVACY_NOTE


def refuse_private_data(run: FinishedRun, data: str | None) -> None:
    """Only the run's held-out data may be explained on (see the module docstring)."""
    if data in (None, "", HELD_OUT):
        return
    held = run.config.eval_path
    if held and Path(data).expanduser().resolve() == Path(held).expanduser().resolve():
        return
    raise ExplainError(
        f"refusing to explain on {data!r}: explanations are computed from the records they explain, so on a node's "
        "private data they would spend that node's ε, which no ledger has granted; explanations are computed on "
        "the coordinator's held-out data only (no ε)")


def attributions(run: FinishedRun, x: np.ndarray, method: str = "ig", seed: int = 0) -> tuple[np.ndarray, np.ndarray, float | None, str]:
    """(attributions shaped like x, the explained output per record, IG's completeness error or None,
    what the target is) for the records `x` of `run`."""
    from captum.attr import GradientShap, IntegratedGradients

    if run.spec.task == "generation":
        raise ExplainError("a GAN's generator maps noise to records: there is no prediction to explain")
    if method not in METHODS:
        raise ExplainError(f"method must be one of: {', '.join(METHODS)}; got {method!r}")
    forward = ExplainedOutput(run.model.eval(), run.spec.task)
    inputs = torch.from_numpy(x).requires_grad_(True)
    with torch.no_grad():
        outputs = forward(inputs)
    if run.spec.task == "classification":
        target, what = outputs.argmax(dim=1), "the predicted class's logit"
        explained = outputs.gather(1, target[:, None]).squeeze(1)
    elif run.spec.task == "regression" and outputs.dim() > 1:
        target, what, explained = 0, "the prediction", outputs.reshape(len(x), -1)[:, 0]
    else:
        target, what, explained = None, ("the anomaly score" if run.spec.task == "reconstruction" else "the prediction"), outputs
    torch.manual_seed(seed)
    if method == "ig":
        attr, delta = IntegratedGradients(forward).attribute(
            inputs, baselines=torch.zeros_like(inputs), target=target, n_steps=IG_STEPS,
            internal_batch_size=max(len(x), 1) * 8, return_convergence_delta=True)
        completeness = float(delta.abs().max())
    else:
        rng = np.random.default_rng(seed)
        baselines = torch.from_numpy(x[rng.choice(len(x), size=min(len(x), 32), replace=False)])
        attr = GradientShap(forward).attribute(inputs, baselines=baselines, target=target, n_samples=SHAP_SAMPLES,
                                               stdevs=0.0)
        completeness = None
    return attr.detach().numpy(), explained.numpy(), completeness, what


def _is_map(shape: tuple[int, ...]) -> bool:
    return len(shape) >= 2


def write_feature_ranking(attr: np.ndarray, path_csv: Path, path_png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    flat = attr.reshape(len(attr), -1)
    mean_abs, mean = np.abs(flat).mean(axis=0), flat.mean(axis=0)
    order = np.argsort(-mean_abs)
    with open(path_csv, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["rank", "feature", "mean_abs_attribution", "mean_attribution"])
        for rank, i in enumerate(order, start=1):
            writer.writerow([rank, f"feature_{i}", f"{mean_abs[i]:.6g}", f"{mean[i]:.6g}"])
    top = order[:TOP_FEATURES][::-1]
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(top) + 1.2))
    ax.barh([f"feature_{i}" for i in top], mean_abs[top], color="tab:blue")
    ax.set_xlabel("mean |attribution|")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path_png, dpi=110)
    plt.close(fig)


def write_saliency(x: np.ndarray, attr: np.ndarray, path_csv: Path, path_png: Path, title: str, examples: int = 4) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def as_image(a: np.ndarray) -> np.ndarray:  # (C, H, W) -> (H, W) summed over channels; (T, F) as it is
        return np.abs(a).sum(axis=0) if a.ndim == 3 else np.abs(a).reshape(a.shape[0], -1)

    mean_map = as_image(np.abs(attr).mean(axis=0))
    with open(path_csv, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["row", "column", "mean_abs_attribution"])
        for (r, c), value in np.ndenumerate(mean_map):
            writer.writerow([r, c, f"{value:.6g}"])
    shown = min(examples, len(x))
    fig, axes = plt.subplots(2, shown + 1, figsize=(2.2 * (shown + 1), 4.6), squeeze=False)
    for i in range(shown):
        image = x[i].sum(axis=0) if x[i].ndim == 3 else x[i].reshape(x[i].shape[0], -1)
        axes[0][i].imshow(image, cmap="gray")
        axes[0][i].set_title(f"record {i}")
        axes[1][i].imshow(as_image(attr[i]), cmap="hot")
        axes[1][i].set_title("|attribution|")
    axes[0][shown].axis("off")
    axes[1][shown].imshow(mean_map, cmap="hot")
    axes[1][shown].set_title("mean over records")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path_png, dpi=110)
    plt.close(fig)


def explain_run(run_dir: str | Path, out_dir: str | Path | None = None, method: str = "ig", records: int = 200,
                data: str | None = None, weights: str = "global") -> Explanation:
    """Attributions of `run_dir`'s model on up to `records` held-out records; writes attributions.csv,
    attributions.png and explanation.json to `out_dir` (default <run>/explain)."""
    run = open_run(run_dir, weights)
    refuse_private_data(run, data)
    if records < 1:
        raise ExplainError(f"records must be at least 1; got {records}")
    x, _, _ = run.held_out()
    x = x[:records]
    attr, _, completeness, what = attributions(run, x, method)
    out = Path(out_dir).expanduser() if out_dir else run.directory / "explain"
    out.mkdir(parents=True, exist_ok=True)
    path_csv, path_png = out / "attributions.csv", out / "attributions.png"
    title = f"{run.family}: {method} attributions of {what}, {len(x)} held-out records"
    if _is_map(tuple(run.spec.input_shape)):
        write_saliency(x, attr, path_csv, path_png, title)
    else:
        write_feature_ranking(attr, path_csv, path_png, title)
    result = Explanation(method, len(x), list(run.spec.input_shape), what, completeness, str(path_csv), str(path_png))
    (out / "explanation.json").write_text(json.dumps(asdict(result), indent=1))
    return result


__all__ = ["explain_run", "attributions", "ExplainError", "RunDirError", "PRIVACY_NOTE"]
