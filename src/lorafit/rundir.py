"""What a run folder holds, and the reading and writing of every artifact in it.

A run folder is the hand-off between stages: `eval`, `predict` (and later `report`, `export`,
`serve`) take only its path. Files:

    config.yaml     the resolved config (plus the derived schedule)
    labels.json     the label space, in class-index order
    splits.json     which source rows went into train / validation / test
    metrics.jsonl   one JSON object per logged step and per epoch
    eval.json       test metrics of the best checkpoint
    predictions.json  per test example: target, predicted class index, top-1 probability
    summary.json    efficiency figures, best epoch, device, versions
    adapter/        peft-format adapter (adapter methods) -- or --
    model/          the fine-tuned encoder + head (full fine-tuning)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from . import atomic
from .config import Config, dump, validate
from .errors import UserError

__all__ = ["RunDir", "folder_bytes", "make_folder", "safe_name"]

# A name must stay one path component: no separator (either OS's), no NUL or control characters,
# and ':' is out because on Windows "C:x" is a drive-relative path.
_NOT_IN_NAMES = {"/": "a '/'", "\\": "a '\\'", ":": "a ':'", "\x00": "a NUL byte"}


def safe_name(name: str, what: str) -> str:
    """`name` unchanged if it is a plain file name that stays inside its folder; else a UserError.

    For every place that takes a NAME (an adapter name, an artifact) rather than a path: `..`,
    absolute paths and separators would let it escape the folder it is joined to.
    """
    if not isinstance(name, str) or not name.strip():
        raise UserError(f"{what} must be a non-empty name, got {name!r}")
    shown = repr(name) if len(name) <= 60 else repr(name[:57]) + "..."
    if name in (".", ".."):
        raise UserError(f"{what} {shown} is not allowed: it names a folder, not an entry in it")
    for char, described in _NOT_IN_NAMES.items():
        if char in name:
            raise UserError(f"{what} {shown} must be a plain name, not a path: it contains {described}")
    if not name.isprintable():
        raise UserError(f"{what} {shown} contains control characters; use letters, digits, '-', '_' or '.'")
    if len(name.encode("utf-8", "surrogatepass")) > 255:
        raise UserError(f"{what} {shown} is longer than 255 bytes, the file-name limit")
    return name


def make_folder(path: Path) -> Path:
    """An output folder (and its parents), or one line saying why it cannot be made."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserError(f"{path} exists and is not a folder; choose another --out") from None
    except OSError as e:
        raise UserError(f"cannot create folder {path}: {e.strerror or e}") from None
    return path


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class RunDir:
    """Typed access to one run folder."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.path.exists()
        except OSError as e:  # a name too long for the file system, say: every later call would fail
            raise UserError(f"run folder {str(self.path)[:80]!r}: {e.strerror or e}") from None

    # -- creating -----------------------------------------------------------------------------
    def check_new(self, overwrite: bool) -> None:
        """Fail early (before any work) if the folder exists and overwriting was not asked for."""
        if self.path.exists() and not self.path.is_dir():  # first: iterdir() on a file raises
            raise UserError(f"{self.path} exists and is not a folder")
        if self.path.exists() and not overwrite and any(self.path.iterdir()):
            raise UserError(f"run folder {self.path} already exists; choose another --out or pass --overwrite")

    def create(self, overwrite: bool) -> None:
        self.check_new(overwrite)
        if self.path.exists():
            shutil.rmtree(self.path)
        try:
            self.path.mkdir(parents=True)
        except OSError as e:
            raise UserError(f"cannot create run folder {self.path}: {e.strerror}") from None

    # -- files --------------------------------------------------------------------------------
    def write_json(self, name: str, data: Any) -> None:
        atomic.write_text(self.path / name, json.dumps(data, indent=2, ensure_ascii=False) + "\n")

    def read_json(self, name: str) -> Any:
        path = self.path / safe_name(name, "run file")
        if not path.is_file():
            raise UserError(f"{self.path} is not a complete run folder: {name} is missing")
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise UserError(f"{path} is corrupt ({e}); the run folder was edited or only partly copied") from None

    def append_metrics(self, record: dict) -> None:
        with open(self.path / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def metrics(self) -> list[dict]:
        path = self.path / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []

    def write_config(self, cfg: Config, derived: dict | None = None) -> None:
        text = dump(cfg)
        if derived:
            text += yaml.safe_dump({"derived": derived}, sort_keys=False)
        atomic.write_text(self.path / "config.yaml", text)

    def config(self) -> Config:
        path = self.path / "config.yaml"
        if not self.path.is_dir():
            raise UserError(f"run folder not found: {self.path}")
        if not path.is_file():
            raise UserError(f"{self.path} is not a run folder (no config.yaml)")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError, ValueError, RecursionError) as e:
            raise UserError(f"{path} is corrupt ({' '.join(str(e).split())[:200]}); the run folder was edited") from None
        if not isinstance(raw, dict):
            raise UserError(f"{path} is corrupt: it holds a {type(raw).__name__}, not a config mapping")
        raw.pop("derived", None)
        return validate(raw)

    def labels(self) -> list[str]:
        return self.read_json("labels.json")

    def artifact(self, name: str) -> Path:
        path = self.path / safe_name(name, "artifact name")
        if not path.is_dir():
            raise UserError(f"{self.path} has no {name}/ folder: the run did not finish (see metrics.jsonl)")
        return path
