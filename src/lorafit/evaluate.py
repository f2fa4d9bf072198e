"""Predictions -> metrics. Pure functions on arrays: no model, no files."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

__all__ = ["classification_metrics", "cross_entropy", "softmax", "top_confusions"]


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def cross_entropy(logits: np.ndarray, targets: np.ndarray) -> float:
    """Mean negative log-likelihood, computed stably in float64."""
    z = logits.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=-1))
    return float(np.mean(log_norm - z[np.arange(len(targets)), targets]))


def top_confusions(confusion: np.ndarray, label_names: list[str], k: int = 20) -> list[dict]:
    """The k most frequent (true, predicted) mistakes, most frequent first."""
    off = confusion.copy()
    np.fill_diagonal(off, 0)
    pairs = np.argwhere(off > 0)
    ranked = sorted(pairs.tolist(), key=lambda p: (-off[p[0], p[1]], p[0], p[1]))[:k]
    return [{"true": label_names[t], "predicted": label_names[p], "count": int(off[t, p])} for t, p in ranked]


def classification_metrics(logits: np.ndarray, targets: np.ndarray, label_names: list[str]) -> dict:
    """accuracy, macro/weighted F1, loss, per-class scores, confusion matrix and top confusions."""
    predictions = logits.argmax(axis=-1)
    classes = np.arange(len(label_names))
    precision, recall, f1, support = precision_recall_fscore_support(
        targets, predictions, labels=classes, zero_division=0
    )
    confusion = confusion_matrix(targets, predictions, labels=classes)
    return {
        "accuracy": float(np.mean(predictions == targets)),
        "macro_f1": float(f1_score(targets, predictions, labels=classes, average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(targets, predictions, labels=classes, average="weighted", zero_division=0)),
        "loss": cross_entropy(logits, targets),
        "examples": int(len(targets)),
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]), "support": int(support[i])}
            for i, name in enumerate(label_names)
        },
        "labels": list(label_names),
        "confusion": confusion.tolist(),
        "top_confusions": top_confusions(confusion, label_names),
    }
