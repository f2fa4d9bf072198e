"""Kill a real training run with SIGKILL at random moments, resume it, and check nothing was lost.

One uninterrupted reference run, then N trials: start the same run, SIGKILL it at a seeded random
moment after its first checkpoint (each trial aims at a different optimiser step, plus a random
fraction of a step), run `lorafit train --resume`, and compare with the reference: eval.json
(accuracy, macro-F1, loss, confusion matrix), every adapter tensor bitwise (`torch.equal`) and
metrics.jsonl (timings aside). Exit status 1 if any trial differs.

    python bench/kill_resume.py --kills 20

The run is small but real: Banking77 (from $LORAFIT_DATA_DIR), all-MiniLM-L6-v2, LoRA rank 8,
600 training rows, 2 epochs, a checkpoint every 5 steps, one CPU thread (so results are bitwise
reproducible), and a metrics line per step (which is how the script sees where the run is).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from lorafit import checkpoint


def overrides(args: argparse.Namespace) -> list[str]:
    return [
        "data.name=banking77", f"data.train_limit={args.train_limit}", f"model.name={args.model}",
        "method.name=lora", "method.rank=8", "method.alpha=16", f"train.epochs={args.epochs}",
        f"train.checkpoint_every={args.checkpoint_every}", "train.keep_checkpoints=2", "train.log_every=1",
        "train.threads=1", "train.device=cpu", f"seed={args.seed}", *args.set,
    ]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1"}


def train_cmd(args: argparse.Namespace, out: Path) -> list[str]:
    return [sys.executable, "-m", "lorafit", "train", *overrides(args), "--out", str(out), "--quiet"]


def run(cmd: list[str], log: Path) -> None:
    with open(log, "w") as f:
        result = subprocess.run(cmd, env=env(), stdout=f, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = log.read_text().strip().splitlines()[-3:]
        raise SystemExit(f"{' '.join(cmd[2:5])} ... failed with status {result.returncode}: {' | '.join(tail)}")


def steps_logged(out: Path) -> int:
    """The last optimiser step metrics.jsonl records (train.log_every=1: one line per step)."""
    path = out / "metrics.jsonl"
    if not path.is_file():
        return 0
    step = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line being written as we read
            continue
        step = max(step, record.get("step", 0))
    return step


def total_steps(run_dir: Path) -> int:
    import yaml

    return int(yaml.safe_load((run_dir / "config.yaml").read_text())["derived"]["total_steps"])


def compare(reference: Path, other: Path) -> list[str]:
    """What differs between two finished runs; empty when the outcome is identical."""
    problems = []
    for name in ("eval.json", "summary.json"):
        if not (other / name).is_file():
            return [f"{name} missing"]
    ea, eb = (json.loads((p / "eval.json").read_text()) for p in (reference, other))
    problems += [f"eval.json {key}: {ea[key]!r} != {eb[key]!r}" for key in ("accuracy", "macro_f1", "loss", "confusion") if ea[key] != eb[key]]
    wa, wb = (load_file(str(p / "adapter" / "adapter_model.safetensors")) for p in (reference, other))
    if wa.keys() != wb.keys():
        problems.append("adapter tensors have different names")
    else:
        problems += [f"adapter tensor {k} differs" for k in wa if not torch.equal(wa[k], wb[k])]
    strip = lambda path: [{k: v for k, v in json.loads(l).items() if k not in ("seconds", "examples_per_second")}  # noqa: E731
                          for l in (path / "metrics.jsonl").read_text().splitlines()]
    if strip(reference) != strip(other):
        problems.append("metrics.jsonl differs")
    if (other / "checkpoints").exists():
        problems.append("checkpoints/ left behind")
    return problems


def trial(args: argparse.Namespace, out: Path, target_step: int, delay: float) -> tuple[int, int, float]:
    """Start the run, SIGKILL it `delay` seconds after it logs `target_step` (and has a checkpoint).
    Returns (last step logged at the kill, step of the checkpoint it resumes from, seconds run)."""
    started = time.perf_counter()
    log = open(out.with_suffix(".log"), "w")
    proc = subprocess.Popen(train_cmd(args, out), env=env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        while proc.poll() is None and not (steps_logged(out) >= target_step and checkpoint.latest(out) is not None):
            time.sleep(0.02)
        time.sleep(delay)
        if proc.poll() is not None:
            raise SystemExit(f"the run finished (status {proc.returncode}) before the kill at step {target_step}; "
                             "lower the target steps or lengthen the run")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    latest = checkpoint.latest(out)
    if latest is None:
        raise SystemExit(f"killed at step {target_step} with no checkpoint written")
    return steps_logged(out), int(latest.name.split("-")[1]), time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20, help="number of kill-and-resume trials")
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill moments and the run")
    parser.add_argument("--train-limit", type=int, default=600)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--checkpoint-every", type=int, default=5)
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="another config override")
    parser.add_argument("--workdir", help="where the runs go (default: a temporary folder, removed at the end)")
    args = parser.parse_args()
    if not os.environ.get("LORAFIT_DATA_DIR"):
        print("warning: LORAFIT_DATA_DIR is not set; Banking77 comes from the cache or a download", file=sys.stderr)

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="kill-resume-"))
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    print(f"kill-and-resume: {args.kills} trials, seed {args.seed}; runs in {work}")
    print("run: " + " ".join(overrides(args)))
    try:
        t0 = time.perf_counter()
        reference = work / "reference"
        run(train_cmd(args, reference), work / "reference.log")
        total = total_steps(reference)
        ev = json.loads((reference / "eval.json").read_text())
        print(f"reference: {total} steps in {time.perf_counter() - t0:.0f} s; test accuracy {ev['accuracy']:.4f}, "
              f"macro-F1 {ev['macro_f1']:.4f}, loss {ev['loss']:.4f}")

        # Each trial aims at a different step from the first checkpoint to the last step (the last
        # ones kill during the final evaluation), then waits a random part of a step on top.
        step_seconds = json.loads((reference / "summary.json").read_text())["train_seconds"] / total
        candidates = list(range(args.checkpoint_every, total + 1))
        targets = rng.sample(candidates, min(args.kills, len(candidates)))
        targets += [rng.choice(candidates) for _ in range(args.kills - len(targets))]
        identical = 0
        print(f"{'trial':>5} {'target':>6} {'killed at':>9} {'resumed from':>12} {'identical':>9}  seconds  notes")
        for i, target in enumerate(targets, start=1):
            out = work / f"trial-{i:02d}"
            delay = rng.uniform(0, step_seconds)
            killed_at, resumed_from, seconds = trial(args, out, target, delay)
            t1 = time.perf_counter()
            run([sys.executable, "-m", "lorafit", "train", "--resume", str(out), "--quiet"], out.with_suffix(".resume.log"))
            problems = compare(reference, out)
            identical += not problems
            print(f"{i:>5} {target:>6} {killed_at:>9} {resumed_from:>12} {'yes' if not problems else 'NO':>9} "
                  f"{seconds + time.perf_counter() - t1:>8.0f}  {'; '.join(problems)}", flush=True)
            if not problems:
                shutil.rmtree(out)
        print(f"{args.kills} kills, {identical} identical outcomes "
              f"(eval.json metrics, adapter tensors bitwise, metrics.jsonl) in {time.perf_counter() - t0:.0f} s")
        return 0 if identical == args.kills else 1
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
