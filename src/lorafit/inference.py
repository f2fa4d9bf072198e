"""A trained run, loaded for prediction and evaluation: `lorafit.load(run_dir)`."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import data
from .config import Config
from .errors import UserError
from .evaluate import classification_metrics, softmax
from .methods import registry
from .models import build_classifier, load_tokenizer
from .rundir import RunDir
from .runtime import autocast, autocast_dtype, select_device

__all__ = ["Classifier", "load", "predict_logits", "check_no_pickles"]

log = logging.getLogger(__name__)


@torch.inference_mode()
def predict_logits(
    model: nn.Module,
    token_ids: list[list[int]],
    pad_id: int,
    batch_size: int,
    device: torch.device,
    amp: torch.dtype | None = None,
) -> np.ndarray:
    """Logits for every sequence, in input order; batches are length-sorted to avoid padding."""
    model.eval()
    lengths = [len(t) for t in token_ids]
    out: np.ndarray | None = None
    for batch, input_ids, attention_mask in data.iterate(token_ids, data.sorted_batches(lengths, batch_size), pad_id):
        with autocast(device, amp):
            logits = model(input_ids.to(device), attention_mask.to(device))  # (B, C)
        if out is None:
            out = np.zeros((len(token_ids), logits.shape[-1]), dtype=np.float32)
        out[batch] = logits.float().cpu().numpy()
    return out if out is not None else np.zeros((0, 0), dtype=np.float32)


class Classifier:
    """A run folder's model, tokenizer and label space, ready to predict."""

    def __init__(self, model: nn.Module, tokenizer, labels: list[str], cfg: Config, device: torch.device):
        self.model = model
        self.tokenizer = tokenizer
        self.labels = labels
        self.cfg = cfg
        self.device = device
        self.amp = autocast_dtype(cfg.train, device) if device.type == "cuda" else None

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def logits(self, texts: list[str]) -> np.ndarray:
        tokens = data.tokenize(self.tokenizer, list(texts), self.cfg.data.max_length)
        return predict_logits(self.model, tokens, self.pad_id, self.cfg.train.eval_batch_size, self.device, self.amp)

    def predict(self, texts: list[str] | str, top_k: int = 3) -> list[list[tuple[str, float]]]:
        """For each text, the `top_k` labels with their probabilities, most likely first."""
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            return []
        probs = softmax(self.logits(texts))
        k = max(1, min(top_k, len(self.labels)))
        order = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
        return [[(self.labels[j], float(p[j])) for j in row] for row, p in zip(order, probs)]

    def evaluate(self, texts: list[str], labels: list[str]) -> dict:
        index = {name: i for i, name in enumerate(self.labels)}
        unseen = sorted(set(labels) - set(index))
        if unseen:
            raise UserError(f"labels unknown to this run: {', '.join(unseen[:10])}; it knows {len(self.labels)} labels (labels.json)")
        targets = np.array([index[label] for label in labels])
        return classification_metrics(self.logits(texts), targets, self.labels)


#: Weight files that are pickles: loading one can run arbitrary code.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def check_no_pickles(folder: Path, trust_pickle: bool) -> None:
    """lorafit writes safetensors only; a pickle in a run's weights folder was put there by hand."""
    if trust_pickle:
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise UserError(
            f"{folder} holds pickle weights ({', '.join(pickles[:5])}), which can run arbitrary code when loaded; "
            "lorafit writes safetensors only, so remove them, or set model.trust_pickle: true in the run's "
            "config.yaml if you trust their source"
        )


def load(run_dir: str | Path, device: str = "auto") -> Classifier:
    """Rebuild a trained classifier from its run folder alone."""
    run = RunDir(run_dir)
    cfg = run.config()
    labels = run.labels()
    method = registry.get(cfg.method.name)(cfg.method)
    artifact = run.artifact(method.artifact)
    check_no_pickles(artifact, cfg.model.trust_pickle)
    base = build_classifier(cfg.model, len(labels), cfg.seed)
    model = method.load(base, artifact)
    target = select_device(device)
    model.to(target).eval()
    return Classifier(model, load_tokenizer(cfg.model), labels, cfg, target)
