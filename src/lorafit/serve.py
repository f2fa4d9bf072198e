"""`lorafit serve`: the HTTP app over the serving registry (serving.py): many classifiers over one
base model in memory, micro-batched.

    POST /v1/predict         {"texts": [...], "top_k": 3, "adapter": "banking"}
    GET  /                   a page to type queries and see the top intents and the out-of-scope decision
    GET  /v1/health          liveness and what is loaded
    GET  /v1/adapters        names, label sets, out-of-scope scores and thresholds with their source
    GET  /metrics            Prometheus text: requests, latency histogram, batch sizes
    POST /v1/admin/adapters  {"name": ..., "path": ..., "threshold": ...}   (Bearer API key)

The request path, outside in:

    HTTP (uvicorn)
    -> BodyGuard         this file: refuses a body by its Content-Length before anything reads it,
                         answers an unhandled error with a one-line 500, counts every answer
    -> route             this file, `Server`: `read_json` (bounded body -> JSON -> request model),
                         `check_texts` (the limits), `choose` (which served classifier)
    -> batcher           serving.Batcher: waits at most `max_wait_ms` for others to share the batch,
                         then runs it on the one compute thread, grouped by adapter
    -> registry          serving.Registry: the named classifier (an adapter on a shared base, or a
                         model of its own) and its logits
    -> model             inference: tokenise, length-sorted batches under the token budget, backend
    and back: calibrated probabilities -> `inference.top_labels`; in-scope score (the run's ood.score:
    top probability, energy, knn, ..., `inference.OutOfScope`) -> threshold (out_of_scope) -> JSON.

Every request is checked against the limits before it is queued; bad input gets a 4xx with a
one-line reason (`RequestError`), never a 5xx, and a body refused before it was read is read to its
end before the connection closes (`BodyGuard`).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import socket
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Callable

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import UserError
from .inference import top_labels
from .rundir import safe_name
from .serving import Batcher, Limits, Registry, Served, Unavailable

__all__ = ["Limits", "BodyGuard", "create_app", "run", "parse_adapter_spec", "check_can_listen"]

log = logging.getLogger(__name__)

OUT_OF_SCOPE = "out_of_scope"
API_KEY_ENV = "LORAFIT_API_KEY"
#: The page `GET /` serves: it calls /v1/adapters and /v1/predict, nothing else.
PAGE = Path(__file__).parent / "static" / "index.html"
ROUTES = ("/", "/v1/predict", "/v1/health", "/v1/adapters", "/metrics", "/v1/admin/adapters")


# -- requests and their errors -----------------------------------------------------------------

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
    """Bad input, or no room now: answered with `status` and `{"error": message}`, one line."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


# -- the outermost layer -----------------------------------------------------------------------

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


class Metrics:
    """The app's Prometheus series, in a registry of its own (two apps in one process do not mix)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("lorafit_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=self.registry)
        self.latency = Histogram("lorafit_request_seconds", "Time to answer POST /v1/predict", ["adapter"],
                                 registry=self.registry, buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5))
        self.batch_texts = Histogram("lorafit_batch_texts", "Texts per micro-batch", registry=self.registry,
                                     buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.batch_requests = Histogram("lorafit_batch_requests", "Requests per micro-batch", registry=self.registry,
                                        buckets=(1, 2, 4, 8, 16, 32, 64))

    def count(self, path: str, status: int) -> None:
        """One answer (BodyGuard calls this for every one); paths that are no route count as "other"."""
        self.requests.labels(path if path in ROUTES else "other", str(status)).inc()

    def observe_batch(self, n_requests: int, n_texts: int) -> None:
        self.batch_requests.observe(n_requests)
        self.batch_texts.observe(n_texts)

    def text(self) -> str:
        return generate_latest(self.registry).decode()


# -- the route's pieces ------------------------------------------------------------------------

_JSON_TYPES = {list: "an array", str: "a string", type(None): "null", bool: "a boolean"}


async def read_json(request: Request, model: type[BaseModel], max_bytes: int) -> BaseModel:
    """The body as `model`, or a RequestError: over `max_bytes`, not JSON, not an object, not valid."""
    body = bytearray()
    async for chunk in request.stream():  # bounded even without a Content-Length header
        body += chunk
        if len(body) > max_bytes:
            raise RequestError(413, f"request body over {max_bytes} bytes")
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


def check_texts(texts: list[str], limits: Limits) -> None:
    """A RequestError unless there are 1..max_texts texts of at most max_chars valid Unicode each."""
    if not texts:
        raise RequestError(422, "texts: give at least one text")
    if len(texts) > limits.max_texts:
        raise RequestError(413, f"texts: {len(texts)} texts, over the limit of {limits.max_texts} per request")
    for i, text in enumerate(texts):
        if len(text) > limits.max_chars:
            raise RequestError(413, f"texts[{i}]: {len(text)} characters, over the limit of {limits.max_chars}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise RequestError(422, f"texts[{i}]: not valid Unicode (a lone surrogate)") from None


def choose(registry: Registry, name: str | None) -> Served:
    """The classifier a request names; the only one served where it names none."""
    if name is None:
        if len(registry.served) == 1:
            return next(iter(registry.served.values()))
        raise RequestError(422, f"adapter: name one of {', '.join(sorted(registry.served))}")
    if name not in registry.served:
        shown = name if len(name) <= 60 else name[:57] + "..."
        raise RequestError(404, f"adapter {shown!r} is not served; served: {', '.join(sorted(registry.served))}")
    return registry.served[name]


def answer(target: Served, top: list[tuple[str, float]], in_scope: float) -> dict:
    """One text's answer from its top labels and in-scope score: the first label, or out_of_scope where the
    score (of the adapter's ood_score: the top probability unless the run chose another) is under its threshold."""
    label, score = top[0]
    unsure = bool(target.oos.outside(np.array([in_scope]))[0])
    return {"label": OUT_OF_SCOPE if unsure else label, "score": score, "out_of_scope": unsure,
            "in_scope_score": float(in_scope), "top_k": [{"label": name, "score": p} for name, p in top]}


def check_api_key(request: Request, api_key: str | None) -> None:
    """Admin routes: off without a key; else `Authorization: Bearer <key>`, compared in constant time."""
    if api_key is None:
        raise RequestError(403, f"admin endpoints are disabled: start the server with --api-key or {API_KEY_ENV}")
    given = request.headers.get("authorization", "")
    token = given[7:] if given.lower().startswith("bearer ") else ""
    if not hmac.compare_digest(token.encode("utf-8", "surrogatepass"), api_key.encode("utf-8")):
        raise RequestError(401, "missing or wrong API key (send Authorization: Bearer <key>)")


# -- the app -----------------------------------------------------------------------------------

class Server:
    """What the routes share, and the routes themselves (`create_app` mounts them). Routes return
    plain dicts without a return annotation: FastAPI would take one as a response model."""

    def __init__(self, registry: Registry, limits: Limits, api_key: str | None, root: Path):
        self.registry = registry
        self.limits = limits
        self.api_key = api_key  # None: admin routes are off
        self.root = root  # adapters added over HTTP must lie inside it
        self.metrics = Metrics()
        self.batcher = Batcher(limits, self.metrics.observe_batch)

    @asynccontextmanager
    async def lifespan(self, app: FastAPI):
        self.batcher.start()
        yield
        await self.batcher.stop()

    async def predict(self, request: Request):
        """POST /v1/predict"""
        started = time.perf_counter()
        req = await read_json(request, PredictRequest, self.limits.max_body_bytes)
        check_texts(req.texts, self.limits)
        target = choose(self.registry, req.adapter)
        try:
            probs, in_scope = await self.batcher.submit(target, req.texts)  # (N, C), (N,)
        except Unavailable as e:
            raise RequestError(503, str(e)) from None
        predictions = [answer(target, top, score) for top, score in zip(top_labels(probs, target.labels, req.top_k), in_scope)]
        self.metrics.latency.labels(target.name).observe(time.perf_counter() - started)
        return {"adapter": target.name, "predictions": predictions}

    async def page(self):
        """GET /: a small page (static HTML and plain JS) to type queries and see the answers."""
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    async def health(self):
        """GET /v1/health"""
        summary = self.registry.summary
        return {"status": "ok", "adapters": len(summary["adapters"]), "shared_bases": summary["shared_bases"],
                "weights_bytes": summary["weights_bytes"], "weights_mb": round(summary["weights_bytes"] / 2**20, 1),
                "queued_texts": self.batcher.queued}

    async def list_adapters(self):
        """GET /v1/adapters"""
        return {"adapters": self.registry.summary["adapters"]}

    async def prometheus(self):
        """GET /metrics"""
        return PlainTextResponse(self.metrics.text(), media_type=CONTENT_TYPE_LATEST)

    async def add_adapter(self, request: Request):
        """POST /v1/admin/adapters"""
        check_api_key(request, self.api_key)
        req = await read_json(request, AdapterRequest, self.limits.max_body_bytes)
        path = (self.root / req.path).resolve()
        if self.root != path and self.root not in path.parents:
            raise RequestError(403, f"path must lie inside the adapter root {self.root}")
        if req.name in self.registry.served:
            raise RequestError(409, f"an adapter named {req.name!r} is already served")
        if not path.is_dir():
            raise RequestError(404, f"no folder at {req.path} (inside the adapter root)")
        try:  # on the compute thread: never while a forward pass runs
            added = await self.batcher.run_on_compute_thread(self.registry.add, req.name, path, req.threshold, False)
        except UserError as e:
            raise RequestError(422, str(e)) from None
        return {"added": added.name, "num_labels": len(added.labels), **added.info}


async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
    response = _error_body(exc.status, exc.message)
    if exc.status == 503:
        response.headers["Retry-After"] = "1"
    return response


def create_app(adapters: list[tuple[str, str, float | None]], limits: Limits | None = None,
               api_key: str | None = None, adapter_root: str | Path | None = None, threads: int | None = None,
               precision: str = "auto") -> FastAPI:
    """The FastAPI app. `adapters`: (name, path, threshold); loaded before the app is returned. `precision`:
    of every PyTorch model served (`lorafit.load`'s; ONNX exports run in their own)."""
    limits = limits or Limits()
    api_key = api_key or os.environ.get(API_KEY_ENV) or None  # an empty key is no key: admin stays off
    root = Path(adapter_root or os.getcwd()).resolve()
    if threads:
        torch.set_num_threads(threads)
    registry = Registry(limits, root, precision)
    for name, path, threshold in adapters:
        registry.add(name, path, threshold)
    if not registry.served:
        raise UserError("give at least one run folder or export to serve")

    server = Server(registry, limits, api_key, root)
    app = FastAPI(title="lorafit", lifespan=server.lifespan)
    app.state.registry, app.state.batcher = registry, server.batcher
    app.add_middleware(BodyGuard, max_body_bytes=limits.max_body_bytes, count=server.metrics.count)
    app.add_exception_handler(RequestError, _request_error)
    app.add_api_route("/", server.page, methods=["GET"])
    app.add_api_route("/v1/predict", server.predict, methods=["POST"])
    app.add_api_route("/v1/health", server.health, methods=["GET"])
    app.add_api_route("/v1/adapters", server.list_adapters, methods=["GET"])
    app.add_api_route("/metrics", server.prometheus, methods=["GET"])
    app.add_api_route("/v1/admin/adapters", server.add_adapter, methods=["POST"])
    return app


def parse_adapter_spec(spec: str) -> tuple[str, str]:
    """`name=path` or a bare path (named after its folder)."""
    if "=" in spec and not Path(spec).exists():
        name, path = spec.split("=", 1)
    else:
        path = spec
        name = Path(spec.rstrip("/\\")).name or "default"
    return safe_name(name, "adapter name"), path


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
