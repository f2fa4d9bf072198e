"""A trained classifier, loaded for prediction and evaluation: `lorafit.load(path)`.

`path` is a run folder or a folder written by `lorafit export`. Whatever computes the logits
(PyTorch with the adapter, a merged PyTorch model, ONNX Runtime) is a *backend*: a callable from a
padded batch (input_ids, attention_mask) to logits. Tokenising, length-sorted batching, softmax
and top-k are the same for all of them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from . import data, kernels
from .config import Config, ModelConfig
from .errors import UserError
from .evaluate import classification_metrics, softmax
from . import methods
from .models import ALIASES, build_classifier, load_tokenizer, looks_like_hub_id
from .rundir import RunDir
from .runtime import autocast, autocast_dtype, select_device, token_budget

__all__ = ["Classifier", "load", "predict_logits", "check_no_pickles", "run_split", "base_model_config", "TorchBackend",
           "OnnxBackend"]

log = logging.getLogger(__name__)

#: A padded batch -> logits (B, C) as float32.
Backend = Callable[[torch.Tensor, torch.Tensor], np.ndarray]


class TorchBackend:
    """A PyTorch module (lorafit's SequenceClassifier, or a transformers model returning `.logits`).

    `fast=True` (a model loaded for prediction) runs its linear layers through oneDNN on CPU where
    that is faster here (lorafit/kernels.py); the training loop's evaluation leaves its model's
    layers as `train.cpu_kernels` chose them.
    """

    def __init__(self, model: nn.Module, device: torch.device, amp: torch.dtype | None = None, fast: bool = False):
        self.model = model.to(device).eval()
        self.device = device
        self.amp = amp
        if fast:
            kernels.speed_up(self.model, device, dropout=False)

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> np.ndarray:
        with autocast(self.device, self.amp):
            out = self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device))
        logits = getattr(out, "logits", out)  # (B, C)
        return logits.float().cpu().numpy()


class OnnxBackend:
    """An ONNX graph with inputs input_ids, attention_mask (int64) and output logits, on ONNX Runtime."""

    def __init__(self, path: Path, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError("ONNX models need onnxruntime: pip install 'lorafit[export]'") from None
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> np.ndarray:
        feeds = {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()}
        return self.session.run(["logits"], feeds)[0].astype(np.float32, copy=False)


def batched_logits(backend: Backend, token_ids: list[list[int]], pad_id: int, batch_size: int,
                   max_tokens: int | None = None) -> np.ndarray:
    """Logits for every sequence, in input order; batches are length-sorted to avoid padding and
    hold at most `batch_size` rows and `max_tokens` padded tokens."""
    lengths = [len(t) for t in token_ids]
    out: np.ndarray | None = None
    batches = data.sorted_batches(lengths, batch_size, max_tokens)
    for batch, input_ids, attention_mask in data.iterate(token_ids, batches, pad_id):
        logits = backend(input_ids, attention_mask)  # (B, C)
        if out is None:
            out = np.zeros((len(token_ids), logits.shape[-1]), dtype=np.float32)
        out[batch] = logits
    return out if out is not None else np.zeros((0, 0), dtype=np.float32)


def predict_logits(model: nn.Module, token_ids: list[list[int]], pad_id: int, batch_size: int,
                   device: torch.device, amp: torch.dtype | None = None, max_tokens: int | None = None) -> np.ndarray:
    """`batched_logits` for a PyTorch model (the training loop's evaluation)."""
    return batched_logits(TorchBackend(model, device, amp), token_ids, pad_id, batch_size, max_tokens)


class Classifier:
    """A backend, its tokenizer and label space, ready to predict."""

    def __init__(self, backend: Backend, tokenizer, labels: list[str], cfg: Config, kind: str = "run",
                 batch_size: int | None = None):
        self.backend = backend
        self.tokenizer = tokenizer
        self.labels = labels
        self.cfg = cfg
        self.kind = kind  # "run", or the export format: "merged", "adapter", "onnx"
        self.batch_size = batch_size or cfg.train.eval_batch_size
        self.max_tokens = token_budget(cfg.train.max_batch_tokens, getattr(backend, "device", torch.device("cpu")))

    @property
    def model(self) -> nn.Module | None:
        return getattr(self.backend, "model", None)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return data.tokenize(self.tokenizer, list(texts), self.cfg.data.max_length)

    def logits(self, texts: list[str]) -> np.ndarray:
        return batched_logits(self.backend, self.tokenize(texts), self.pad_id, self.batch_size, self.max_tokens)

    def predict(self, texts: list[str] | str, top_k: int = 3) -> list[list[tuple[str, float]]]:
        """For each text, the `top_k` labels with their probabilities, most likely first."""
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            return []
        return top_labels(softmax(self.logits(texts)), self.labels, top_k)

    def evaluate(self, texts: list[str], labels: list[str]) -> dict:
        return classification_metrics(self.logits(texts), label_indices(labels, self.labels), self.labels)


def top_labels(probs: np.ndarray, labels: list[str], top_k: int) -> list[list[tuple[str, float]]]:
    k = max(1, min(top_k, len(labels)))
    order = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    return [[(labels[j], float(p[j])) for j in row] for row, p in zip(order, probs)]


def label_indices(labels: list[str], known: list[str]) -> np.ndarray:
    index = {name: i for i, name in enumerate(known)}
    unseen = sorted(set(labels) - set(index))
    if unseen:
        raise UserError(f"labels unknown to this model: {', '.join(unseen[:10])}; it knows {len(known)} labels (labels.json)")
    return np.array([index[label] for label in labels])


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


def base_model_config(model: ModelConfig, artifact: Path) -> ModelConfig:
    """`model`, or, where its name does not resolve on this machine (a run copied from the machine
    that trained it, whose base folder stayed there), the same settings naming the base by the hub
    id the adapter in `artifact` records (models.hub_id). A recorded local path is never taken
    instead of the config's name."""
    if model.name in ALIASES or Path(model.name).expanduser().exists():
        return model
    try:
        recorded = json.loads((artifact / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return model
    if not isinstance(recorded, str) or recorded == model.name or not looks_like_hub_id(recorded):
        return model
    log.info("base model %s is not on this machine; loading %s, the hub id the adapter records", model.name, recorded)
    return model.model_copy(update={"name": recorded})


def load_model(folder: RunDir, cfg: Config, labels: list[str], artifact: Path | None = None) -> nn.Module:
    """The trained PyTorch model of a run folder (or of an adapter export, whose files are `artifact`)."""
    method = methods.build(cfg.method)
    artifact = artifact or folder.artifact(method.artifact)
    check_no_pickles(artifact, cfg.model.trust_pickle)
    base = build_classifier(base_model_config(cfg.model, artifact), len(labels), cfg.seed)
    return method.load(base, artifact)


def load(path: str | Path, device: str = "auto", threads: int | None = None, merge: bool = True) -> Classifier:
    """A classifier from a run folder or an export folder, from its files alone.

    A run's adapter is folded into the base weights (`merge=True`): the same function, one matmul
    per layer instead of two paths, logits equal to the unmerged model's up to float rounding
    (tests/test_train_e2e.py). `merge=False` keeps the training-time modules (what export compares with).
    """
    folder = RunDir(path)
    if (folder.path / "export.json").is_file():
        return _load_export(folder, device, threads)
    if threads is not None:
        torch.set_num_threads(threads)
    cfg = folder.config()
    labels = folder.labels()
    method = methods.build(cfg.method)
    model = load_model(folder, cfg, labels)
    if merge:
        model = method.merge(model)
    target = select_device(device)
    amp = autocast_dtype(cfg.train, target) if target.type == "cuda" else None
    tokenizer = load_tokenizer(base_model_config(cfg.model, folder.artifact(method.artifact)))
    return Classifier(TorchBackend(model, target, amp, fast=True), tokenizer, labels, cfg)


def _folder_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    # The folder's config.json declares lorafit's own model type with remote code; the tokenizer
    # files name their class, so nothing from the folder needs to run.
    return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)


def _load_export(folder: RunDir, device: str, threads: int | None) -> Classifier:
    meta = folder.read_json("export.json")
    cfg, labels, kind = folder.config(), folder.labels(), meta.get("format")
    if kind == "onnx":
        backend: Backend = OnnxBackend(folder.path / "model.onnx", threads)
        # Batches of at most 64: int8 graphs quantise activations with one scale per batch, so a
        # text's scores shift a little with its batch-mates, least in small batches (Banking77
        # test accuracy of the int8 model: 93.34% one text at a time, 93.44% at 64, 93.15% at 128);
        # 64 is also faster than 128 on ONNX Runtime here.
        return Classifier(backend, _folder_tokenizer(folder.path), labels, cfg, kind,
                          batch_size=min(64, cfg.train.eval_batch_size))
    target = select_device(device)
    amp = autocast_dtype(cfg.train, target) if target.type == "cuda" else None
    if kind == "merged":
        from .modeling_lorafit import LorafitForSequenceClassification

        check_no_pickles(folder.path, trust_pickle=False)
        model = LorafitForSequenceClassification.from_pretrained(str(folder.path))
        return Classifier(TorchBackend(model, target, amp, fast=True), _folder_tokenizer(folder.path), labels, cfg, kind)
    if kind == "adapter":
        model = load_model(folder, cfg, labels, artifact=folder.path)
        tokenizer = load_tokenizer(base_model_config(cfg.model, folder.path))
        return Classifier(TorchBackend(model, target, amp, fast=True), tokenizer, labels, cfg, kind)
    raise UserError(f"{folder.path}/export.json names an unknown format {kind!r}; re-export with lorafit export")


def run_split(run: RunDir, cfg: Config, split: str) -> data.Split:
    """A split of the run's own dataset, checked against the rows splits.json recorded at training."""
    dataset, _ = data.load(cfg.data, cfg.seed)
    if split not in dataset.splits:
        raise UserError(f"the dataset has no {split} split; it has {', '.join(dataset.splits)}")
    chosen = dataset.splits[split]
    if (run.path / "splits.json").is_file():
        recorded = run.read_json("splits.json").get(split)
        if recorded is not None and recorded != chosen.rows:
            raise UserError(f"the {split} split no longer matches splits.json: the data changed since training")
    return chosen
