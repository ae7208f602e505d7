"""Classification metrics: accuracy, macro F1, per-class scores and the confusion matrix, and the
evaluation pass that computes them over a loader (every example once, across processes).

`evaluate.load("accuracy")` fetches its metric script from the Hub, which fails on machines
without network; it computes these with scikit-learn, so we call scikit-learn directly.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)
from torch.utils.data import DataLoader

from hf_transfer.console import bar
from hf_transfer.errors import HfTransferError


def classification_metrics(predictions: np.ndarray, labels: np.ndarray, label_names: list[str]) -> dict[str, Any]:
    """Scores of predicted class ids against true class ids; JSON-serialisable.

    `precision_recall_fscore_support` gives what `classification_report(output_dict=True)` does, per
    class and by id (a class absent from these labels still gets its row), without the report's
    string-keyed averages to strip off again.
    """
    ids = list(range(len(label_names)))
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predictions, labels=ids, average=None, zero_division=0
    )
    return {
        "accuracy": float(accuracy_score(labels, predictions)),
        "f1_macro": float(f1_score(labels, predictions, labels=ids, average="macro", zero_division=0)),
        "num_samples": int(len(labels)),
        "per_class": {
            name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(label_names, precision, recall, f1, support)
        },
        "confusion_matrix": {
            "labels": list(label_names),
            "matrix": confusion_matrix(labels, predictions, labels=ids).tolist(),
        },
    }


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The single-number entries (for logs and progress bars)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


@functools.cache
def extra_metric_modules(names: tuple[str, ...]) -> tuple[Any, ...]:
    """training.extra_metrics loaded once per process through `evaluate` (a run checks them before it writes).

    accuracy and macro F1 stay scikit-learn's: `evaluate.load` fetches even those from the Hub.
    """
    if not names:
        return ()
    import evaluate

    from hf_transfer.sources.offline import hub_is_offline

    modules = []
    for name in names:
        if not Path(name).exists() and hub_is_offline():
            raise HfTransferError(
                f"training.extra_metrics names '{name}', which `evaluate` loads from the Hub, out of reach here; "
                "give the path of a local metric folder, or remove it."
            )
        try:
            modules.append(evaluate.load(name))
        except Exception as error:  # evaluate raises FileNotFoundError, ConnectionError, ImportError, ...
            raise HfTransferError(
                f"training.extra_metrics: `evaluate` cannot load '{name}' ({type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else ''})."
            ) from None
    return tuple(modules)


def with_extra_metrics(metrics: dict[str, Any], predictions: np.ndarray, labels: np.ndarray,
                       names: list[str]) -> dict[str, Any]:
    """`metrics` plus the numbers each extra metric returns (e.g. matthews_correlation)."""
    for module in extra_metric_modules(tuple(names)):
        result = module.compute(predictions=predictions.tolist(), references=labels.tolist())
        metrics.update({k: float(v) for k, v in result.items() if isinstance(v, (int, float))})
    return metrics


def split_batch(batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return inputs, batch["labels"]


@torch.no_grad()
def predict_logits(
    model: torch.nn.Module, loader: DataLoader, accelerator: Accelerator, desc: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels of the whole loader, gathered from every process exactly once; with `desc`, a progress bar."""
    model.eval()
    all_logits, all_labels = [], []
    for batch in (bar(loader, desc=desc, total=len(loader), unit="batch") if desc else loader):
        inputs, labels = split_batch(batch)
        logits = model(**inputs)
        logits, labels = accelerator.gather_for_metrics((logits.float(), labels))
        all_logits.append(logits.cpu())
        all_labels.append(labels.cpu())
    return torch.cat(all_logits).numpy(), torch.cat(all_labels).numpy()


def evaluate(model: torch.nn.Module, loader: DataLoader, accelerator: Accelerator, label_names: list[str],
             extra_metrics: list[str] | None = None, desc: str | None = None) -> dict:
    """Every metric of the loader's predictions: accuracy, macro F1, per class, and any extra metric."""
    logits, labels = predict_logits(model, loader, accelerator, desc)
    predictions = logits.argmax(-1)
    return with_extra_metrics(classification_metrics(predictions, labels, label_names), predictions, labels,
                              extra_metrics or [])
