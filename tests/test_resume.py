"""Crash safety: SIGKILL at several points + resume ends exactly like the uninterrupted run;
SIGTERM checkpoints and says how to resume; a failed write (file too large) keeps the previous
checkpoint intact and the run resumable."""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lorafit
from lorafit import checkpoint
from lorafit.train import resume

from conftest import kill_at_checkpoint, subprocess_env, tiny_overrides, train_command, write_dataset

EXTRA = {"train.epochs": 4, "train.checkpoint_every": 3, "train.keep_checkpoints": 2, "method.dropout": 0.1,
         "train.lr": 1e-2}


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def _assert_same_outcome(a: Path, b: Path) -> None:
    ea, eb = json.loads((a / "eval.json").read_text()), json.loads((b / "eval.json").read_text())
    for key in ("accuracy", "macro_f1", "loss", "confusion"):
        assert ea[key] == eb[key], key
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"weight {k} differs after resume"
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("seconds", "examples_per_second")} for r in rows]  # noqa: E731
    ma = [json.loads(l) for l in (a / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(l) for l in (b / "metrics.jsonl").read_text().splitlines()]
    assert strip(ma) == strip(mb), "metrics.jsonl must read as one uninterrupted run"
    assert not (b / "checkpoints").exists()


def _reference(tiny_bert, root: Path, **extra) -> tuple[list[str], Path]:
    overrides = tiny_overrides(tiny_bert, write_dataset(root / "data"), **EXTRA, **extra)
    out = root / "reference"
    subprocess.run(train_command(overrides, out), check=True, env=subprocess_env(), capture_output=True)
    return overrides, out


@pytest.fixture(scope="module")
def references(tiny_bert, tmp_path_factory):
    """The uninterrupted runs, made once per module and setting on first use: `references(setting)` gives
    (overrides, run folder). The CPU kernels are forced each way (`onednn`, `stock`): the reference and the
    killed run are separate processes, and under train.cpu_kernels=auto each would time the kernels itself.
    `bf16`: oneDNN kernels and train.precision=bf16 on CPU (autocast, the fused LoRA linears in bf16).
    (A module-scoped fixture parametrised indirectly from a list of pairs is set up again for every pair:
    pytest keys its cache by the pair's index, not by the value.)"""
    made: dict[str, tuple[list[str], Path]] = {}

    def get(setting: str) -> tuple[list[str], Path]:
        if setting not in made:
            extra = ({"train.cpu_kernels": "onednn", "train.precision": "bf16"} if setting == "bf16"
                     else {"train.cpu_kernels": setting})
            made[setting] = _reference(tiny_bert, tmp_path_factory.mktemp(f"reference-{setting}"), **extra)
        return made[setting]

    return get


# Every kill point with lorafit's default kernels; two with PyTorch's and in bf16 (what resumes there is the
# same checkpoint code: the kernel choice and the precision are what those cases add).
@pytest.mark.parametrize("setting, kill_after_step", [("onednn", 1), ("onednn", 7), ("onednn", 20), ("onednn", 35),
                                                      ("stock", 7), ("stock", 35), ("bf16", 20)])
def test_sigkill_then_resume_is_bitwise_identical(references, tmp_path, setting, kill_after_step):
    overrides, ref = references(setting)
    out = tmp_path / "killed"
    proc = subprocess.Popen(train_command(overrides, out), env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_at_checkpoint(proc, out, kill_after_step)
    result = resume(out)
    assert result.eval["accuracy"] == json.loads((ref / "eval.json").read_text())["accuracy"]
    _assert_same_outcome(ref, out)


@pytest.mark.parametrize("setting", ["onednn", "stock"])
def test_sigterm_checkpoints_and_says_how_to_resume(references, tmp_path, setting):
    overrides, ref = references(setting)
    out = tmp_path / "stopped"
    proc = subprocess.Popen(train_command(overrides, out), env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None and checkpoint.latest(out) is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "Traceback" not in err
    assert f"lorafit train --resume {out}" in err
    assert checkpoint.latest(out) is not None
    assert subprocess.run([sys.executable, "-m", "lorafit", "train", "--resume", str(out), "--quiet"], env=subprocess_env(),
                          capture_output=True).returncode == 0
    _assert_same_outcome(ref, out)


def test_failed_write_keeps_previous_checkpoint(tiny_bert, tiny_data, tmp_path, monkeypatch):
    # Kernels forced: the killed run (a subprocess) and the reference (this process) each decide under auto.
    overrides = tiny_overrides(tiny_bert, tiny_data, **EXTRA, **{"train.cpu_kernels": "stock"})
    # Measure checkpoint sizes of this exact run (kept, for the measurement only).
    monkeypatch.setattr(checkpoint, "remove_all", lambda run_path: None)
    measured = tmp_path / "measured"
    lorafit.train(lorafit.load_config(None, overrides + ["train.keep_checkpoints=1000"]), measured)
    sizes = [(int(p.name.split("-")[1]), (p / "tensors.safetensors").stat().st_size, "best/" in "".join(load_file(str(p / "tensors.safetensors"))))
             for p in sorted((measured / "checkpoints").iterdir())]
    first_with_best = next(i for i, (_, _, has_best) in enumerate(sizes) if has_best)
    small = max(size for _, size, _ in sizes[:first_with_best])
    limit = sizes[first_with_best][1] - 1
    assert small <= limit
    monkeypatch.undo()

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a too-large write fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    out = tmp_path / "full-disk"
    proc = subprocess.run(train_command(overrides, out), env=subprocess_env(), capture_output=True, text=True, preexec_fn=limit_file_size)
    assert proc.returncode == 2, proc.stderr
    message = proc.stderr.strip().splitlines()[-1]
    assert "cannot write to" in message and "is intact" in message and "--resume" in message
    assert "Traceback" not in proc.stderr
    kept = checkpoint.latest(out)
    assert kept is not None and int(kept.name.split("-")[1]) == sizes[first_with_best - 1][0]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]  # no temporary folder left
    load_file(str(kept / "tensors.safetensors"))  # complete and readable
    # With room again, the run resumes and ends like an uninterrupted one.
    resume(out)
    reference = tmp_path / "reference"
    lorafit.train(lorafit.load_config(None, overrides), reference)
    _assert_same_outcome(reference, out)


def test_resume_refuses_finished_or_checkpointless_runs(tiny_bert, tiny_data, tmp_path):
    out = tmp_path / "done"
    lorafit.train(lorafit.load_config(None, tiny_overrides(tiny_bert, tiny_data)), out)
    with pytest.raises(lorafit.UserError, match="already finished"):
        resume(out)
    with pytest.raises(lorafit.UserError, match="not found|no config"):
        resume(tmp_path / "nothing")


def test_resume_computes_with_the_kernels_the_run_started_with(tiny_bert, tiny_data, tmp_path, monkeypatch):
    """train.cpu_kernels=auto decides by timing; a resume reuses the decision recorded in compute.json
    (threads and token budget too) instead of timing again, and ends like a run forced to that choice."""
    from lorafit import kernels

    overrides = tiny_overrides(tiny_bert, tiny_data, **EXTRA)
    out = tmp_path / "killed"
    proc = subprocess.Popen(train_command(overrides, out), env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_at_checkpoint(proc, out, 7)
    recorded = json.loads((out / "compute.json").read_text())
    assert recorded["threads"] == 1 and recorded["cpu_kernels"]["cpu"]["model"]

    def no_timing(threads):
        raise AssertionError("a resume must not time the kernels again")

    monkeypatch.setattr(kernels, "decide", no_timing)
    result = resume(out)
    assert result.summary["compute"] == recorded
    # The uninterrupted run with the same decision (auto's fast dropout included).
    monkeypatch.setattr(kernels, "decide", lambda threads: recorded["cpu_kernels"])
    lorafit.train(lorafit.load_config(None, overrides), tmp_path / "reference")
    _assert_same_outcome(tmp_path / "reference", out)
