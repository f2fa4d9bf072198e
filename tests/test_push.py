"""`lorafit push`: a run folder or export with its card to a hub, through huggingface_hub's own client,
against a small hub on 127.0.0.1 that implements the endpoints the client calls (issue 20)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import lorafit
from lorafit.cli import main
from lorafit.modelcard import render

from conftest import tiny_overrides, write_dataset

TOKEN = "hf_test_write_token"


class LocalHub:
    """The hub's API as far as HfApi.whoami / create_repo / upload_folder use it: files are kept in
    memory per repository. `refuse` maps an endpoint name to the HTTP status it answers with."""

    def __init__(self):
        self.repos: dict[str, dict] = {}
        self.requests: list[tuple[str, str]] = []
        self.refuse: dict[str, int] = {}
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("content-length") or 0))

            def _route(self, method: str) -> None:
                body = self._body() if method == "POST" else b""
                path = self.path.split("?")[0]
                parts = path.strip("/").split("/")
                name = ("whoami" if path == "/api/whoami-v2" else "create" if path == "/api/repos/create"
                        else "validate-yaml" if path == "/api/validate-yaml"
                        else parts[4] if len(parts) >= 6 and parts[:2] == ["api", "models"] else "other")
                hub.requests.append((method, name))
                if self.headers.get("authorization") != f"Bearer {TOKEN}":
                    return self._answer(401, {"error": "Invalid credentials in Authorization header"})
                if name in hub.refuse:
                    return self._answer(hub.refuse[name], {"error": f"refused by the test hub ({name})"})
                if name == "whoami":
                    return self._answer(200, {"type": "user", "name": "tester", "auth": {"accessToken": {"role": "write"}}})
                if name == "create":
                    request = json.loads(body)
                    repo_id = f"{request['organization']}/{request['name']}"
                    if repo_id in hub.repos:
                        return self._answer(409, {"error": "You already created this model repo",
                                                  "url": f"http://{self.headers['host']}/{repo_id}"})
                    hub.repos[repo_id] = {"create": request, "files": {}, "commits": []}
                    return self._answer(200, {"url": f"http://{self.headers['host']}/{repo_id}"})
                if name == "validate-yaml":
                    return self._answer(200, {"errors": [], "warnings": []})
                repo_id = "/".join(parts[2:4])
                if repo_id not in hub.repos:
                    return self._answer(404, {"error": "Repository not found"})
                if name == "preupload":
                    files = json.loads(body)["files"]
                    return self._answer(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                        for f in files], "commitOid": "0" * 40})
                if name == "commit":
                    lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                    repo = hub.repos[repo_id]
                    repo["commits"].append(lines[0]["value"]["summary"])
                    for line in lines[1:]:
                        assert line["key"] == "file", line  # regular files only: preupload said so
                        repo["files"][line["value"]["path"]] = base64.b64decode(line["value"]["content"])
                    return self._answer(200, {"commitUrl": f"http://{self.headers['host']}/{repo_id}/commit/{'a' * 40}",
                                              "commitOid": "a" * 40, "pullRequestUrl": None})
                return self._answer(404, {"error": f"not implemented by the test hub: {method} {path}"})

            def do_GET(self):
                self._route("GET")

            def do_POST(self):
                self._route("POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hub(monkeypatch, tmp_path):
    with LocalHub() as local:
        monkeypatch.setenv("HF_ENDPOINT", local.url)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no saved login of the machine's
        monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        # The local hub is the network here. conftest sets HF_HUB_OFFLINE before huggingface_hub is
        # imported, which reads it once at import: this is that setting as an unset variable leaves it.
        import huggingface_hub.constants

        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        yield local


@pytest.fixture(scope="module")
def run(tiny_bert, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("push")
    out = root / "run"
    lorafit.train(lorafit.load_config(None, tiny_overrides(tiny_bert, write_dataset(root / "data"), **{"train.epochs": 1})), out)
    return out


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_push_uploads_the_run_with_its_card_and_skips_checkpoints(run, hub, tmp_path, capsys):
    folder = tmp_path / "run"
    import shutil

    shutil.copytree(run, folder)
    (folder / "checkpoints" / "step-00000010").mkdir(parents=True)
    (folder / "checkpoints" / "step-00000010" / "state.safetensors").write_bytes(b"resume state")
    assert main(["push", str(folder), "--repo-id", "acme/tiny-topics", "--private"]) == 0
    out = capsys.readouterr().out
    assert "acme/tiny-topics" in out and "commit" in out
    repo = hub.repos["acme/tiny-topics"]
    assert repo["create"]["visibility"] == "private" and repo["create"]["type"] == "model"
    local = _files(folder)
    expected = {k: v for k, v in local.items() if not k.startswith("checkpoints/")}
    # Byte for byte, but the card, which is rendered for the repository (it says where the model lives).
    assert repo["files"]["README.md"].decode() == render(folder, "acme/tiny-topics")
    assert 'snapshot_download("acme/tiny-topics")' in repo["files"]["README.md"].decode()
    assert {**repo["files"], "README.md": expected["README.md"]} == expected
    assert {"README.md", "config.yaml", "eval.json", "adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= set(expected)
    assert _files(folder) == local  # the folder itself is left as it was
    assert ("POST", "whoami") not in hub.requests and ("GET", "whoami") in hub.requests

    # Pushing again updates the same repository (it exists: create answers 409, which is fine).
    assert main(["push", str(folder), "--repo-id", "acme/tiny-topics"]) == 0
    assert len(repo["commits"]) == 2


def test_push_an_export(run, hub, tmp_path):
    from lorafit.export import export

    merged = tmp_path / "merged"
    export(run, "merged", merged)
    assert main(["push", str(merged), "--repo-id", "acme/tiny-merged", "--token", TOKEN]) == 0
    files = hub.repos["acme/tiny-merged"]["files"]
    assert {**files, "README.md": b""} == {**_files(merged), "README.md": b""}
    assert files["README.md"].decode() == render(merged, "acme/tiny-merged")
    assert {"README.md", "model.safetensors", "modeling_lorafit.py", "export.json"} <= set(files)


def _refused(args: list[str], capsys, message: str) -> None:
    assert main(["push", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_push_refuses_pickles_and_links_out_before_sending_anything(run, hub, tmp_path, capsys):
    import shutil

    folder = tmp_path / "run"
    shutil.copytree(run, folder)
    (folder / "adapter" / "extra.bin").write_bytes(b"pickle")
    _refused([str(folder), "--repo-id", "acme/x"], capsys, "adapter/extra.bin is a pickle file")
    (folder / "adapter" / "extra.bin").unlink()
    (folder / "notes.PKL").write_bytes(b"pickle")
    _refused([str(folder), "--repo-id", "acme/x"], capsys, "notes.PKL is a pickle file")
    (folder / "notes.PKL").unlink()
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the hub")
    (folder / "link.txt").symlink_to(secret)
    _refused([str(folder), "--repo-id", "acme/x"], capsys, "link.txt links outside the folder")
    (folder / "link.txt").unlink()
    (folder / "linked").symlink_to(tmp_path, target_is_directory=True)
    _refused([str(folder), "--repo-id", "acme/x"], capsys, "linked links outside the folder")
    assert hub.requests == []  # refused before any request


def test_push_bad_input_is_one_line_and_exit_2(run, hub, tmp_path, capsys, monkeypatch):
    _refused([str(tmp_path / "nope"), "--repo-id", "acme/x"], capsys, "run folder not found")
    for bad in ("no-namespace", "a/b/c", "acme/bad name", "acme/x--y", "acme/.x", ""):
        _refused([str(run), "--repo-id", bad], capsys, f"--repo-id {bad!r}: write ORG/NAME")
    assert hub.requests == []
    monkeypatch.delenv("HF_TOKEN")
    _refused([str(run), "--repo-id", "acme/x"], capsys, "no token: set HF_TOKEN or pass --token")
    _refused([str(run), "--repo-id", "acme/x", "--token", "wrong"], capsys, "HTTP 401")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    for endpoint, status in (("create", 403), ("create", 500), ("commit", 403)):
        hub.refuse = {endpoint: status}
        _refused([str(run), "--repo-id", f"acme/refused-{endpoint}-{status}"], capsys, f"HTTP {status}")
    hub.refuse = {}
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    _refused([str(run), "--repo-id", "acme/x"], capsys, "cannot reach")


def test_push_cli_in_a_fresh_process_honours_hf_endpoint(run, tmp_path):
    """HF_ENDPOINT as huggingface_hub reads it (at import) in a real `lorafit push`."""
    with LocalHub() as hub:
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HOME": str(tmp_path / "hf"),
               "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
        env.pop("HF_HUB_OFFLINE", None)
        result = subprocess.run([sys.executable, "-m", "lorafit", "push", str(run), "--repo-id", "acme/fresh"],
                                env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        assert set(hub.repos["acme/fresh"]["files"]) == set(_files(run))
