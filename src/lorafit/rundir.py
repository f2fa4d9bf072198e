"""What a run folder holds, and the reading and writing of every artifact in it.

A run folder is the hand-off between stages: `eval`, `predict` (and later `report`, `export`,
`serve`) take only its path. Files:

    config.yaml     the resolved config (plus the derived schedule)
    labels.json     the label space, in class-index order
    splits.json     which source rows went into train / validation / test
    metrics.jsonl   one JSON object per logged step and per epoch
    eval.json       test metrics of the best checkpoint
    summary.json    efficiency figures, best epoch, device, versions
    adapter/        peft-format adapter (adapter methods) -- or --
    model/          the fine-tuned encoder + head (full fine-tuning)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from .config import Config, dump, validate
from .errors import UserError

__all__ = ["RunDir", "write_text_atomic", "folder_bytes"]


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temporary file in the same folder, then rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class RunDir:
    """Typed access to one run folder."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    # -- creating -----------------------------------------------------------------------------
    def check_new(self, overwrite: bool) -> None:
        """Fail early (before any work) if the folder exists and overwriting was not asked for."""
        if self.path.exists() and not overwrite and any(self.path.iterdir()):
            raise UserError(f"run folder {self.path} already exists; choose another --out or pass --overwrite")
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"{self.path} exists and is not a folder")

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
        write_text_atomic(self.path / name, json.dumps(data, indent=2, ensure_ascii=False) + "\n")

    def read_json(self, name: str) -> Any:
        path = self.path / name
        if not path.is_file():
            raise UserError(f"{self.path} is not a complete run folder: {name} is missing")
        return json.loads(path.read_text(encoding="utf-8"))

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
        write_text_atomic(self.path / "config.yaml", text)

    def config(self) -> Config:
        path = self.path / "config.yaml"
        if not self.path.is_dir():
            raise UserError(f"run folder not found: {self.path}")
        if not path.is_file():
            raise UserError(f"{self.path} is not a run folder (no config.yaml)")
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        raw.pop("derived", None)
        return validate(raw)

    def labels(self) -> list[str]:
        return self.read_json("labels.json")

    def artifact(self, name: str) -> Path:
        path = self.path / name
        if not path.is_dir():
            raise UserError(f"{self.path} has no {name}/ folder: the run did not finish (see metrics.jsonl)")
        return path
