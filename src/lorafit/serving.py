"""What `lorafit serve` holds in memory and the one thread that computes with it; no HTTP here.

Owns: the server's `Limits`; the `Registry` of everything served by name (`Served`), where adapters
with the same base checkpoint, pooling and peft type share *one* copy of the base encoder
(`SharedBase`: named peft adapters, one classification head each, since label sets differ) and run
folders without an adapter (full fine-tuning) and merged/ONNX exports are loaded whole by
`inference.load`; and the micro-`Batcher`, which collects concurrent requests for up to
`max_wait_ms` and runs them on the single compute thread, grouped by adapter (a forward pass
activates one adapter). What to load from a folder is `inference.plan_load`'s decision, not made
again here. The HTTP app in front of this is serve.py.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from . import batching
from .config import ModelConfig
from .errors import UserError
from .evaluate import softmax
from .inference import (LoadPlan, OutOfScope, batched_logits, check_no_pickles, check_precision, check_probability, inference_autocast, load,
                        plan_load, precision_name, pretrained_config, recorded_decision)
from .models import ALIASES, build_classifier, load_tokenizer, resolve_model_path
from .rundir import safe_name
from .runtime import autocast, token_budget

__all__ = ["Limits", "Served", "SharedBase", "Registry", "Batcher", "Unavailable"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    """What the server accepts per request and how it batches (the `lorafit serve --max-*` flags)."""

    max_texts: int = 64
    """Texts per request."""
    max_chars: int = 2000
    """Characters per text."""
    max_body_bytes: int = 1_000_000
    """Request body size."""
    max_batch: int = 64
    """Texts per micro-batch."""
    max_wait_ms: float = 5.0
    """How long a request waits for others to share its batch."""
    max_queued: int = 4096
    """Texts waiting for the compute thread; a request that would go over gets 503 and Retry-After."""

    def __post_init__(self):
        for name in ("max_texts", "max_chars", "max_body_bytes", "max_batch", "max_queued"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1")
        if self.max_queued < self.max_texts:  # else a large request could never be queued, however often retried
            raise UserError(f"--max-queued ({self.max_queued}) must be at least --max-texts ({self.max_texts})")
        if self.max_wait_ms < 0:
            raise UserError("--max-wait-ms must be 0 or more")


# -- what is served ---------------------------------------------------------------------------

@dataclass
class Served:
    """One named classifier: its labels, how to get logits, and how it decides out of scope."""

    name: str
    labels: list[str]
    outputs: Callable[[list[str], bool], tuple[np.ndarray, np.ndarray | None]]
    """(texts, tuned) -> raw logits (N, C) and, if `tuned` and the model can, the fine-tuned sentence vectors
    (N, H) of the same pass, else None (`Classifier.outputs`); compute thread only."""
    info: dict = field(default_factory=dict)
    """What the adapters route shows of it: kind, shared_base, method, base_model."""
    model: nn.Module | None = None
    """A model of its own (not an adapter on a shared base), counted in the weights figure."""
    file_bytes: int = 0
    """Weights run from a file rather than held as tensors (an ONNX graph), counted in the weights figure."""
    oos: OutOfScope = field(default_factory=OutOfScope)
    """The run's calibration and out-of-scope decision (ood.json), or the --threshold flag's."""
    pretrained: nn.Module | None = None
    """The pre-trained encoder a model of its own reads for base_knn / hybrid, counted in the weights figure."""
    vectors: Callable[[str, list[str]], np.ndarray] | None = None
    """(which, texts) -> sentence vectors (N, H), "tuned" or "base", where `oos` reads them; compute thread only."""
    base_path: str | None = None
    """A run's base model, resolved (`models.resolve_model_path`): adapters added over HTTP may build on it."""

    @property
    def threshold(self) -> float | None:
        return self.oos.threshold

    @property
    def temperature(self) -> float:
        """Probabilities are softmax(logits / temperature); `logits` stays raw."""
        return self.oos.temperature

    def logits(self, texts: list[str]) -> np.ndarray:
        """Raw logits (N, C) of `texts` (compute thread)."""
        return self.outputs(texts, False)[0]

    def scores(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Calibrated probabilities (N, C) and in-scope scores (N,) of `texts` (compute thread); a score that
        reads the fine-tuned vectors takes them from the logits' own pass."""
        logits, tuned = self.outputs(texts, "tuned" in self.oos.reads)
        return softmax(logits / self.temperature), self.oos.scores_with(logits, tuned, lambda which: self.vectors(which, texts))


@dataclass
class _Adapter:
    head: nn.Linear
    max_length: int
    max_tokens: int | None  # the run's train.max_batch_tokens resolved for SharedBase.device
    key: str  # its name inside peft: "adapter_<n>", never the served name (peft makes adapter names module
    # attributes, so a served name like "half", "train" or "to" would clash with nn.Module's own)


class SharedBase:
    """One base encoder with many peft adapters injected; one head per adapter."""

    device = torch.device("cpu")  # the server computes on CPU: the base is built there and stays

    def __init__(self, base: ModelConfig, seed: int, batch_size: int, amp: torch.dtype | None = None):
        self.model = None  # peft.PeftModel over lorafit's SequenceClassifier, built with the first adapter
        self.amp = amp  # autocast dtype of every forward pass (the server's --precision); None: float32
        self.base = base
        self.seed = seed
        self.batch_size = batch_size
        self.tokenizer = load_tokenizer(base)
        self.adapters: dict[str, _Adapter] = {}
        self.added = 0  # adapters ever added: numbers their names inside peft

    @property
    def heads(self) -> dict[str, nn.Linear]:
        return {name: adapter.head for name, adapter in self.adapters.items()}

    def add(self, name: str, plan: LoadPlan, config) -> None:
        """Inject the adapter `plan` names under `name`; `config` is its peft config, which the caller read."""
        from peft import PeftModel, set_peft_model_state_dict
        from safetensors.torch import load_file

        config.modules_to_save = None  # heads are kept here, one per adapter (label sets differ)
        config.inference_mode = True
        state = load_file(str(plan.weights / "adapter_model.safetensors"))
        head_state = {k.rsplit(".", 1)[-1]: v for k, v in state.items() if ".classifier." in f".{k}"}
        adapter_state = {k: v for k, v in state.items() if ".classifier." not in f".{k}"}
        if set(head_state) != {"weight", "bias"}:
            raise UserError(f"{plan.weights} has no classification head in adapter_model.safetensors; it was not written by lorafit")
        fresh = self.model is None
        key = f"adapter_{self.added}"
        self.added += 1
        if fresh:
            base = build_classifier(self.base, len(plan.labels), self.seed)
            self.model = PeftModel(base, config, adapter_name=key).eval()
        else:
            self.model.add_adapter(key, config)
        try:
            result = set_peft_model_state_dict(self.model, adapter_state, adapter_name=key)
            if getattr(result, "unexpected_keys", None):
                raise UserError(f"{plan.weights} does not fit its base model (unexpected keys {result.unexpected_keys[:3]})")
            head = nn.Linear(head_state["weight"].shape[1], head_state["weight"].shape[0])
            head.load_state_dict(head_state)
        except Exception as e:  # leave the base as it was: no half-added adapter
            if fresh:
                self.model = None
            else:
                self.model.delete_adapter(key)
            if isinstance(e, UserError):
                raise
            raise UserError(f"{plan.weights} does not fit its base model: {str(e).splitlines()[0][:200]}") from None
        self.adapters[name] = _Adapter(head.eval(), plan.cfg.data.max_length,
                                       token_budget(plan.cfg.train.max_batch_tokens, self.device), key)
        self.model.requires_grad_(False)
        self.model.eval()  # peft creates a new adapter's dropout modules in training mode

    @torch.inference_mode()
    def outputs(self, name: str, texts: list[str], tuned: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """Adapter `name`'s logits (N, C) and, if `tuned`, its sentence vectors (N, H) from the same pass."""
        head = self.adapters[name].head
        if not tuned:
            return self._run(name, texts, head), None
        both = self._run(name, texts, lambda features: torch.cat([features, head(features)], dim=-1))  # (N, H + C)
        classes = head.out_features
        return both[:, -classes:], both[:, :-classes]

    @torch.inference_mode()
    def vectors(self, name: str, which: str, texts: list[str]) -> np.ndarray:
        """Sentence vectors (N, H) of `texts` with adapter `name` on ("tuned") or every adapter off ("base":
        the pre-trained encoder, what base_knn reads)."""
        if which == "tuned":
            return self._run(name, texts, lambda features: features)
        with self.model.disable_adapter():
            return self._run(name, texts, lambda features: features, switch=False)

    def _run(self, name: str, texts: list[str], head: Callable[[torch.Tensor], torch.Tensor], switch: bool = True) -> np.ndarray:
        """`head` of the pooled sentence vectors of `texts`, tokenised and batched as adapter `name` was trained."""
        if switch:
            self.model.set_adapter(self.adapters[name].key)
        encoder = self.model.base_model.model  # lorafit's SequenceClassifier with the adapters injected
        adapter = self.adapters[name]

        def backend(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> np.ndarray:
            with autocast(self.device, self.amp):
                return head(encoder.features(input_ids, attention_mask)).float().numpy()

        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        token_ids = batching.tokenize(self.tokenizer, texts, adapter.max_length)
        return batched_logits(backend, token_ids, pad_id, self.batch_size, adapter.max_tokens)


class Registry:
    """Everything served, by name. Loading happens on the compute thread (`Batcher.run_on_compute_thread`).

    `summary` is what the health and adapters routes show, rebuilt on the thread that changed the
    registry and swapped in whole, so those routes never walk dicts or modules an adapter being
    added is changing.
    """

    def __init__(self, limits: Limits, root: Path | None = None, precision: str = "auto"):
        check_precision(precision)  # here too: a server of ONNX exports only never asks inference_autocast
        self.precision = precision  # of PyTorch models (`inference.inference_autocast`); ONNX graphs keep their own
        self.limits = limits
        self.root = root  # adapters added over HTTP live here, and may bring their base model only from here
        self.served: dict[str, Served] = {}
        self.bases: dict[tuple, SharedBase] = {}
        self.summary: dict = {"adapters": [], "shared_bases": 0, "weights_bytes": 0}

    def add(self, name: str, path: str | Path, threshold: float | None = None, trusted: bool = True) -> Served:
        """`trusted` is False for adapters added over HTTP: their folder may not enable pickle loading."""
        safe_name(name, "adapter name")
        if name in self.served:
            raise UserError(f"an adapter named {name!r} is already served")
        check_probability(threshold, f"threshold for {name!r}")
        plan = plan_load(path)
        if plan.cfg.model.trust_pickle and not trusted:
            raise UserError(f"{plan.folder} sets model.trust_pickle; adapters added at run time may not load pickles")
        if not trusted and plan.base is not None:
            self._check_base_allowed(plan.base.name)
        oos = recorded_decision(plan, threshold)  # probabilities shown and thresholded are the calibrated ones
        if not trusted and plan.base is None and "base" in oos.reads:  # an export whose score reads the pre-trained encoder
            self._check_base_allowed(pretrained_config(plan).name)
        if plan.is_adapter and (plan.weights / "adapter_model.safetensors").is_file():
            served = self._add_to_shared_base(name, plan)
            served.oos = oos
        else:
            classifier = load(plan, device="cpu", threshold=threshold, precision=self._precision(plan))
            served = Served(name, plan.labels, classifier.outputs, {"kind": plan.kind, "shared_base": False,
                                                                     "precision": classifier.precision},
                            model=classifier.model, file_bytes=plan.file_bytes, vectors=classifier.vectors,
                            oos=classifier.oos, pretrained=getattr(classifier.pretrained, "model", None))
        served.info.update(method=plan.cfg.method.name, base_model=(plan.base or plan.cfg.model).name, temperature=oos.temperature,
                           ood_score=oos.score, threshold_source=oos.source)
        if plan.kind == "run":  # a run folder builds on its base model (exports carry their own weights)
            served.base_path = resolve_model_path(plan.base.name)
        self.served[name] = served
        self.summary = {"adapters": self.describe(), "shared_bases": len(self.bases), "weights_bytes": self.weights_bytes()}
        log.info("serving %s: %s (%d labels) from %s", name, served.info["kind"], len(plan.labels), plan.folder)
        return served

    def _add_to_shared_base(self, name: str, plan: LoadPlan) -> Served:
        check_no_pickles(plan.weights, plan.cfg.model.trust_pickle)
        from peft import PeftConfig

        peft_config = PeftConfig.from_pretrained(str(plan.weights))
        # One base per precision too: under --precision auto a run trained in bf16 computes in bf16, one trained
        # in float32 in float32 (the numbers each one's temperature and threshold were fitted on).
        amp = inference_autocast(plan, SharedBase.device, self.precision)
        key = (resolve_model_path(plan.base.name), plan.base.pooling, str(peft_config.peft_type), amp)
        base = self.bases.get(key) or SharedBase(plan.base, plan.cfg.seed, self.limits.max_batch, amp)
        base.add(name, plan, peft_config)
        self.bases[key] = base  # only once it holds an adapter
        return Served(name, plan.labels, functools.partial(base.outputs, name),
                      {"kind": "adapter", "shared_base": True, "precision": precision_name(base.amp)},
                      vectors=functools.partial(base.vectors, name))

    def _precision(self, plan: LoadPlan) -> str:
        """The precision `plan` runs in here: the server's, but an ONNX graph's own."""
        return "auto" if plan.kind == "onnx" else self.precision

    def _check_base_allowed(self, name: str) -> None:
        """Over HTTP, an adapter's config may not make the server read or download any model it likes:
        only a built-in model, a base already held, or a model folder inside the adapter root."""
        path = resolve_model_path(name)  # a local folder comes back resolved (links followed)
        held = {key[0] for key in self.bases} | {s.base_path for s in self.served.values() if s.base_path is not None}
        inside = self.root is not None and Path(path).is_dir() and self.root in Path(path).parents
        if name not in ALIASES and path not in held and not inside:
            raise UserError(f"base model {name!r} is not allowed for an adapter added at run time: use a built-in model "
                            f"({', '.join(ALIASES)}), a base this server already holds, or a model folder inside "
                            f"the adapter root; or start the server with it")

    def weights_bytes(self) -> int:
        """Bytes of every weight held, each tensor counted once (adapters share their base)."""
        seen, total = set(), 0
        modules = [b.model for b in self.bases.values() if b.model is not None]
        modules += [h for b in self.bases.values() for h in b.heads.values()]
        modules += [m for s in self.served.values() for m in (s.model, s.pretrained) if m is not None]
        for module in modules:
            for tensor in [*module.parameters(), *module.buffers()]:
                key = tensor.untyped_storage().data_ptr()
                if key not in seen:
                    seen.add(key)
                    total += tensor.untyped_storage().nbytes()
        total += sum(s.file_bytes for s in self.served.values())
        return total

    def describe(self) -> list[dict]:
        return [{"name": s.name, "labels": s.labels, "num_labels": len(s.labels), "threshold": s.threshold, **s.info}
                for s in self.served.values()]


# -- micro-batching on the compute thread ------------------------------------------------------

class Unavailable(Exception):
    """The compute thread takes no more texts now (busy, or its loop stopped); the caller may retry."""


@dataclass
class _Pending:
    served: Served
    texts: list[str]
    future: asyncio.Future


class Batcher:
    """Collects concurrent requests for up to `max_wait_ms` (or `max_batch` texts), then runs them on
    the one compute thread, grouped by adapter. Adapters are added on that thread too, so never
    while a forward pass runs."""

    def __init__(self, limits: Limits, observe_batch: Callable[[int, int], None]):
        self.limits = limits
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorafit-compute")
        self.observe_batch = observe_batch  # (requests, texts) of each micro-batch, for the metrics
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self.queued = 0  # texts in the queue
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def run_on_compute_thread(self, fn: Callable, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def submit(self, served: Served, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Calibrated probabilities (N, C) and in-scope scores (N,) of `served` for `texts`, computed in a micro-batch."""
        # Bounded: while the compute thread is busy (a slow batch, an adapter being added), requests
        # beyond the limit are turned away at once instead of piling up memory and latency.
        if self.task is None or self.task.done():
            raise Unavailable("the batching loop is not running; see the server log")
        if self.queued + len(texts) > self.limits.max_queued:
            raise Unavailable(f"server busy: {self.queued} texts already waiting (limit {self.limits.max_queued}); "
                              "retry shortly")
        future = asyncio.get_running_loop().create_future()
        self.queued += len(texts)
        self.queue.put_nowait(_Pending(served, texts, future))
        return await future

    def _take(self, item: _Pending) -> _Pending:
        self.queued -= len(item.texts)
        return item

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = self._take(await self.queue.get())
            batch, count = [first], len(first.texts)
            deadline = loop.time() + self.limits.max_wait_ms / 1000
            while count < self.limits.max_batch:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    item = self._take(await asyncio.wait_for(self.queue.get(), timeout=remaining))
                except asyncio.TimeoutError:
                    break
                batch.append(item)
                count += len(item.texts)
            batch = [item for item in batch if not item.future.done()]  # drop callers that gave up (disconnected)
            if not batch:
                continue
            self.observe_batch(len(batch), sum(len(item.texts) for item in batch))
            try:
                results = await self.run_on_compute_thread(_compute, batch)
            except Exception as e:  # a bug, not bad input: every waiting request hears of it
                log.exception("batch failed")
                results = [e] * len(batch)
            for item, result in zip(batch, results):
                if item.future.done():
                    continue
                if isinstance(result, Exception):
                    item.future.set_exception(result)
                else:
                    item.future.set_result(result)


def _compute(batch: list[_Pending]) -> list[np.ndarray | Exception]:
    """On the compute thread: one forward pass per adapter over all its pending texts."""
    groups: dict[str, list[int]] = {}
    for i, item in enumerate(batch):
        groups.setdefault(item.served.name, []).append(i)
    results: list = [None] * len(batch)
    for indices in groups.values():
        served = batch[indices[0]].served
        texts = [t for i in indices for t in batch[i].texts]
        try:
            probs, scores = served.scores(texts)  # (N, C) calibrated (ood.json), (N,) in-scope scores
        except Exception as e:
            log.exception("adapter %s failed", served.name)
            for i in indices:
                results[i] = e
            continue
        start = 0
        for i in indices:
            results[i] = (probs[start : start + len(batch[i].texts)], scores[start : start + len(batch[i].texts)])
            start += len(batch[i].texts)
    return results
