"""`lorafit serve`: many classifiers over one base model in memory, micro-batched, over HTTP.

    POST /v1/predict         {"texts": [...], "top_k": 3, "adapter": "banking"}
    GET  /v1/health          liveness and what is loaded
    GET  /v1/adapters        names, label sets, thresholds
    GET  /metrics            Prometheus text: requests, latency histogram, batch sizes
    POST /v1/admin/adapters  {"name": ..., "path": ..., "threshold": ...}   (Bearer API key)

How adapters share a base: all adapters with the same base checkpoint, pooling and peft type are
injected into *one* copy of the base encoder as named peft adapters; each keeps its own
classification head (label sets differ). A forward pass activates one adapter, so the single
compute thread takes micro-batches, groups them by adapter and runs each group. Run folders
without an adapter (full fine-tuning) and merged/ONNX exports are served as standalone models.

Requests wait at most `max_wait_ms` for others to share their batch. Every request is checked
against the limits before it is queued; bad input gets a 4xx with a one-line reason, never a 5xx,
and a body refused before it was read is read to its end before the connection closes (`BodyGuard`).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Callable

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from . import data
from .errors import UserError
from .evaluate import softmax
from .inference import base_model_config, batched_logits, check_no_pickles, load
from . import methods
from .models import ALIASES, build_classifier, load_tokenizer, resolve_model_path
from .rundir import RunDir, safe_name
from .runtime import token_budget

__all__ = ["Limits", "Registry", "BodyGuard", "create_app", "run", "parse_adapter_spec", "check_can_listen"]

log = logging.getLogger(__name__)

OUT_OF_SCOPE = "out_of_scope"
API_KEY_ENV = "LORAFIT_API_KEY"


@dataclass(frozen=True)
class Limits:
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
    """One named classifier: its labels, an optional confidence threshold and how to get logits."""

    name: str
    labels: list[str]
    threshold: float | None
    logits: Callable[[list[str]], np.ndarray]  # runs on the compute thread only
    info: dict = field(default_factory=dict)


class SharedBase:
    """One base encoder with many peft adapters injected; one head per adapter."""

    def __init__(self, cfg, tokenizer):
        self.model = None  # peft.PeftModel over lorafit's SequenceClassifier, built with the first adapter
        self.cfg_model = cfg.model
        self.seed = cfg.seed
        self.tokenizer = tokenizer
        self.heads: dict[str, nn.Linear] = {}

    def add(self, name: str, adapter_dir: Path, config, num_labels: int) -> None:
        """Inject the adapter saved in `adapter_dir` (whose peft `config` the caller read) under `name`."""
        from peft import PeftModel, set_peft_model_state_dict
        from safetensors.torch import load_file

        config.modules_to_save = None  # heads are kept here, one per adapter (label sets differ)
        config.inference_mode = True
        state = load_file(str(adapter_dir / "adapter_model.safetensors"))
        head_state = {k.rsplit(".", 1)[-1]: v for k, v in state.items() if ".classifier." in f".{k}"}
        adapter_state = {k: v for k, v in state.items() if ".classifier." not in f".{k}"}
        if set(head_state) != {"weight", "bias"}:
            raise UserError(f"{adapter_dir} has no classification head in adapter_model.safetensors; it was not written by lorafit")
        fresh = self.model is None
        if fresh:
            base = build_classifier(self.cfg_model, num_labels, self.seed)
            self.model = PeftModel(base, config, adapter_name=name).eval()
        else:
            self.model.add_adapter(name, config)
        try:
            result = set_peft_model_state_dict(self.model, adapter_state, adapter_name=name)
            if getattr(result, "unexpected_keys", None):
                raise UserError(f"{adapter_dir} does not fit its base model (unexpected keys {result.unexpected_keys[:3]})")
            head = nn.Linear(head_state["weight"].shape[1], head_state["weight"].shape[0])
            head.load_state_dict(head_state)
        except Exception as e:  # leave the base as it was: no half-added adapter
            if fresh:
                self.model = None
            else:
                self.model.delete_adapter(name)
            if isinstance(e, UserError):
                raise
            raise UserError(f"{adapter_dir} does not fit its base model: {str(e).splitlines()[0][:200]}") from None
        self.heads[name] = head.eval()
        self.model.requires_grad_(False)
        self.model.eval()  # peft creates a new adapter's dropout modules in training mode

    @torch.inference_mode()
    def logits(self, name: str, texts: list[str], max_length: int, batch_size: int, max_tokens: int | None) -> np.ndarray:
        self.model.set_adapter(name)
        encoder = self.model.base_model.model  # lorafit's SequenceClassifier with the adapters injected
        head = self.heads[name]

        def backend(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> np.ndarray:
            return head(encoder.features(input_ids, attention_mask)).float().numpy()  # (B, C)

        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        return batched_logits(backend, data.tokenize(self.tokenizer, texts, max_length), pad_id, batch_size, max_tokens)


class Registry:
    """Everything served, by name. Loading happens on the compute thread (see `create_app`).

    `summary` is what the health and adapters routes show, rebuilt on the thread that changed the
    registry and swapped in whole, so those routes never walk dicts or modules an adapter being
    added is changing.
    """

    def __init__(self, limits: Limits, root: Path | None = None):
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
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise UserError(f"threshold for {name!r} must be a probability in [0, 1], got {threshold}")
        folder = RunDir(path)
        meta = folder.read_json("export.json") if (folder.path / "export.json").is_file() else None
        cfg, labels = folder.config(), folder.labels()
        if cfg.model.trust_pickle and not trusted:
            raise UserError(f"{folder.path} sets model.trust_pickle; adapters added at run time may not load pickles")
        method = methods.build(cfg.method)
        adapter_dir = None
        if meta is None and method.artifact == "adapter":
            adapter_dir = folder.artifact("adapter")
        elif meta is not None and meta.get("format") == "adapter":
            adapter_dir = folder.path
        if adapter_dir is not None:  # a run copied from another machine builds on the hub id its adapter records
            cfg = cfg.model_copy(update={"model": base_model_config(cfg.model, adapter_dir)})
        if not trusted and (meta is None or meta.get("format") == "adapter"):
            self._check_base_allowed(cfg.model.name)
        if adapter_dir is not None and (adapter_dir / "adapter_model.safetensors").is_file():
            check_no_pickles(adapter_dir, cfg.model.trust_pickle)
            from peft import PeftConfig

            peft_config = PeftConfig.from_pretrained(str(adapter_dir))
            key = (resolve_model_path(cfg.model.name), cfg.model.pooling, str(peft_config.peft_type))
            base = self.bases.get(key) or SharedBase(cfg, load_tokenizer(cfg.model))
            base.add(name, adapter_dir, peft_config, len(labels))
            self.bases[key] = base  # only once it holds an adapter
            max_length, batch_size = cfg.data.max_length, self.limits.max_batch
            max_tokens = token_budget(cfg.train.max_batch_tokens, torch.device("cpu"))  # the server computes on CPU
            logits = lambda texts, base=base, name=name: base.logits(name, texts, max_length, batch_size, max_tokens)  # noqa: E731
            info = {"kind": "adapter", "shared_base": True}
        else:
            classifier = load(folder.path, device="cpu")
            logits = classifier.logits
            info = {"kind": meta["format"] if meta else "run", "shared_base": False, "_model": classifier.model}
            if classifier.model is None and (folder.path / "model.onnx").is_file():
                info["_file_bytes"] = (folder.path / "model.onnx").stat().st_size
        info.update(method=cfg.method.name, base_model=cfg.model.name)
        if meta is None:  # a run folder builds on its base model (exports carry their own weights)
            info["_base_path"] = resolve_model_path(cfg.model.name)
        served = Served(name, labels, threshold, logits, info)
        self.served[name] = served
        self.summary = {"adapters": self.describe(), "shared_bases": len(self.bases), "weights_bytes": self.weights_bytes()}
        log.info("serving %s: %s (%d labels) from %s", name, info["kind"], len(labels), folder.path)
        return served

    def _check_base_allowed(self, name: str) -> None:
        """Over HTTP, an adapter's config may not make the server read or download any model it likes:
        only a built-in model, a base already held, or a model folder inside the adapter root."""
        path = resolve_model_path(name)  # a local folder comes back resolved (links followed)
        held = {key[0] for key in self.bases} | {s.info["_base_path"] for s in self.served.values() if "_base_path" in s.info}
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
        modules += [s.info["_model"] for s in self.served.values() if s.info.get("_model") is not None]
        for module in modules:
            for tensor in [*module.parameters(), *module.buffers()]:
                key = tensor.untyped_storage().data_ptr()
                if key not in seen:
                    seen.add(key)
                    total += tensor.untyped_storage().nbytes()
        total += sum(s.info.get("_file_bytes", 0) for s in self.served.values())
        return total

    def describe(self) -> list[dict]:
        return [{"name": s.name, "labels": s.labels, "num_labels": len(s.labels), "threshold": s.threshold,
                 **{k: v for k, v in s.info.items() if not k.startswith("_")}} for s in self.served.values()]


def parse_adapter_spec(spec: str) -> tuple[str, str]:
    """`name=path` or a bare path (named after its folder)."""
    if "=" in spec and not Path(spec).exists():
        name, path = spec.split("=", 1)
    else:
        path = spec
        name = Path(spec.rstrip("/\\")).name or "default"
    return safe_name(name, "adapter name"), path


# -- requests and micro-batching ---------------------------------------------------------------

class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    texts: list[str]
    top_k: Annotated[int, Field(ge=1)] = 3
    adapter: str | None = None


class AdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
    path: Annotated[str, Field(min_length=1, max_length=4096)]
    threshold: Annotated[float, Field(ge=0.0, le=1.0)] | None = None


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class _Pending:
    served: Served
    texts: list[str]
    future: asyncio.Future


class Batcher:
    """Collects concurrent requests for up to `max_wait_ms` (or `max_batch` texts), then runs them on
    the one compute thread, grouped by adapter."""

    def __init__(self, limits: Limits, executor: ThreadPoolExecutor, observe_batch: Callable[[int, int], None]):
        self.limits = limits
        self.executor = executor
        self.observe_batch = observe_batch
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

    async def submit(self, served: Served, texts: list[str]) -> np.ndarray:
        # Bounded: while the compute thread is busy (a slow batch, an adapter being added), requests
        # beyond the limit are turned away at once instead of piling up memory and latency.
        if self.task is None or self.task.done():
            raise RequestError(503, "the batching loop is not running; see the server log")
        if self.queued + len(texts) > self.limits.max_queued:
            raise RequestError(503, f"server busy: {self.queued} texts already waiting (limit {self.limits.max_queued}); "
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
                results = await loop.run_in_executor(self.executor, _compute, batch)
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
            probs = softmax(served.logits(texts))  # (N, C)
        except Exception as e:
            log.exception("adapter %s failed", served.name)
            for i in indices:
                results[i] = e
            continue
        start = 0
        for i in indices:
            results[i] = probs[start : start + len(batch[i].texts)]
            start += len(batch[i].texts)
    return results


# -- the app -----------------------------------------------------------------------------------

DRAIN_BYTES = 64 * 2**20
"""At most this much of a request body the answer did not need is read (and dropped) before closing."""
DRAIN_SECONDS = 30.0
"""...and for at most this long."""


def _error_body(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class BodyGuard:
    """The outermost layer (plain ASGI): refuses a body by its Content-Length before anything reads it,
    turns an unhandled error into a one-line 500, counts every answer, and reads what is left of a
    request body the answer did not need before completing the answer.

    Why the last: a server that closes a socket with unread bytes in it sends a reset (RST), and a
    client still sending its body then loses the answer sitting in its buffer (ConnectionResetError,
    BrokenPipeError instead of the 413). So such an answer is sent at once with `connection: close`,
    the rest of the body is read and dropped (at most DRAIN_BYTES, for at most DRAIN_SECONDS), and
    only then is the answer completed and the connection closed cleanly.
    """

    def __init__(self, app, max_body_bytes: int, count: Callable[[str, int], None]):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.count = count

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        length = headers.get("content-length")
        body_done = length in (None, "0") and "transfer-encoding" not in headers  # nothing to read
        started, status = False, 500

        async def tracked_receive():
            nonlocal body_done
            message = await receive()
            if message["type"] == "http.disconnect" or not message.get("more_body", False):
                body_done = True
            return message

        async def guarded_send(message):
            nonlocal started, status
            if message["type"] == "http.response.start":
                started, status = True, message["status"]
                if not body_done and not any(k.lower() == b"connection" for k, _ in message.get("headers", [])):
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            elif message["type"] == "http.response.body" and not message.get("more_body", False) and not body_done:
                await send({**message, "more_body": True})  # the whole answer is on its way to the client
                await self._drain(tracked_receive)
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        refusal = None
        if length is not None and not length.isdigit():
            refusal = _error_body(400, f"bad Content-Length header {length[:20]!r}")
        elif length is not None and int(length) > self.max_body_bytes:
            refusal = _error_body(413, f"request body over {self.max_body_bytes} bytes")
        if refusal is not None:
            await refusal(scope, tracked_receive, guarded_send)
        else:
            try:
                await self.app(scope, tracked_receive, guarded_send)
            except Exception:  # never a traceback to the client
                log.exception("unhandled error on %s", scope.get("path"))
                if started:
                    raise
                await _error_body(500, "internal error; see the server log")(scope, tracked_receive, guarded_send)
        self.count(scope.get("path", ""), status)

    async def _drain(self, receive) -> None:
        async def read_rest():
            drained = 0
            while drained <= DRAIN_BYTES:
                message = await receive()
                if message["type"] == "http.disconnect" or not message.get("more_body", False):
                    return
                drained += len(message.get("body", b""))
            log.info("stopped reading a refused request body after %d bytes", drained)

        try:
            await asyncio.wait_for(read_rest(), DRAIN_SECONDS)
        except asyncio.TimeoutError:
            log.info("stopped reading a refused request body after %.0f s", DRAIN_SECONDS)


def create_app(adapters: list[tuple[str, str, float | None]], limits: Limits | None = None,
               api_key: str | None = None, adapter_root: str | Path | None = None, threads: int | None = None):
    """The FastAPI app. `adapters`: (name, path, threshold); loaded before the app is returned."""
    limits = limits or Limits()
    api_key = api_key or os.environ.get(API_KEY_ENV) or None  # an empty key is no key: admin stays off
    root = Path(adapter_root or os.getcwd()).resolve()
    if threads:
        torch.set_num_threads(threads)
    served = Registry(limits, root)
    for name, path, threshold in adapters:
        served.add(name, path, threshold)
    if not served.served:
        raise UserError("give at least one run folder or export to serve")

    metrics = CollectorRegistry()
    requests_total = Counter("lorafit_requests", "HTTP requests by route and status", ["route", "status"], registry=metrics)
    latency = Histogram("lorafit_request_seconds", "Time to answer POST /v1/predict", ["adapter"], registry=metrics,
                        buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5))
    batch_texts = Histogram("lorafit_batch_texts", "Texts per micro-batch", registry=metrics,
                            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
    batch_requests = Histogram("lorafit_batch_requests", "Requests per micro-batch", registry=metrics,
                               buckets=(1, 2, 4, 8, 16, 32, 64))

    def observe_batch(n_requests: int, n_texts: int) -> None:
        batch_requests.observe(n_requests)
        batch_texts.observe(n_texts)

    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorafit-compute")
    batcher = Batcher(limits, executor, observe_batch)

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await batcher.stop()
        executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="lorafit", lifespan=lifespan)
    routes = {"/v1/predict", "/v1/health", "/v1/adapters", "/metrics", "/v1/admin/adapters"}
    app.state.registry = served
    app.state.batcher = batcher

    def count(path: str, status: int) -> None:
        requests_total.labels(path if path in routes else "other", str(status)).inc()

    app.add_middleware(BodyGuard, max_body_bytes=limits.max_body_bytes, count=count)

    async def read_json(request: Request, model: type[BaseModel]) -> BaseModel:
        body = bytearray()
        async for chunk in request.stream():  # bounded even without a Content-Length header
            body += chunk
            if len(body) > limits.max_body_bytes:
                raise RequestError(413, f"request body over {limits.max_body_bytes} bytes")
        try:
            raw = json.loads(body)
        except (ValueError, RecursionError) as e:
            raise RequestError(400, f"body is not valid JSON: {str(e)[:120]}") from None
        if not isinstance(raw, dict):
            raise RequestError(422, f"body must be a JSON object, got {_JSON_TYPES.get(type(raw), 'a number')}")
        try:
            return model.model_validate(raw)
        except ValidationError as e:
            first = e.errors()[0]
            where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"]).lstrip(".") or "body"
            raise RequestError(422, f"{where}: {first['msg']}") from None

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError):
        response = _error_body(exc.status, exc.message)
        if exc.status == 503:
            response.headers["Retry-After"] = "1"
        return response

    @app.post("/v1/predict")
    async def predict(request: Request):
        started = time.perf_counter()
        req = await read_json(request, PredictRequest)
        if not req.texts:
            raise RequestError(422, "texts: give at least one text")
        if len(req.texts) > limits.max_texts:
            raise RequestError(413, f"texts: {len(req.texts)} texts, over the limit of {limits.max_texts} per request")
        for i, text in enumerate(req.texts):
            if len(text) > limits.max_chars:
                raise RequestError(413, f"texts[{i}]: {len(text)} characters, over the limit of {limits.max_chars}")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise RequestError(422, f"texts[{i}]: not valid Unicode (a lone surrogate)") from None
        target = _choose(served, req.adapter)
        probs = await batcher.submit(target, req.texts)
        k = min(req.top_k, len(target.labels))
        predictions = []
        for row in probs:
            order = np.argsort(-row, kind="stable")[:k]
            top = [{"label": target.labels[j], "score": float(row[j])} for j in order]
            unsure = target.threshold is not None and top[0]["score"] < target.threshold
            predictions.append({"label": OUT_OF_SCOPE if unsure else top[0]["label"], "score": top[0]["score"],
                                "out_of_scope": unsure, "top_k": top})
        latency.labels(target.name).observe(time.perf_counter() - started)
        return {"adapter": target.name, "predictions": predictions}

    @app.get("/v1/health")
    async def health():
        summary = served.summary
        return {"status": "ok", "adapters": len(summary["adapters"]), "shared_bases": summary["shared_bases"],
                "weights_bytes": summary["weights_bytes"], "weights_mb": round(summary["weights_bytes"] / 2**20, 1),
                "queued_texts": batcher.queued}

    @app.get("/v1/adapters")
    async def list_adapters():
        return {"adapters": served.summary["adapters"]}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(generate_latest(metrics).decode(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/admin/adapters")
    async def add_adapter(request: Request):
        if api_key is None:
            raise RequestError(403, f"admin endpoints are disabled: start the server with --api-key or {API_KEY_ENV}")
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode("utf-8", "surrogatepass"), api_key.encode("utf-8")):
            raise RequestError(401, "missing or wrong API key (send Authorization: Bearer <key>)")
        req = await read_json(request, AdapterRequest)
        path = (root / req.path).resolve()
        if root != path and root not in path.parents:
            raise RequestError(403, f"path must lie inside the adapter root {root}")
        if req.name in served.served:
            raise RequestError(409, f"an adapter named {req.name!r} is already served")
        if not path.is_dir():
            raise RequestError(404, f"no folder at {req.path} (inside the adapter root)")
        loop = asyncio.get_running_loop()
        try:  # on the compute thread: never while a forward pass runs
            added = await loop.run_in_executor(executor, served.add, req.name, path, req.threshold, False)
        except UserError as e:
            raise RequestError(422, str(e)) from None
        return {"added": added.name, "num_labels": len(added.labels), **{k: v for k, v in added.info.items() if not k.startswith("_")}}

    return app


_JSON_TYPES = {list: "an array", str: "a string", type(None): "null", bool: "a boolean"}


def _choose(served: Registry, name: str | None) -> Served:
    if name is None:
        if len(served.served) == 1:
            return next(iter(served.served.values()))
        raise RequestError(422, f"adapter: name one of {', '.join(sorted(served.served))}")
    if name not in served.served:
        shown = name if len(name) <= 60 else name[:57] + "..."
        raise RequestError(404, f"adapter {shown!r} is not served; served: {', '.join(sorted(served.served))}")
    return served.served[name]


def check_can_listen(host: str, port: int) -> None:
    """A one-line error now, rather than uvicorn's after every model has loaded."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(infos[0][4])
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def run(app, host: str, port: int) -> None:
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
