"""What a model is trained for: its loss, and the metrics that judge it."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class ClassificationTask:
    name = "classification"

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self._loss = nn.CrossEntropyLoss()

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self._loss(outputs, targets)

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


def task_for(task_name: str, num_classes: int) -> ClassificationTask:
    if task_name == "classification":
        return ClassificationTask(num_classes)
    raise ValueError(f"unknown task {task_name!r}; choose one of: classification")


@torch.no_grad()
def evaluate(
    model: nn.Module,
    task: ClassificationTask,
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int = 512,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Metrics of `model` on the whole of (x, y), computed in batches."""
    was_training = model.training
    model.eval()
    outputs = []
    for start in range(0, len(x), batch_size):
        batch = torch.as_tensor(x[start : start + batch_size], device=device)
        outputs.append(model(batch).cpu())
    model.train(was_training)
    return task.metrics(torch.cat(outputs), torch.as_tensor(y))
