"""A trained classifier, loaded for prediction and evaluation: `lorafit.load(path)`.

`path` is a run folder or a folder written by `lorafit export`. What to load from it (which kind of
folder, which base model, where the trained weights are) is decided once, by `plan_load`; `load`
and the server's registry (serving.py) both follow that `LoadPlan`. Whatever computes the logits
(PyTorch with the adapter, a merged PyTorch model, ONNX Runtime) is a *backend*: a callable from a
padded batch (input_ids, attention_mask) to logits. Tokenising, length-sorted batching under the
token budget (resolved once, at load, for the device the model runs on), softmax and top-k
(`top_labels`) are the same for all of them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from . import batching, data, kernels, methods
from .config import Config, ModelConfig
from .errors import UserError
from .evaluate import classification_metrics, softmax
from .models import ALIASES, build_classifier, load_tokenizer, looks_like_hub_id
from .rundir import RunDir
from .runtime import autocast, autocast_dtype, select_device, token_budget

__all__ = ["Classifier", "LoadPlan", "plan_load", "load", "load_model", "recorded_calibration", "check_probability", "top_labels", "predict_logits", "check_no_pickles",
           "run_split", "base_model_config", "TorchBackend", "OnnxBackend", "ONNX_BATCH_SIZE"]

log = logging.getLogger(__name__)

#: Rows per batch of an ONNX export, at most (`load`); a static int8 export is calibrated on batches of this size.
ONNX_BATCH_SIZE = 64

#: A padded batch -> logits (B, C) as float32.
Backend = Callable[[torch.Tensor, torch.Tensor], np.ndarray]


class TorchBackend:
    """A PyTorch module (lorafit's SequenceClassifier, or a transformers model returning `.logits`).

    `fast=True` (a model loaded for prediction) runs its linear layers through oneDNN on CPU where
    that is faster here (lorafit/kernels.py); `fast_paths` records the switch (`.undo()` gives the
    model its stock layers back). The training loop's evaluation leaves its model's layers as
    `train.cpu_kernels` chose them.
    """

    def __init__(self, model: nn.Module, device: torch.device, amp: torch.dtype | None = None, fast: bool = False):
        self.model = model.to(device).eval()
        self.device = device
        self.amp = amp
        self.fast_paths = kernels.use_fast_paths(self.model, device, dropout=False) if fast else kernels.FastPaths()

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
    batches = batching.sorted_batches(lengths, batch_size, max_tokens)
    for batch, input_ids, attention_mask in batching.iterate(token_ids, batches, pad_id):
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
    """A backend, its tokenizer and label space, ready to predict.

    `max_tokens` is the run's train.max_batch_tokens resolved for the device the backend runs on
    (`runtime.token_budget`), by whoever placed the backend there (`load`).
    """

    def __init__(self, backend: Backend, tokenizer, labels: list[str], cfg: Config, max_tokens: int | None,
                 kind: str = "run", batch_size: int | None = None):
        self.backend = backend
        self.tokenizer = tokenizer
        self.labels = labels
        self.cfg = cfg
        self.max_tokens = max_tokens  # padded tokens per forward pass; None: no budget, rows only
        self.kind = kind  # "run", or the export format: "merged", "adapter", "onnx"
        self.batch_size = batch_size or cfg.train.eval_batch_size
        self.temperature = 1.0  # the run's calibration (ood.json), set by `load`; probabilities use logits / T
        self.threshold: float | None = None  # out of scope below this calibrated top probability (ood.json), set by `load`
        self.threshold_source = "none"

    @property
    def model(self) -> nn.Module | None:
        return getattr(self.backend, "model", None)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return batching.tokenize(self.tokenizer, list(texts), self.cfg.data.max_length)

    def logits(self, texts: list[str]) -> np.ndarray:
        return batched_logits(self.backend, self.tokenize(texts), self.pad_id, self.batch_size, self.max_tokens)

    def predict(self, texts: list[str] | str, top_k: int = 3) -> list[list[tuple[str, float]]]:
        """For each text, the `top_k` labels with their probabilities, most likely first."""
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            return []
        return top_labels(softmax(self.logits(texts) / self.temperature), self.labels, top_k)

    def evaluate(self, texts: list[str], labels: list[str]) -> dict:
        return classification_metrics(self.logits(texts), label_indices(labels, self.labels), self.labels)


def top_labels(probs: np.ndarray, labels: list[str], top_k: int) -> list[list[tuple[str, float]]]:
    """For each row of `probs` (N, C), the `top_k` labels with their probabilities, most likely first
    (ties in label order); every label once where `top_k` is over the label count."""
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


#: What `lorafit export --format` writes (export.json "format").
EXPORT_FORMATS = ("merged", "adapter", "onnx")


@dataclass(frozen=True)
class LoadPlan:
    """What a run or export folder holds for prediction, decided from its small files (export.json,
    config.yaml, labels.json, adapter_config.json) before any weight is read."""

    folder: Path
    kind: str
    """"run", or the export format: "merged", "adapter", "onnx"."""
    cfg: Config
    """The config as the folder records it."""
    labels: list[str]
    weights: Path
    """The trained weights: the run's adapter/ or model/ folder, or the export folder itself."""
    base: ModelConfig | None
    """The base model the weights load into, named as it is found on this machine (`base_model_config`);
    None for merged and ONNX exports, which carry every weight."""
    is_adapter: bool
    """`weights` is a peft adapter over `base` (an adapter method's run, an adapter export)."""

    @property
    def file_bytes(self) -> int:
        """Bytes of weights run from a file rather than held as PyTorch tensors (an ONNX graph)."""
        return (self.folder / "model.onnx").stat().st_size if self.kind == "onnx" else 0


def plan_load(path: str | Path) -> LoadPlan:
    """What `load` builds from the run or export folder at `path`."""
    folder = RunDir(path)
    meta = folder.read_json("export.json") if (folder.path / "export.json").is_file() else None
    cfg, labels = folder.config(), folder.labels()
    if meta is None:
        method = methods.build(cfg.method)
        kind, weights, is_adapter = "run", folder.artifact(method.artifact), method.artifact == "adapter"
    else:
        kind, weights = meta.get("format"), folder.path
        if kind not in EXPORT_FORMATS:
            raise UserError(f"{folder.path}/export.json names an unknown format {kind!r}; re-export with lorafit export")
        is_adapter = kind == "adapter"
    base = base_model_config(cfg.model, weights) if kind in ("run", "adapter") else None
    return LoadPlan(folder.path, kind, cfg, labels, weights, base, is_adapter)


def load(path: str | Path | LoadPlan, device: str = "auto", threads: int | None = None, merge: bool = True) -> Classifier:
    """A classifier from a run folder or an export folder (or its `plan_load`), from its files alone.

    A run's adapter is folded into the base weights (`merge=True`): the same function, one matmul
    per layer instead of two paths, logits equal to the unmerged model's up to float rounding
    (tests/test_train_e2e.py). `merge=False` keeps the training-time modules (what export compares with).
    `threads` sets torch's thread count for a run and ONNX Runtime's for an ONNX export.
    """
    plan = path if isinstance(path, LoadPlan) else plan_load(path)
    if plan.kind == "onnx":
        # Batches of at most ONNX_BATCH_SIZE: dynamic int8 graphs quantise activations with one scale
        # per batch, so a text's scores shift a little with its batch-mates, least in small batches
        # (Banking77 test accuracy of the int8 model: 93.34% one text at a time, 93.44% at 64, 93.15%
        # at 128; int8-static graphs have fixed scales); 64 is also faster than 128 on ONNX Runtime here.
        backend = OnnxBackend(plan.folder / "model.onnx", threads)
        return _calibrated(plan, Classifier(backend, _folder_tokenizer(plan.folder), plan.labels, plan.cfg,
                          token_budget(plan.cfg.train.max_batch_tokens, torch.device("cpu")),  # ONNX Runtime runs on CPU
                          plan.kind, batch_size=min(ONNX_BATCH_SIZE, plan.cfg.train.eval_batch_size)))
    if plan.kind == "run" and threads is not None:
        torch.set_num_threads(threads)
    model = _torch_model(plan, merge)
    target = select_device(device)
    amp = autocast_dtype(plan.cfg.train, target) if target.type == "cuda" else None
    tokenizer = _folder_tokenizer(plan.folder) if plan.base is None else load_tokenizer(plan.base)
    return _calibrated(plan, Classifier(TorchBackend(model, target, amp, fast=True), tokenizer, plan.labels, plan.cfg,
                      token_budget(plan.cfg.train.max_batch_tokens, target), plan.kind))


def recorded_calibration(folder: Path, flag: float | None = None) -> tuple[float, float | None, str]:
    """What a run fitted on validation (its ood.json; exports carry a copy): (temperature, out-of-scope
    threshold on the calibrated top probability, where the threshold comes from). `flag`, a threshold
    the user gave, wins; the run's own is used only when its ood.score is msp, the score computed here."""
    if not (Path(folder) / "ood.json").is_file():
        return 1.0, flag, "flag" if flag is not None else "none (the run has no ood.json)"
    record = RunDir(folder).read_json("ood.json")
    temperature = float(record["temperature"])
    if flag is not None:
        return temperature, flag, "flag"
    if record.get("score") != "msp":
        return temperature, None, (f"none (the run decides out-of-scope by {record.get('score')}, which predict "
                                   "and serve do not compute; pass --threshold for a top-probability threshold)")
    return temperature, float(record["threshold"]), record["source"]


def check_probability(value: float | None, what: str) -> None:
    """A threshold given by the user must be a probability: one line otherwise."""
    if value is not None and not 0.0 <= value <= 1.0:
        raise UserError(f"{what} must be a probability in [0, 1], got {value}")


def _calibrated(plan: LoadPlan, classifier: Classifier) -> Classifier:
    classifier.temperature, classifier.threshold, classifier.threshold_source = recorded_calibration(plan.folder)
    return classifier


def _torch_model(plan: LoadPlan, merge: bool) -> nn.Module:
    """The PyTorch model `plan` names, on CPU; a run's adapter merged where `merge`."""
    if plan.kind == "merged":
        from .modeling_lorafit import LorafitForSequenceClassification

        check_no_pickles(plan.folder, trust_pickle=False)
        return LorafitForSequenceClassification.from_pretrained(str(plan.folder))
    model = load_model(RunDir(plan.folder), plan.cfg, plan.labels, artifact=plan.weights)
    if plan.kind == "run" and merge:
        model = methods.build(plan.cfg.method).merge(model)
    return model


def _folder_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    # The folder's config.json declares lorafit's own model type with remote code; the tokenizer
    # files name their class, so nothing from the folder needs to run.
    return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)


def run_split(run: RunDir, cfg: Config, split: str) -> data.Split:
    """A split of the run's own dataset, checked against the rows splits.json recorded at training; its
    in-scope examples only (out-of-scope ones, data.oos_label / data.known_intents, have no class to score)."""
    dataset, _ = data.load(cfg.data, cfg.seed)
    if split not in dataset.splits:
        raise UserError(f"the dataset has no {split} split; it has {', '.join(dataset.splits)}")
    chosen = dataset.splits[split]
    if (run.path / "splits.json").is_file():
        recorded = run.read_json("splits.json").get(split)
        if recorded is not None and recorded != chosen.rows:
            raise UserError(f"the {split} split no longer matches splits.json: the data changed since training")
    if dataset.oos_label is None:
        return chosen
    return chosen.subset([i for i, label in enumerate(chosen.labels) if label != dataset.oos_label])
