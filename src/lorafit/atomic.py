"""Atomic writes: a file or folder is either the old one or the complete new one, whenever the process dies.

Everything lorafit writes for later stages goes through here (run files, checkpoints, the trained
artifact, exports, downloads, dataset caches). The pattern is always the same: write into a hidden
temporary sibling (same folder, so the final rename stays on one file system), flush it to disk, then
rename it over the target. Readers never see a half-written file.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["write_text", "file", "folder"]


def write_text(path: Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    with file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


@contextmanager
def file(path: Path, mode: int = 0o644) -> Iterator[Path]:
    """A temporary path next to `path` to write; on a clean exit it is fsync'ed and renamed to `path`.

    On an exception the temporary file is removed and `path` is untouched. `mode`: the final file's
    permissions (mkstemp makes files private; run files and reports are meant to be shared).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def folder(path: Path) -> Iterator[Path]:
    """A fresh temporary folder next to `path` to fill; on a clean exit it replaces `path`.

    The previous `path` (if any) is moved aside first and removed only once the new folder is in
    place, so a crash leaves either the old folder or the new one (plus, at worst, a hidden leftover
    that the next write clears). On an exception the temporary folder is removed and `path` is untouched.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    old = path.with_name(f".{path.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
