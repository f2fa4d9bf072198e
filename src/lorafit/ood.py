"""Out-of-scope (OOS) detection: scores, the threshold chosen on validation, and OOS metrics.

Pure functions on arrays; no model, no files. Every score is an *in-scope* score: higher means
"more like the training intents"; a query is out of scope when its score is below the threshold.

- ``msp``: maximum softmax probability (Hendrycks & Gimpel 2017), of the temperature-scaled logits.
- ``energy``: T * logsumexp(logits / T), the negative free energy (Liu et al. 2020, eq. 5).
- ``mahalanobis``: minus the smallest Mahalanobis distance of the pooled sentence vector to the class
  means, with one covariance shared by all classes, fitted on the training set after training
  (Lee et al. 2018; Podolskiy et al. 2021 showed it is strong for intent OOS detection).
- ``knn``: cosine similarity of the L2-normalised sentence vector to its k-th nearest training vector
  (Sun et al. 2022, "Out-of-Distribution Detection with Deep Nearest Neighbors").
- ``base_knn``: the same on the *pre-trained* encoder's sentence vectors (the base model before
  fine-tuning). A sentence encoder such as all-MiniLM-L6-v2 was trained to place paraphrases together,
  and fine-tuning for the known intents does not shape that space around them.
- ``hybrid``: energy + base_knn, each standardised by the mean and standard deviation of its scores on
  the in-scope validation examples (no OOS example needed): the classifier's confidence and the
  distance to the nearest training query in the pre-trained space disagree on different queries.

The threshold is chosen on validation, never on test (`choose_threshold`): with OOS examples in
validation, the one that maximises accuracy over in-scope + OOS validation examples; without them,
the one that keeps `target_recall` of in-scope validation examples in scope.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from .evaluate import softmax

__all__ = ["SCORES", "FEATURE_SCORES", "BASE_SCORES", "HYBRID_PARTS", "FeatureScorer", "fit_feature_scorer", "logit_score", "choose_threshold",
           "oos_metrics", "fpr_at_recall"]

SCORES = ("msp", "energy", "mahalanobis", "knn", "base_knn", "hybrid")
FEATURE_SCORES = ("mahalanobis", "knn")
#: Scores that read the pre-trained encoder's sentence vectors (a second forward pass, through the base model).
BASE_SCORES = ("base_knn", "hybrid")
#: The scores `hybrid` adds up, each standardised on in-scope validation.
HYBRID_PARTS = ("energy", "base_knn")


def logit_score(kind: str, logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """In-scope score (N,) from logits (N, C): msp or energy."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    if kind == "msp":
        return softmax(z).max(-1)
    if kind == "energy":
        m = z.max(-1, keepdims=True)
        return temperature * (m[:, 0] + np.log(np.exp(z - m).sum(-1)))
    raise ValueError(f"{kind!r} is not a logit score; choose msp or energy")


@dataclass
class FeatureScorer:
    """A feature-space score fitted on the training set's sentence vectors; `arrays` are saved with the run."""

    kind: str
    arrays: dict[str, np.ndarray]
    """mahalanobis: means (C, D), precision (D, D), float64; knn: bank (M, D), L2-normalised rows, float32."""
    k: int = 1

    def score(self, features: np.ndarray) -> np.ndarray:
        x = np.asarray(features, dtype=np.float64)
        if self.kind == "mahalanobis":
            means, precision = self.arrays["means"], self.arrays["precision"]  # (C, D), (D, D)
            # (x - mu)^T P (x - mu) for every class at once: x P x - 2 x P mu + mu P mu
            xp = x @ precision  # (N, D)
            d = (xp * x).sum(-1)[:, None] - 2 * xp @ means.T + ((means @ precision) * means).sum(-1)[None, :]  # (N, C)
            return -d.min(-1)
        if self.kind == "knn":
            bank = self.arrays["bank"]  # (M, D), rows L2-normalised
            q = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
            sims = []
            rows = max(1, (1 << 22) // max(len(bank), 1))  # (rows, M) float64 similarities at a time: at most 32 MB
            for start in range(0, len(q), rows):
                s = q[start:start + rows] @ bank.T
                sims.append(-np.partition(-s, self.k - 1, axis=-1)[:, self.k - 1])
            return np.concatenate(sims) if sims else np.zeros(0)
        raise ValueError(f"{self.kind!r} is not a feature score; choose mahalanobis or knn")


def fit_feature_scorer(kind: str, features: np.ndarray, labels: np.ndarray, k: int = 1) -> FeatureScorer:
    """Fit `kind` (mahalanobis|knn) on training sentence vectors (N, D) and their class indices (N,)."""
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    if kind == "mahalanobis":
        counts = np.bincount(y)
        if (counts == 0).any():
            raise ValueError(f"mahalanobis needs training examples of every class; none of {np.flatnonzero(counts == 0).tolist()}")
        means = np.stack([x[y == c].mean(0) for c in range(len(counts))])  # (C, D)
        centred = x - means[y]
        covariance = centred.T @ centred / len(x)
        # A small ridge keeps the inverse finite when the vectors span fewer than D dimensions.
        ridge = 1e-6 * np.trace(covariance) / len(covariance)
        precision = np.linalg.pinv(covariance + ridge * np.eye(len(covariance)), hermitian=True)
        return FeatureScorer(kind, {"means": means, "precision": precision})
    if kind == "knn":
        if not 1 <= k <= len(x):
            raise ValueError(f"knn needs 1 <= k <= {len(x)} training examples, got k={k}")
        # float32, as saved with the run (ood.safetensors): thresholds are chosen on the scores served
        bank = (x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)).astype(np.float32)
        return FeatureScorer(kind, {"bank": bank}, k=k)
    raise ValueError(f"{kind!r} is not a feature score; choose mahalanobis or knn")


def choose_threshold(in_scope: np.ndarray, oos: np.ndarray | None = None, correct: np.ndarray | None = None,
                     target_recall: float = 0.95) -> dict:
    """The threshold on validation scores, and the rule that chose it.

    in_scope: scores of in-scope validation examples; oos: scores of OOS validation examples (or None);
    correct: whether each in-scope example's arg-max class is right (for the accuracy rule).
    """
    in_scope = np.asarray(in_scope, dtype=np.float64)
    if oos is not None and len(oos):
        oos = np.asarray(oos, dtype=np.float64)
        right = np.ones(len(in_scope), bool) if correct is None else np.asarray(correct, bool)
        candidates = np.unique(np.concatenate([in_scope, oos, [np.inf]]))
        # An in-scope example counts as right when it is kept and classified right; an OOS one when rejected.
        accuracy = [((in_scope >= t) & right).sum() + (oos < t).sum() for t in candidates]
        best = int(np.argmax(accuracy))  # ties: the lowest threshold, which keeps the most queries in scope
        return {"threshold": float(candidates[best]), "rule": "max validation accuracy over in-scope + OOS",
                "validation_accuracy": float(accuracy[best] / (len(in_scope) + len(oos)))}
    threshold = _keeping(in_scope, target_recall)
    return {"threshold": threshold, "rule": f"{target_recall:.0%} in-scope validation recall",
            "validation_recall": float((in_scope >= threshold).mean())}


def _keeping(in_scope: np.ndarray, recall: float) -> float:
    """The highest threshold that keeps at least `recall` of the in-scope scores (score >= threshold)."""
    ordered = np.sort(np.asarray(in_scope, dtype=np.float64))
    return float(ordered[int(np.floor((1 - recall) * len(ordered) + 1e-9))])


def fpr_at_recall(in_scope: np.ndarray, oos: np.ndarray, recall: float = 0.95) -> float:
    """Fraction of OOS examples kept in scope when the threshold keeps `recall` of in-scope ones."""
    return float((np.asarray(oos) >= _keeping(in_scope, recall)).mean())


def oos_metrics(scores: np.ndarray, is_oos: np.ndarray, predicted: np.ndarray, targets: np.ndarray,
                num_classes: int, threshold: float) -> dict:
    """OOS metrics on a test set holding in-scope and OOS examples.

    scores (N,): in-scope scores; is_oos (N,) bool; predicted (N,): arg-max class; targets (N,): class
    index of in-scope examples (ignored where is_oos). Open-set macro-F1 treats OOS as class `num_classes`.
    """
    scores, is_oos = np.asarray(scores, dtype=np.float64), np.asarray(is_oos, bool)
    predicted, targets = np.asarray(predicted), np.asarray(targets)
    rejected = scores < threshold
    inside = ~is_oos
    open_pred = np.where(rejected, num_classes, predicted)
    open_true = np.where(is_oos, num_classes, targets)
    tp = int((rejected & is_oos).sum())
    result = {
        "examples": int(len(scores)), "oos_examples": int(is_oos.sum()), "threshold": float(threshold),
        "auroc": float(roc_auc_score(is_oos, -scores)),  # OOS is the positive class; low scores flag it
        "aupr": float(average_precision_score(is_oos, -scores)),
        "fpr_at_95_recall": fpr_at_recall(scores[inside], scores[is_oos], 0.95),
        "oos_recall": tp / max(int(is_oos.sum()), 1),
        "oos_precision": tp / max(int(rejected.sum()), 1),
        "in_scope_accuracy": float((predicted[inside] == targets[inside]).mean()),
        "in_scope_accuracy_thresholded": float((open_pred[inside] == targets[inside]).mean()),
        "open_accuracy": float((open_pred == open_true).mean()),
        "open_macro_f1": float(f1_score(open_true, open_pred, labels=np.arange(num_classes + 1), average="macro",
                                        zero_division=0)),
    }
    return result
