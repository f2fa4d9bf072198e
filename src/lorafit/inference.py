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

from . import batching, data, fitted, hardware, kernels, methods, ood
from .config import Config, ModelConfig
from .errors import UserError
from .evaluate import classification_metrics, softmax
from .fitted import Posthoc
from .frozen_casts import CastOnceLinear
from .models import ALIASES, build_classifier, load_tokenizer, looks_like_hub_id
from .rundir import RunDir
from .runtime import autocast, autocast_dtype, select_device, token_budget

__all__ = ["Classifier", "LoadPlan", "plan_load", "load", "load_model", "recorded_decision", "pretrained_config", "OutOfScope", "WithFeatures", "Vectors", "features_and_logits", "check_probability", "top_labels", "predict_logits", "check_no_pickles",
           "run_split", "base_model_config", "TorchBackend", "OnnxBackend", "ONNX_BATCH_SIZE"]

log = logging.getLogger(__name__)

#: Rows per batch of an ONNX export, at most (`load`); a static int8 export is calibrated on batches of this size.
ONNX_BATCH_SIZE = 64

#: A padded batch -> logits (B, C) as float32.
Backend = Callable[[torch.Tensor, torch.Tensor], np.ndarray]


class TorchBackend:
    """A PyTorch module (lorafit's SequenceClassifier, or a transformers model returning `.logits`).

    `fast=True` (a model loaded for prediction) runs its linear layers through oneDNN on CPU where
    that is faster here (lorafit/kernels.py), or under autocast (`amp`) as `CastOnceLinear`s, which cast
    their frozen weights to `amp` once (lorafit/frozen_casts.py); `fast_paths` records the switch
    (`.undo()` gives the model its stock layers back). The training loop's evaluation leaves its model's layers as
    `train.cpu_kernels` chose them.
    """

    def __init__(self, model: nn.Module, device: torch.device, amp: torch.dtype | None = None, fast: bool = False):
        self.model = model.to(device).eval()
        self.device = device
        self.amp = amp
        self.fast_paths = kernels.FastPaths()
        if fast and amp is None:
            self.fast_paths = kernels.use_fast_paths(self.model, device, dropout=False)
        elif fast:  # oneDNN's float32 linear would keep the products in float32; the weights' casts are made once
            self.model.requires_grad_(False)  # a loaded model's weights: frozen, so their casts can be kept
            self.fast_paths.switch(self.model, "cast_once_linear", nn.Linear, CastOnceLinear)

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


@dataclass
class OutOfScope:
    """How a loaded classifier decides that a text belongs to no class: the run's deciding score
    (ood.score) and its threshold, both chosen on validation (ood.json, ood.safetensors), or a top
    probability threshold the user gave. A text is out of scope when its in-scope score is below `threshold`."""

    score: str = "msp"
    threshold: float | None = None
    source: str = "none"
    temperature: float = 1.0
    post: Posthoc | None = None  # the fitted scorers, for scores other than msp

    @property
    def reads(self) -> tuple[str, ...]:
        """The sentence vectors the score reads besides the logits: "tuned" (the fine-tuned encoder's),
        "base" (the pre-trained encoder's)."""
        return (("tuned",) if self.score in ood.FEATURE_SCORES else ()) + (("base",) if self.score in ood.BASE_SCORES else ())

    def scores(self, logits: np.ndarray, vectors: Callable[[str], np.ndarray] | None = None) -> np.ndarray:
        """In-scope scores (N,) from raw logits (N, C); `vectors(which)` gives the texts' sentence vectors
        (N, H) for each of `reads`, called only for those."""
        if self.score == "msp" or self.post is None:
            return softmax(np.asarray(logits, dtype=np.float64) / self.temperature).max(-1)
        got = {which: vectors(which) for which in self.reads}
        return self.post.scores(self.score, got.get("tuned"), logits, got.get("base"))

    def scores_with(self, logits: np.ndarray, tuned: np.ndarray | None, vectors: Callable[[str], np.ndarray]) -> np.ndarray:
        """`scores`, with the fine-tuned vectors already in hand where the logits' own pass gave them (`tuned`)."""
        return self.scores(logits, lambda which: tuned if which == "tuned" and tuned is not None else vectors(which))

    def outside(self, scores: np.ndarray) -> np.ndarray:
        """Whether each text is out of scope (N,) bool."""
        scores = np.asarray(scores)
        return np.zeros(len(scores), bool) if self.threshold is None else scores < self.threshold


class Vectors(nn.Module):
    """A classifier's pooled sentence vector only (B, H): what feature-space OOS scores read."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.base = model.get_base_model() if hasattr(model, "get_base_model") else model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.base.features(input_ids, attention_mask)


class WithFeatures(nn.Module):
    """A classifier's forward returning [pooled sentence vector, logits] side by side: (B, H + C).
    `model`: lorafit's SequenceClassifier, a peft model over one (its adapters stay active), or a merged
    export's LorafitForSequenceClassification."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.base = model.get_base_model() if hasattr(model, "get_base_model") else model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        features = self.base.features(input_ids, attention_mask)  # (B, H)
        return torch.cat([features, self.base.classifier(self.base.dropout(features))], dim=-1)  # (B, H + C)


def features_and_logits(model: nn.Module, token_ids: list[list[int]], pad_id: int, batch_size: int,
                        device: torch.device, amp: torch.dtype | None, max_tokens: int | None,
                        num_labels: int) -> tuple[np.ndarray, np.ndarray]:
    """Pooled sentence vectors (N, H) and logits (N, C) in one pass."""
    both = predict_logits(WithFeatures(model), token_ids, pad_id, batch_size, device, amp, max_tokens)
    if len(token_ids) == 0:
        return np.zeros((0, 0), np.float32), np.zeros((0, num_labels), np.float32)
    return both[:, :-num_labels], both[:, -num_labels:]


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
        self.oos = OutOfScope()  # the run's calibration and out-of-scope decision (ood.json), set by `load`
        self.pretrained: Backend | None = None  # the pre-trained encoder's sentence vectors, where oos reads them

    @property
    def temperature(self) -> float:
        """The run's calibration: probabilities are softmax(logits / temperature)."""
        return self.oos.temperature

    @property
    def threshold(self) -> float | None:
        """Out of scope below this in-scope score (of `oos.score`); None: nothing is."""
        return self.oos.threshold

    @property
    def threshold_source(self) -> str:
        return self.oos.source

    @property
    def model(self) -> nn.Module | None:
        return getattr(self.backend, "model", None)

    @property
    def precision(self) -> str:
        """What the model computes in: fp32, bf16 or fp16 (PyTorch), or "onnx graph" (the graph's own types)."""
        return "onnx graph" if self.kind == "onnx" else precision_name(self.backend.amp)

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

    def vectors(self, which: str, texts: list[str]) -> np.ndarray:
        """Pooled sentence vectors (N, H) of the fine-tuned model ("tuned") or the pre-trained encoder ("base")."""
        if which == "base":
            backend = self.pretrained
        elif self.model is not None:
            backend = TorchBackend(Vectors(self.model), self.backend.device, self.backend.amp)
        else:
            backend = None
        if backend is None:
            raise UserError(f"out-of-scope score {self.oos.score} needs {which} sentence vectors, which a {self.kind} folder does not give")
        return batched_logits(backend, self.tokenize(texts), self.pad_id, self.batch_size, self.max_tokens)

    def classify(self, texts: list[str] | str, top_k: int = 3) -> tuple[list[list[tuple[str, float]]], np.ndarray, np.ndarray]:
        """For each text: its `top_k` labels with calibrated probabilities, its in-scope score (of
        `oos.score`) and whether it is out of scope (below `threshold`)."""
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            return [], np.zeros(0), np.zeros(0, bool)
        logits, scores = self.scored(texts)
        return top_labels(softmax(logits / self.temperature), self.labels, top_k), scores, self.oos.outside(scores)

    def outputs(self, texts: list[str], tuned: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """Raw logits (N, C) and, when `tuned` and the model is PyTorch, the fine-tuned sentence vectors
        (N, H) from the same pass; else None."""
        if not texts:
            return np.zeros((0, len(self.labels)), np.float32), None
        if not (tuned and self.model is not None):
            return self.logits(texts), None
        features, logits = features_and_logits(self.model, self.tokenize(texts), self.pad_id, self.batch_size,
                                               self.backend.device, self.backend.amp, self.max_tokens, len(self.labels))
        return logits, features

    def scored(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Raw logits (N, C) and in-scope scores (N,) of `oos.score`: one forward pass gives both where the
        score reads the fine-tuned vectors; the pre-trained encoder's (base_knn, hybrid) take their own."""
        logits, tuned = self.outputs(texts, "tuned" in self.oos.reads)
        return logits, self.oos.scores_with(logits, tuned, lambda which: self.vectors(which, texts))

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


#: What `load(precision=)` takes: the model's arithmetic at prediction.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")


def inference_autocast(plan: LoadPlan, target: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype a loaded PyTorch model runs under: `auto` is the run's own precision, the numbers its
    temperature and thresholds were fitted on: its train.precision on CUDA; on CPU float32, or bf16 for a run
    that trained with train.precision=bf16; `bf16` also on CPU, where it pays on CPUs with native bf16
    (AVX-512 BF16, AMX, Arm BF16: 1.87x the float32 texts/s on a Zen 4 core, top-1 agreeing on 99.84% of
    Banking77 test texts; README, Precision at prediction); `fp16` on CUDA only."""
    check_precision(precision)
    if precision == "auto":
        if target.type == "cuda":
            return autocast_dtype(plan.cfg.train, target)
        if target.type != "cpu" or plan.cfg.train.precision != "bf16":
            return None
        precision = "bf16"
    if precision == "fp32":
        return None
    if precision == "fp16":
        if target.type != "cuda":
            raise UserError(f"precision fp16 runs on CUDA only, not {target.type}; on CPU use bf16 or fp32")
        return torch.float16
    if target.type == "cpu":
        hardware.warn_if_emulated_bf16("bf16 prediction")
    return torch.bfloat16


def precision_name(amp: torch.dtype | None) -> str:
    """What a PyTorch model computes in, by its autocast dtype: fp32, bf16 or fp16."""
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp]


def load(path: str | Path | LoadPlan, device: str = "auto", threads: int | None = None, merge: bool = True,
         threshold: float | None = None, out_of_scope: bool = True, precision: str = "auto") -> Classifier:
    """A classifier from a run folder or an export folder (or its `plan_load`), from its files alone.

    A run's adapter is folded into the base weights (`merge=True`): the same function, one matmul
    per layer instead of two paths, logits equal to the unmerged model's up to float rounding
    (tests/test_train_e2e.py). `merge=False` keeps the training-time modules (what export compares with).
    `threads` sets torch's thread count for a run and ONNX Runtime's for an ONNX export. `threshold`, a
    top-probability threshold, replaces the run's own out-of-scope decision (`recorded_decision`).
    `out_of_scope=False` loads for logits only (export's parity check): the calibration is read, but a
    score's pre-trained encoder is not built and nothing is out of scope. `precision` (PRECISIONS,
    `inference_autocast`): bf16 trades float32's exact numbers for speed; out-of-scope thresholds were
    chosen on float32 scores, which bf16 moves a little.
    """
    plan = path if isinstance(path, LoadPlan) else plan_load(path)
    check_probability(threshold, "threshold")
    if plan.kind == "onnx" and precision not in ("auto", "fp32"):
        raise UserError(f"{plan.folder} is an ONNX export: ONNX Runtime runs the graph in its own precision, so "
                        f"precision {precision} applies only to run folders and PyTorch exports (for a smaller, "
                        "faster ONNX model: lorafit export --format onnx --quantize int8)")
    if plan.kind == "onnx":
        # Batches of at most ONNX_BATCH_SIZE: dynamic int8 graphs quantise activations with one scale
        # per batch, so a text's scores shift a little with its batch-mates, least in small batches
        # (Banking77 test accuracy of the int8 model: 93.34% one text at a time, 93.44% at 64, 93.15%
        # at 128; int8-static graphs have fixed scales); 64 is also faster than 128 on ONNX Runtime here.
        backend = OnnxBackend(plan.folder / "model.onnx", threads)
        classifier = Classifier(backend, _folder_tokenizer(plan.folder), plan.labels, plan.cfg,
                                token_budget(plan.cfg.train.max_batch_tokens, torch.device("cpu")),  # ONNX Runtime runs on CPU
                                plan.kind, batch_size=min(ONNX_BATCH_SIZE, plan.cfg.train.eval_batch_size))
        target, amp = torch.device("cpu"), None
    else:
        if plan.kind == "run" and threads is not None:
            torch.set_num_threads(threads)
        model = _torch_model(plan, merge)
        target = select_device(device)
        amp = inference_autocast(plan, target, precision)
        tokenizer = _folder_tokenizer(plan.folder) if plan.base is None else load_tokenizer(plan.base)
        classifier = Classifier(TorchBackend(model, target, amp, fast=True), tokenizer, plan.labels, plan.cfg,
                                token_budget(plan.cfg.train.max_batch_tokens, target), plan.kind)
    classifier.oos = recorded_decision(plan, threshold)
    if not out_of_scope:
        classifier.oos = OutOfScope("msp", None, "none (loaded for logits only)", classifier.oos.temperature)
    elif "base" in classifier.oos.reads:  # the pre-trained encoder, rebuilt from the run's model.name, as at training
        pretrained = build_classifier(pretrained_config(plan), len(plan.labels), plan.cfg.seed)
        classifier.pretrained = TorchBackend(Vectors(pretrained), target, amp, fast=True)
    return classifier


def pretrained_config(plan: LoadPlan) -> ModelConfig:
    """The pre-trained encoder base_knn and hybrid read: a run's (or adapter export's) base as found here;
    for a merged or ONNX export, the run's model.name where it resolves on this machine, else the hub id
    export.json records."""
    if plan.base is not None:
        return plan.base
    model = plan.cfg.model
    if model.name in ALIASES or Path(model.name).expanduser().exists():
        return model
    recorded = (RunDir(plan.folder).read_json("export.json") or {}).get("base_model_hub_id")
    return model.model_copy(update={"name": recorded}) if isinstance(recorded, str) and looks_like_hub_id(recorded) else model


def recorded_decision(plan: LoadPlan, flag: float | None = None) -> OutOfScope:
    """How the run `plan` names decides out of scope (its ood.json and ood.safetensors; exports carry
    copies): its calibration and deciding score with the threshold chosen on validation. `flag`, a
    top-probability threshold the user gave, wins. Where the folder cannot compute the run's score (an
    ONNX export gives no sentence vectors; a run of an older lorafit saved no fitted arrays), no
    threshold, and `source` says why and what to do."""
    post = fitted.load(plan.folder)
    if post is None:
        return OutOfScope("msp", flag, "flag" if flag is not None else "none (the run has no ood.json)")
    if flag is not None:
        return OutOfScope("msp", flag, "flag", post.temperature)
    decision = OutOfScope(post.score, post.threshold, post.source, post.temperature, post)
    if not post.ready:
        fix = "run `lorafit eval RUN --refit` with this lorafit" if plan.kind == "run" else \
            "refit the run it came from (`lorafit eval RUN --refit`) and export it again"
        return OutOfScope("msp", None, f"none (the run decides out of scope by {post.score}, but {plan.folder} has no "
                          f"matching fitted {fitted.ARRAYS}: {fix}, or pass --threshold for a top-probability "
                          "threshold)", post.temperature)
    if plan.kind == "onnx" and "tuned" in decision.reads:
        return OutOfScope("msp", None, f"none (the run decides out of scope by {post.score}, which reads the fine-tuned "
                          "model's sentence vectors; an ONNX export gives logits only: export merged or adapter, or "
                          "pass --threshold for a top-probability threshold)", post.temperature)
    return decision


def check_probability(value: float | None, what: str) -> None:
    """A threshold given by the user must be a probability: one line otherwise."""
    if value is not None and not 0.0 <= value <= 1.0:
        raise UserError(f"{what} must be a probability in [0, 1], got {value}")


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
    from transformers import AutoTokenizer, PretrainedConfig

    # The folder's config.json declares lorafit's own model type with remote code; the tokenizer
    # files name their class, so nothing from the folder needs to run. A blank config keeps transformers
    # from reading config.json for the tokenizer (it warned that lorafit-classifier is not its model type).
    return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False, config=PretrainedConfig())


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
