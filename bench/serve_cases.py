"""Malformed and over-limit requests for `lorafit serve`: each must get a 4xx, never a 5xx.

Used by bench/serve_load.py against a live server and by tests/test_serve.py in process. The cases
assume the server's default limits (64 texts, 2,000 characters per text, 1 MB body) and a served
adapter named by `adapter`.
"""

from __future__ import annotations

import json


def malformed_cases(adapter: str) -> list[tuple[str, str, dict, bytes]]:
    """(what, path, headers, body) for POST requests."""
    as_json = {"content-type": "application/json"}

    def body(obj) -> bytes:
        return json.dumps(obj).encode()

    ok = {"texts": ["hello"], "adapter": adapter}
    return [
        ("empty body", "/v1/predict", as_json, b""),
        ("not JSON", "/v1/predict", as_json, b"{texts: hello"),
        ("truncated JSON", "/v1/predict", as_json, body(ok)[:-3]),
        ("JSON array", "/v1/predict", as_json, body(["hello"])),
        ("JSON string", "/v1/predict", as_json, body("hello")),
        ("JSON null", "/v1/predict", as_json, b"null"),
        ("no texts", "/v1/predict", as_json, body({"adapter": adapter})),
        ("texts is a string", "/v1/predict", as_json, body({"texts": "hello", "adapter": adapter})),
        ("texts holds a number", "/v1/predict", as_json, body({"texts": ["hi", 3], "adapter": adapter})),
        ("texts holds null", "/v1/predict", as_json, body({"texts": [None], "adapter": adapter})),
        ("texts holds a list", "/v1/predict", as_json, body({"texts": [["nested"]], "adapter": adapter})),
        ("empty texts", "/v1/predict", as_json, body({"texts": [], "adapter": adapter})),
        ("too many texts", "/v1/predict", as_json, body({"texts": ["hi"] * 65, "adapter": adapter})),
        ("text too long", "/v1/predict", as_json, body({"texts": ["a" * 2001], "adapter": adapter})),
        ("body too large", "/v1/predict", as_json, body({"texts": ["a" * 1500] * 700, "adapter": adapter})),
        ("top_k zero", "/v1/predict", as_json, body({**ok, "top_k": 0})),
        ("top_k negative", "/v1/predict", as_json, body({**ok, "top_k": -3})),
        ("top_k a string", "/v1/predict", as_json, body({**ok, "top_k": "3"})),
        ("top_k a float", "/v1/predict", as_json, body({**ok, "top_k": 2.5})),
        ("top_k true", "/v1/predict", as_json, body({**ok, "top_k": True})),
        ("top_k NaN", "/v1/predict", as_json, b'{"texts": ["hi"], "top_k": NaN}'),
        ("unknown adapter", "/v1/predict", as_json, body({"texts": ["hi"], "adapter": "nope"})),
        ("adapter a path", "/v1/predict", as_json, body({"texts": ["hi"], "adapter": "../../etc/passwd"})),
        ("adapter a number", "/v1/predict", as_json, body({"texts": ["hi"], "adapter": 7})),
        ("unknown field", "/v1/predict", as_json, body({**ok, "temperature": 0.5})),
        ("lone surrogate", "/v1/predict", as_json, b'{"texts": ["bad \\ud800 text"], "adapter": "' + adapter.encode() + b'"}'),
        ("invalid UTF-8", "/v1/predict", as_json, b'{"texts": ["\xff\xfe"], "adapter": "' + adapter.encode() + b'"}'),
        ("deep nesting", "/v1/predict", as_json, b"[" * 100_000 + b"]" * 100_000),
        ("bad content-length", "/v1/predict", {**as_json, "content-length": "-1"}, body(ok)),
        ("admin without key", "/v1/admin/adapters", as_json, body({"name": "x", "path": "."})),
    ]
