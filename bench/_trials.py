"""One `lorafit train` run of a benchmark, as `lorafit sweep` runs a trial: a finished run is skipped, a
killed one resumed from its last checkpoint, anything else trained anew; output goes to a log file."""

from __future__ import annotations

import sys
from pathlib import Path


def train_or_resume(run: Path, train_args: list[str], log: Path, label: str) -> str | None:
    """Run `lorafit train *train_args --out run --overwrite --quiet` (or `--resume run`) unless `run` has
    finished; returns `run` as a string if it failed, else None. `label` names the run in what is printed."""
    from lorafit.sweep import execute, trial_status

    status = trial_status(run)
    if status == "finished":
        print(f"{label}: finished earlier, skipped", flush=True)
        return None
    if status == "resumable":
        command = [sys.executable, "-m", "lorafit", "train", "--resume", str(run), "--quiet"]
    else:
        command = [sys.executable, "-m", "lorafit", "train", *train_args, "--out", str(run), "--overwrite", "--quiet"]
    log.parent.mkdir(parents=True, exist_ok=True)
    print("$", " ".join(command), flush=True)
    code, last = execute(command, str(log))
    print(f"{label}: {'done' if code == 0 else f'failed ({last})'}", flush=True)
    return None if code == 0 else str(run)
