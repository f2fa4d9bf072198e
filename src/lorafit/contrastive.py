"""The few-shot pieces of training: a contrastive stage on sentence vectors, and a head started from
class centroids.

With a handful of examples per class, a sentence encoder learns more from "these two say the same
thing, those two do not" than from cross-entropy on a fresh head (SetFit, Tunstall et al. 2022; CPFT,
Zhang et al. 2021). lorafit runs that as a first stage of its one training loop (`contrastive.epochs`):
the method's trainable weights (adapters, or all of them for full fine-tuning) move the pooled sentence
vectors (`SequenceClassifier.features`) under a supervised contrastive loss over each batch, the head
untouched; then the classification stage trains as usual. Batches of the contrastive stage hold several
examples of each of their classes (`class_grouped_batches`), so every example has positives in its batch.

`centroid_head` starts the head as a nearest-centroid classifier (`model.head_init=centroids`): each
class's weight row is the mean of its training examples' unit sentence vectors, renormalised, so the
first logits are scaled cosine similarities to the class centroids rather than noise.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["supcon_loss", "cosine_pair_loss", "contrastive_loss", "class_grouped_batches", "centroid_head",
           "nearest_centroid_accuracy"]


def supcon_loss(features: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, L_out), summed over the anchors that have a positive.

    features (b, H) sentence vectors, labels (b,). For anchor i with positives P(i) (same label, not i):
    -1/|P(i)| * sum_p log( exp(z_i.z_p / t) / sum_{a != i} exp(z_i.z_a / t) ), z the unit vectors.
    """
    z = F.normalize(features.float(), dim=-1)  # (b, H)
    logits = z @ z.T / temperature  # (b, b)
    self_mask = torch.eye(len(z), dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))  # an anchor is not its own candidate
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)  # (b, b)
    positive = (labels[:, None] == labels[None, :]) & ~self_mask  # (b, b)
    counts = positive.sum(1)  # (b,)
    has = counts > 0
    if not has.any():
        return features.sum() * 0.0  # no pair in the batch: no signal, but a graph for backward
    per_anchor = -(log_prob.masked_fill(~positive, 0.0).sum(1)[has] / counts[has])  # (anchors,)
    return per_anchor.sum()


def cosine_pair_loss(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """SetFit's objective over every pair of the batch: (cos(u, v) - [same label])^2, summed over pairs
    and divided by the batch's pairs per example (b - 1), so it sums to b "examples" like supcon_loss."""
    z = F.normalize(features.float(), dim=-1)  # (b, H)
    b = len(z)
    if b < 2:
        return features.sum() * 0.0
    cos = z @ z.T  # (b, b)
    same = (labels[:, None] == labels[None, :]).float()
    upper = torch.triu(torch.ones(b, b, dtype=torch.bool, device=z.device), diagonal=1)
    return ((cos - same)[upper] ** 2).sum() * 2 / (b - 1)


def contrastive_loss(kind: str, features: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """contrastive.loss by name, summed over the batch's examples."""
    if kind == "supcon":
        return supcon_loss(features, labels, temperature)
    return cosine_pair_loss(features, labels)


def class_grouped_batches(lengths: list[int], labels: list[int], batch_size: int, per_class: int,
                          rng: random.Random) -> list[list[int]]:
    """An epoch of the contrastive stage: every example once, in ceil(n / batch_size) batches, most of
    them holding `per_class` examples of each of their classes.

    Each class's examples are shuffled and cut into runs of `per_class`; the runs are shuffled and laid
    end to end; the sequence is cut into batches; each batch is ordered by length (padding). A function
    of the labels and `rng` alone, so a resumed epoch draws the same batches.
    """
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    runs: list[list[int]] = []
    for label in sorted(by_class):
        members = by_class[label]
        rng.shuffle(members)
        runs.extend(members[k:k + per_class] for k in range(0, len(members), per_class))
    rng.shuffle(runs)
    order = [i for run in runs for i in run]
    return [sorted(order[k:k + batch_size], key=lambda i: lengths[i]) for k in range(0, len(order), batch_size)]


def _centroids(vectors: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Unit mean of each class's unit vectors (C, H); a class without examples gets zeros."""
    unit = F.normalize(vectors, dim=-1)
    sums = torch.zeros(num_classes, vectors.shape[1]).index_add_(0, labels, unit)
    return F.normalize(sums, dim=-1)


@torch.no_grad()
def centroid_head(model: nn.Module, vectors: torch.Tensor, labels: torch.Tensor, scale: float) -> None:
    """Start the head as a nearest-centroid classifier: logit_c = scale * cos(x, centroid_c) for a sentence
    vector x of the training vectors' mean norm (the head reads vectors before normalisation), bias 0.
    vectors (N, H): the training examples' sentence vectors (`SequenceClassifier.features`), labels (N,)."""
    head = model.classifier
    centroids = _centroids(vectors, labels, head.out_features)  # (C, H)
    mean_norm = float(vectors.norm(dim=1).mean())
    head.weight.copy_((scale / mean_norm) * centroids.to(head.weight))
    head.bias.zero_()


def nearest_centroid_accuracy(train_vectors: torch.Tensor, train_labels: torch.Tensor, vectors: torch.Tensor,
                              labels: torch.Tensor, num_classes: int) -> float:
    """Accuracy of the nearest training centroid (cosine) on `vectors`: how well the contrastive stage
    separates the classes, a validation figure the head takes no part in."""
    centroids = _centroids(train_vectors, train_labels, num_classes)  # (C, H)
    return float(((F.normalize(vectors, dim=-1) @ centroids.T).argmax(1) == labels).float().mean())
