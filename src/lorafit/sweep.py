"""`lorafit sweep`: a base config, fixed overrides and a grid (or random search) -> one run folder per trial.

A sweep file:

    base: configs/banking77-lora.yaml        # relative to the current folder, else to the sweep file
    overrides: {train.epochs: 3}
    grid: {method.rank: [1, 4, 8, 16], method.alpha: [1x, 2x], seed: [0, 1, 2]}
    random:                                  # optional: samples drawn on top of every grid point
      samples: 4
      seed: 0
      space: {train.lr: {loguniform: [1.0e-4, 3.0e-3]}, method.dropout: {choice: [0.0, 0.1]}}

`method.alpha: 2x` means twice the trial's rank; `{seed}` in a text value is the trial's seed (each seed's
student distilled from its own seed's teacher: `distill.teacher: runs/full/seed={seed}`). `base` may itself be a grid key, to compare
methods whose settings differ as wholes (each trial then starts from its own config file):

    overrides: {train.epochs: 4}
    grid: {base: [configs/banking77-full.yaml, configs/banking77-lora.yaml], seed: [0, 1, 2]}
 Every trial's config is validated before any
trial runs. Each trial is a normal run folder `SWEEP_DIR/<trial name>` (the name lists the swept
values); `sweep.json` records the plan. A re-run skips finished trials, resumes killed ones from
their checkpoint and redoes broken ones. Trials run as `python -m lorafit train` processes, so each
has its own memory figures: one after another, N at a time (`workers`), or as Ray tasks.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import random
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from . import checkpoint
from .config import load_config, read_yaml
from .errors import UserError
from .rundir import RunDir

__all__ = ["SweepSpec", "Trial", "plan", "run_sweep", "trial_status"]

log = logging.getLogger(__name__)


class RandomSearch(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    samples: int = Field(gt=0, le=10_000)
    seed: int = 0
    space: dict[str, dict[str, list[Any]]]
    """{dotted key: {choice: [...]} | {uniform: [low, high]} | {loguniform: [low, high]} | {int: [low, high]}}"""


class SweepSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    base: str | None = None
    """The base config file (null: lorafit's defaults)."""
    overrides: dict[str, Any] = {}
    """Dotted keys every trial gets."""
    grid: dict[str, list[Any]] = {}
    """Dotted key -> values; trials are the cartesian product."""
    random: RandomSearch | None = None


@dataclass(frozen=True)
class Trial:
    name: str
    values: dict[str, Any]  # the swept keys and their values (alpha multiples resolved)
    base: Path | None = None  # the config file this trial starts from

    def overrides(self, spec: SweepSpec) -> list[str]:
        """The trial's settings as overrides; `{seed}` in a text value becomes the trial's seed (a teacher per
        seed: `distill.teacher: runs/full/seed={seed}`)."""
        merged = {**spec.overrides, **{k: v for k, v in self.values.items() if k != "base"}}
        if "{seed}" in json.dumps(merged, default=str):
            seed = merged["seed"] if "seed" in merged else load_config(self.base, []).seed
            merged = _with_seed(merged, seed)
        return [f"{key}={_yaml_value(value)}" for key, value in merged.items()]


def _with_seed(value: Any, seed: int) -> Any:
    """`value` with "{seed}" replaced in every text inside it (mappings and lists included)."""
    if isinstance(value, str):
        return value.replace("{seed}", str(seed))
    if isinstance(value, dict):
        return {k: _with_seed(v, seed) for k, v in value.items()}
    if isinstance(value, list):
        return [_with_seed(v, seed) for v in value]
    return value


def _yaml_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("\n...").strip()


def read_spec(path: str | Path) -> tuple[SweepSpec, Path | None]:
    raw = read_yaml(path)
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise UserError(f"sweep file {path}: {where}: {first['msg']} (keys: base, overrides, grid, random)") from None
    for key, values in spec.grid.items():
        if not values:
            raise UserError(f"sweep file {path}: grid {key} has no values")
    if not spec.grid and not spec.random:
        raise UserError(f"sweep file {path}: give a grid and/or random search; a single run is `lorafit train`")
    if spec.base and "base" in spec.grid:
        raise UserError(f"sweep file {path}: give base either as a setting or as a grid key, not both")
    return spec, _find_base(spec.base, Path(path)) if spec.base else None


def _find_base(name: str, sweep_file: Path) -> Path:
    for candidate in (Path(name), sweep_file.parent / name):
        if candidate.is_file():
            return candidate
    raise UserError(f"sweep file {sweep_file}: base config {name} not found (relative to here or to the sweep file)")


def plan(spec: SweepSpec, base: Path | None, sweep_file: Path = Path(".")) -> list[Trial]:
    """Every trial, validated; fails (naming the trial) before anything runs."""
    keys = list(spec.grid)
    points = [dict(zip(keys, combo)) for combo in itertools.product(*(spec.grid[k] for k in keys))] or [{}]
    if spec.random:
        rng = random.Random(spec.random.seed)
        points = [{**p, **_sample(spec.random.space, rng)} for p in points for _ in range(spec.random.samples)]
    trials, names = [], set()
    for point in points:
        values = _resolve_multiples(point, spec.overrides)
        trial_base = _find_base(str(point["base"]), sweep_file) if "base" in point else base
        shown = {**point, "base": Path(str(point["base"])).stem} if "base" in point else point
        trial = Trial(_trial_name(shown), values, trial_base)
        if trial.name in names:
            raise UserError(f"two trials are both named {trial.name}; the grid repeats a value")
        names.add(trial.name)
        try:
            load_config(trial.base, trial.overrides(spec))
        except UserError as e:
            raise UserError(f"trial {trial.name}: {e}") from None
        trials.append(trial)
    return trials


def _sample(space: dict[str, dict[str, list[Any]]], rng: random.Random) -> dict[str, Any]:
    out = {}
    for key, dist in space.items():
        if len(dist) != 1:
            raise UserError(f"random.space.{key}: give exactly one of choice, uniform, loguniform, int")
        (kind, args), = dist.items()
        if kind == "choice" and args:
            out[key] = rng.choice(args)
        elif kind in ("uniform", "loguniform", "int") and len(args) == 2 and all(isinstance(a, (int, float)) for a in args):
            low, high = args
            if kind == "uniform":
                out[key] = float(f"{rng.uniform(low, high):.4g}")
            elif kind == "loguniform" and low > 0 and high > 0:
                out[key] = float(f"{math.exp(rng.uniform(math.log(low), math.log(high))):.4g}")
            elif kind == "int":
                out[key] = rng.randint(int(low), int(high))
            else:
                raise UserError(f"random.space.{key}: loguniform needs two positive bounds")
        else:
            raise UserError(f"random.space.{key}: {kind} {args!r} is not a distribution (choice: [...], "
                            "uniform|loguniform|int: [low, high])")
    return out


_MULTIPLE = re.compile(r"^(\d+(?:\.\d+)?)x$")


def _resolve_multiples(point: dict[str, Any], fixed: dict[str, Any]) -> dict[str, Any]:
    """`method.alpha: 2x` -> twice the trial's `method.rank`."""
    out = dict(point)
    for key, value in point.items():
        m = _MULTIPLE.match(str(value))
        if m:
            scope = key.rsplit(".", 1)[0] + ".rank" if "." in key else "rank"
            rank = point.get(scope, fixed.get(scope))
            if rank is None:
                raise UserError(f"{key}: {value} multiplies {scope}, which the sweep does not set")
            out[key] = float(m.group(1)) * float(rank)
    return out


def _trial_name(point: dict[str, Any]) -> str:
    leaves = [k.rsplit(".", 1)[-1] for k in point]
    parts = []
    for key, value in point.items():
        leaf = key.rsplit(".", 1)[-1]
        label = leaf if leaves.count(leaf) == 1 else key
        text = _yaml_value(value).replace(" ", "")
        parts.append(f"{label}={text}")
    name = ",".join(parts) or "trial"
    name = re.sub(r"[^A-Za-z0-9_.,=+\-\[\]]", "_", name)
    return name[:200]


# -- running -------------------------------------------------------------------------------------

def trial_status(folder: Path) -> str:
    """finished | resumable | broken | new."""
    if not folder.exists():
        return "new"
    if (folder / "summary.json").is_file() and (folder / "eval.json").is_file():
        return "finished"
    if checkpoint.latest(folder) is not None:
        return "resumable"
    return "broken"


def _command(trial: Trial, spec: SweepSpec, folder: Path, status: str, threads: int | None) -> list[str]:
    if status == "resumable":
        return [sys.executable, "-m", "lorafit", "train", "--resume", str(folder), "--quiet"]
    overrides = trial.overrides(spec)
    if threads and not any(o.startswith("train.threads=") for o in overrides):
        overrides.append(f"train.threads={threads}")
    return [sys.executable, "-m", "lorafit", "train", *([str(trial.base)] if trial.base else []), *overrides,
            "--out", str(folder), "--overwrite", "--quiet"]


def execute(command: list[str], log_path: str) -> tuple[int, str]:
    """Run one trial's command; its output goes to `log_path`. Returns (exit status, last error line)."""
    with open(log_path, "w", encoding="utf-8") as out:
        code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
    lines = [line for line in Path(log_path).read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("lorafit:")]
    return code, (errors[-1] if errors else lines[-1] if lines else "")


def run_sweep(spec_path: str | Path, out: str | Path, workers: int = 1, executor: str = "local",
              report: Callable[[str], None] = print) -> list[dict]:
    spec, base = read_spec(spec_path)
    trials = plan(spec, base, Path(spec_path))
    sweep_dir = Path(out)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    recorded = sweep_dir / "sweep.json"
    bases = sorted({str(t.base) for t in trials if t.base})
    document = {"spec": spec.model_dump(), "base": str(base) if base else None,
                "base_sha256": {b: hashlib.sha256(Path(b).read_bytes()).hexdigest() for b in bases},
                "trials": [{"name": t.name, "values": t.values} for t in trials]}
    if recorded.is_file():
        previous = json.loads(recorded.read_text())
        if previous.get("spec") != document["spec"]:
            raise UserError(f"{sweep_dir} holds a different sweep (sweep.json); choose another --out")
        changed = [b for b, digest in previous.get("base_sha256", {}).items() if document["base_sha256"].get(b) != digest]
        if changed:
            raise UserError(f"{', '.join(changed)} changed since {sweep_dir} started, so its finished trials would not "
                            "match new ones; choose another --out (or restore the file)")
    RunDir(sweep_dir).write_json("sweep.json", document)
    cores = os.cpu_count() or 1
    threads = max(1, cores // workers) if workers > 1 else None

    jobs, results = [], []
    for trial in trials:
        folder = sweep_dir / trial.name
        status = trial_status(folder)
        if status == "finished":
            results.append(_result(trial, folder, "skipped (finished)", 0.0))
            report(f"[{len(results)}/{len(trials)}] {trial.name}: finished earlier, skipped")
            continue
        jobs.append((trial, folder, status, _command(trial, spec, folder, status, threads)))
    logs = sweep_dir / "logs"
    logs.mkdir(exist_ok=True)

    def done(trial: Trial, folder: Path, status: str, code: int, last: str, seconds: float) -> None:
        outcome = ("resumed" if status == "resumable" else "ran") if code == 0 else f"failed ({last})"
        result = _result(trial, folder, outcome, seconds)
        results.append(result)
        # Validation only: test figures are for the final table (`lorafit compare`), never for watching trials.
        figures = "".join(f"validation {metric.replace('_', '-')} {value:.4f} (best epoch), "
                          for metric, value in (result.get("validation") or {}).items())
        report(f"[{len(results)}/{len(trials)}] {trial.name}: {figures}{outcome}, {seconds:.0f} s")

    if executor == "ray":
        _run_ray(jobs, logs, done, workers)
    elif executor == "local":
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            futures = {pool.submit(_timed_execute, command, str(logs / f"{trial.name}.log")): (trial, folder, status)
                       for trial, folder, status, command in jobs}
            for future in as_completed(futures):
                trial, folder, status = futures[future]
                code, last, seconds = future.result()
                done(trial, folder, status, code, last, seconds)
    else:
        raise UserError(f"unknown executor {executor!r}; choose local or ray")
    order = {t.name: i for i, t in enumerate(trials)}
    return sorted(results, key=lambda r: order[r["name"]])


def _run_ray(jobs, logs: Path, done, workers: int) -> None:
    try:
        import ray
    except ImportError:
        raise UserError("--executor ray needs Ray: pip install 'lorafit[ray]'") from None
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), ignore_reinit_error=True, log_to_driver=False)
    remote = ray.remote(num_cpus=max(1, (os.cpu_count() or 1) // max(1, workers)))(_timed_execute)
    pending = {remote.remote(command, str(logs / f"{trial.name}.log")): (trial, folder, status)
               for trial, folder, status, command in jobs}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        trial, folder, status = pending.pop(ready[0])
        code, last, seconds = ray.get(ready[0])
        done(trial, folder, status, code, last, seconds)


def _timed_execute(command: list[str], log_path: str) -> tuple[int, str, float]:
    started = time.perf_counter()
    code, last = execute(command, log_path)
    return code, last, time.perf_counter() - started


def _result(trial: Trial, folder: Path, outcome: str, seconds: float) -> dict:
    result = {"name": trial.name, "values": trial.values, "folder": str(folder), "outcome": outcome, "seconds": seconds}
    if (folder / "summary.json").is_file():
        s = RunDir(folder).summary()
        result.update(validation=s.best_validation, test_accuracy=s.test_accuracy, test_macro_f1=s.test_macro_f1)
    return result
