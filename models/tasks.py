"""What a model is trained for: its loss, and the metrics that judge it.

Tasks by name (``task_for``): classification, regression, reconstruction, generation.
Every task has ``loss(outputs, targets)`` (a mean over the batch), ``per_sample_loss`` (the (B,)
losses it averages), ``metrics(outputs, targets)`` and ``targets(x, y)`` (what
the loss compares the model's outputs with: the labels, or the inputs themselves for
reconstruction). ``evaluate`` judges a model on a whole dataset with any of them.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch import nn


class ClassificationTask:
    name = "classification"

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self._loss = nn.CrossEntropyLoss()

    def targets(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self._loss(outputs, targets)

    def per_sample_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(B,) losses whose mean is `loss` (what ghost clipping needs)."""
        return nn.functional.cross_entropy(outputs, targets, reduction="none")

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        """Loss, accuracy, macro precision/recall/F1 and AUROC (one-vs-rest when multi-class)."""
        from sklearn.metrics import precision_recall_fscore_support, roc_auc_score

        probs = torch.softmax(outputs.float(), dim=1).cpu().numpy()
        y_true = targets.cpu().numpy()
        y_pred = probs.argmax(axis=1)
        precision, recall, f1, _ = precision_recall_fscore_support(
            y_true, y_pred, average="macro", zero_division=0
        )
        result = {
            "loss": float(self._loss(outputs.float(), targets)),
            "accuracy": float((y_pred == y_true).mean()),
            "precision": float(precision),
            "recall": float(recall),
            "f1": float(f1),
        }
        present = np.unique(y_true)
        if len(present) == self.num_classes and self.num_classes >= 2:
            if self.num_classes == 2:
                result["auroc"] = float(roc_auc_score(y_true, probs[:, 1]))
            else:
                result["auroc"] = float(roc_auc_score(y_true, probs, multi_class="ovr"))
        return result


def _match(outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 1) outputs against (B,) targets: compare (B,) with (B,); float targets."""
    targets = targets.to(outputs.dtype)
    if outputs.dim() == targets.dim() + 1 and outputs.shape[-1] == 1:
        outputs = outputs.squeeze(-1)
    if outputs.shape != targets.shape:
        raise ValueError(f"outputs shaped {tuple(outputs.shape)} do not match targets shaped {tuple(targets.shape)}")
    return outputs, targets


class RegressionTask:
    """Real-valued targets: (B,) for one target, (B, k) for k (the model's num_classes = k)."""

    name = "regression"

    def __init__(self, num_outputs: int = 1) -> None:
        self.num_outputs = num_outputs

    def targets(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        outputs, targets = _match(outputs, targets)
        return nn.functional.mse_loss(outputs, targets)

    def per_sample_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        outputs, targets = _match(outputs, targets)
        return (outputs - targets).square().reshape(len(outputs), -1).mean(dim=1)

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        """mse, mae and r2 (1 - SSE/SST, averaged over targets; 1 is perfect, 0 is "predict the
        mean", negative is worse than that)."""
        outputs, targets = _match(outputs.float(), targets)
        error = outputs - targets
        mse = float(error.square().mean())
        sse = error.square().reshape(len(error), -1).sum(dim=0)
        sst = (targets - targets.mean(dim=0)).square().reshape(len(targets), -1).sum(dim=0)
        r2 = float((1 - sse / sst.clamp(min=1e-12)).mean())
        return {"loss": mse, "mse": mse, "mae": float(error.abs().mean()), "r2": r2}


class ReconstructionTask:
    """The model reproduces its input (autoencoders); the targets are the inputs."""

    name = "reconstruction"

    def targets(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.mse_loss(outputs, targets)

    def per_sample_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return (outputs - targets).square().reshape(len(outputs), -1).mean(dim=1)

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        error = outputs.float() - targets.float()
        mse = float(error.square().mean())
        return {"loss": mse, "mse": mse, "mae": float(error.abs().mean())}


@torch.no_grad()
def anomaly_scores(model: nn.Module, x: np.ndarray | torch.Tensor, batch_size: int = 512) -> np.ndarray:
    """Per-sample anomaly score: the mean squared reconstruction error of each record (higher =
    more anomalous)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    x = torch.as_tensor(x)
    scores = []
    for start in range(0, len(x), batch_size):
        batch = x[start : start + batch_size].to(device)
        scores.append((model(batch) - batch).square().reshape(len(batch), -1).mean(dim=1).cpu())
    model.train(was_training)
    return torch.cat(scores).numpy() if scores else np.zeros(0, dtype=np.float32)


def anomaly_auroc(model: nn.Module, x_normal: np.ndarray | torch.Tensor, x_outlier: np.ndarray | torch.Tensor) -> float:
    """AUROC of the reconstruction-error score at telling outliers (positive) from normal records:
    0.5 is chance, 1.0 ranks every outlier above every normal record."""
    from sklearn.metrics import roc_auc_score

    normal, outlier = anomaly_scores(model, x_normal), anomaly_scores(model, x_outlier)
    labels = np.r_[np.zeros(len(normal)), np.ones(len(outlier))]
    return float(roc_auc_score(labels, np.r_[normal, outlier]))


# ---- generation (GANs) ------------------------------------------------------------------------


def frechet_distance(generated: np.ndarray | torch.Tensor, real: np.ndarray | torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two sets of records (flattened), in the data's
    own units: |mu_g - mu_r|^2 + tr(S_g + S_r - 2 (S_g S_r)^1/2). 0 when means and covariances
    match; LOWER IS BETTER. Compares first and second moments only (the FID formula, computed on
    raw features instead of Inception features)."""
    g = np.asarray(torch.as_tensor(generated).detach().cpu(), dtype=np.float64).reshape(len(generated), -1)
    r = np.asarray(torch.as_tensor(real).detach().cpu(), dtype=np.float64).reshape(len(real), -1)
    if g.shape[1] != r.shape[1]:
        raise ValueError(f"generated records have {g.shape[1]} features, real ones {r.shape[1]}")
    if len(g) < 2 or len(r) < 2:
        raise ValueError("the Fréchet distance needs at least 2 generated and 2 real records")
    cov_g, cov_r = np.atleast_2d(np.cov(g, rowvar=False)), np.atleast_2d(np.cov(r, rowvar=False))
    # tr((S_g S_r)^1/2) = sum of sqrt(eigenvalues of S_g^1/2 S_r S_g^1/2), a symmetric PSD matrix
    values, vectors = np.linalg.eigh(cov_g)
    root_g = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_g @ cov_r @ root_g), 0, None)).sum()
    mean_term = np.square(g.mean(axis=0) - r.mean(axis=0)).sum()
    return float(max(mean_term + np.trace(cov_g) + np.trace(cov_r) - 2 * cross, 0.0))


DIGITS_SHAPES = ((1, 8, 8), (8, 8), (64,))


@functools.cache
def digits_reference_classifier():
    """A fixed reference classifier for 8x8 digit images scaled to [0, 1] (pixel / 16): scikit-learn
    multinomial logistic regression fit, deterministically, on the training split of the digits set
    bundled with scikit-learn (nothing downloaded; the same split as fedsafe.client.data: 25 % held out,
    stratified, seed 0). 96.9 % accurate on the held-out split. Trained once per process (~2 s)."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    raw = load_digits()
    x = (raw.images / 16.0).reshape(len(raw.images), -1)
    x_train, _, y_train, _ = train_test_split(x, raw.target, test_size=0.25, random_state=0, stratify=raw.target)
    return LogisticRegression(max_iter=2000, C=1.0).fit(x_train, y_train)


def digits_score(samples: np.ndarray | torch.Tensor) -> dict[str, float]:
    """How digit-like and how varied generated 8x8 digits are, judged by the reference classifier.

    * ``digits_is``: the Inception Score formula, exp(E_x KL(p(y|x) || p(y))), with the reference
      classifier as judge. From 1 (every sample equally unsure, or all the same digit) to 10
      (every sample confidently one digit, all ten digits equally often). HIGHER IS BETTER.
      Held-out real digits score about 7.0, uniform noise about 2.
    * ``digits_confidence``: mean top-class probability (higher = more recognisable digits).
    * ``digits_coverage``: fraction of the 10 digits that are the top class of at least 1 % of
      the samples (1.0 = no digit missing: no mode collapse).
    """
    x = np.asarray(torch.as_tensor(samples).detach().cpu(), dtype=np.float64).reshape(len(samples), -1)
    if x.shape[1] != 64:
        raise ValueError(f"digits_score needs 8x8 images (64 values per sample); got {x.shape[1]}")
    probs = np.clip(digits_reference_classifier().predict_proba(x), 1e-12, 1.0)
    marginal = probs.mean(axis=0)
    kl = (probs * (np.log(probs) - np.log(marginal))).sum(axis=1).mean()
    counts = np.bincount(probs.argmax(axis=1), minlength=10)
    return {
        "digits_is": float(math.exp(kl)),
        "digits_confidence": float(probs.max(axis=1).mean()),
        "digits_coverage": float((counts >= 0.01 * len(x)).mean()),
    }


class GenerationTask:
    """GANs (models.gan.GAN): the loss is the discriminator's (binary cross-entropy on logits,
    target 1 for real, 0 for generated); quality is judged on generated samples (`quality`)."""

    name = "generation"

    def __init__(self) -> None:
        self._loss = nn.BCEWithLogitsLoss()

    def targets(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.ones(len(x), dtype=x.dtype, device=x.device)  # real records

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self._loss(outputs.reshape(-1), targets.to(outputs.dtype).reshape(-1))

    def per_sample_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.binary_cross_entropy_with_logits(
            outputs.reshape(-1), targets.to(outputs.dtype).reshape(-1), reduction="none"
        )

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        """Discriminator loss and accuracy on the given logits/targets."""
        logits, targets = outputs.float().reshape(-1), targets.float().reshape(-1)
        return {
            "loss": float(self._loss(logits, targets)),
            "discriminator_accuracy": float(((logits > 0).float() == targets).float().mean()),
        }

    @torch.no_grad()
    def quality(self, gan: nn.Module, real: np.ndarray | torch.Tensor, n: int = 1000, seed: int = 0) -> dict[str, float]:
        """Scores of `n` samples drawn with a fixed seed: ``frechet_distance`` to `real` (lower is
        better), and for 8x8 digit-shaped data the ``digits_score`` numbers (higher is better)."""
        generator = torch.Generator(device=next(gan.parameters()).device).manual_seed(seed)
        samples = gan.sample(n, generator).cpu()
        result = {"frechet_distance": frechet_distance(samples, real)}
        if tuple(samples.shape[1:]) in DIGITS_SHAPES:
            result.update(digits_score(samples))
        return result

    def evaluate_model(self, model: nn.Module, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
        return self.quality(model, x)


# ---- which metric matters, and which way is better -------------------------------------------

# Metrics the tasks (and the server's evaluation) report, by whether higher or lower is better.
HIGHER_IS_BETTER = frozenset({
    "accuracy", "precision", "recall", "f1", "auroc", "r2", "anomaly_auroc", "digits_is",
    "digits_confidence", "digits_coverage",
})
LOWER_IS_BETTER = frozenset({"loss", "mse", "mae", "outlier_mse", "frechet_distance"})
# A task's headline metric: the first of these its metrics hold (classification: accuracy;
# regression: r2, where 0 is the mean predictor; anomaly detection: AUROC; reconstruction: mse;
# generation: the Fréchet distance, defined for any data and the first to move while a GAN is
# still poor; digits_is only rises once samples are recognisable digits).
HEADLINE_ORDER = ("accuracy", "r2", "anomaly_auroc", "mse", "frechet_distance", "digits_is", "loss")


def headline_metric(metrics) -> str | None:
    """The name of the headline metric among `metrics` (a mapping or an iterable of names)."""
    return next((name for name in HEADLINE_ORDER if name in metrics), None)


def higher_is_better(metric: str) -> bool:
    """Whether larger values of `metric` are better; ValueError for a metric not known here."""
    if metric in HIGHER_IS_BETTER:
        return True
    if metric in LOWER_IS_BETTER:
        return False
    known = ", ".join(sorted(HIGHER_IS_BETTER | LOWER_IS_BETTER))
    raise ValueError(f"unknown metric {metric!r}; choose one of: {known}")


Task = ClassificationTask | RegressionTask | ReconstructionTask | GenerationTask
TASK_NAMES = ("classification", "regression", "reconstruction", "generation")


# What a user's task object must offer (what training, DP-SGD and evaluation call).
USER_TASK_METHODS = ("targets", "loss", "per_sample_loss", "metrics")


def task_for(task_name: str, num_classes: int) -> Task:
    """The task named `task_name`; `num_classes` is the class count (classification) or the
    number of regression targets (regression), unused otherwise. A name ``package.module:factory`` is a
    user's task: ``factory(num_classes)`` returns an object with the methods of USER_TASK_METHODS (see
    ClassificationTask: ``per_sample_loss`` gives the (B,) losses whose mean is ``loss``)."""
    from .registry import ModelConfigError, import_reference, is_user_model_ref

    if is_user_model_ref(task_name):
        task = import_reference(task_name, "task")(num_classes)
        lacking = [m for m in USER_TASK_METHODS if not callable(getattr(task, m, None))]
        if lacking:
            raise ModelConfigError(f"task {task_name!r}: its object lacks {', '.join(lacking)} "
                                   f"(a task offers {', '.join(USER_TASK_METHODS)})")
        if not isinstance(getattr(task, "name", None), str):
            task.name = task_name  # what training and evaluation read to tell tasks apart
        return task
    if task_name == "classification":
        return ClassificationTask(num_classes)
    if task_name == "regression":
        return RegressionTask(max(num_classes, 1))
    if task_name == "reconstruction":
        return ReconstructionTask()
    if task_name == "generation":
        return GenerationTask()
    raise ValueError(f"unknown task {task_name!r}; choose one of: {', '.join(TASK_NAMES)}, or a factory as "
                     f"package.module:function")


@torch.no_grad()
def evaluate(
    model: nn.Module,
    task: Task,
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int = 512,
) -> dict[str, float]:
    """Metrics of `model` on the whole of (x, y), computed in batches on the model's device."""
    if hasattr(task, "evaluate_model"):
        return task.evaluate_model(model, x, y)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    outputs, targets = [], []
    # Targets batch by batch too: `x` may be an image folder read lazily (fedsafe.client.image_folder).
    for start in range(0, len(x), batch_size):
        batch = torch.as_tensor(x[start : start + batch_size])
        outputs.append(model(batch.to(device)).cpu())
        targets.append(task.targets(batch, torch.as_tensor(y[start : start + batch_size])))
    model.train(was_training)
    return task.metrics(torch.cat(outputs), torch.cat(targets))
