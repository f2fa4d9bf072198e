"""Data-parallel training: 2 CPU processes on gloo under torchrun end where one process ends."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest

from conftest import assert_same_training, dropout_free_overrides, kill_at_checkpoint, piece_counts, tiny_overrides
from lorafit.config import load_config
from lorafit.distributed import World
from lorafit.train import train


@pytest.mark.parametrize("size", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [1, 2, 3, 7, 8, 32, 33])
def test_shards_cover_the_batch_and_weights_give_its_mean(size, n):
    batch = list(range(100, 100 + n))
    parts = [World(rank, size).shard(batch) for rank in range(size)]
    counted = [i for mine, weight in parts if weight for i in mine]
    assert sorted(counted) == batch  # every example exactly once (weight-0 stand-ins excluded)
    # DDP averages the processes' gradients: sum_r weight_r * sum(slice_r) / size must be the batch mean.
    values = {i: float(i) ** 2 for i in batch}
    averaged = sum(weight * sum(values[i] for i in mine) for mine, weight in parts) / size
    assert averaged == pytest.approx(np.mean(list(values.values())), rel=1e-12)
    assert all(mine for mine, _ in parts)  # nobody runs an empty forward


def test_world_reads_the_launcher_environment(monkeypatch):
    for key, value in {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    assert World.from_env() == World(1, 4, 1, 2)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(Exception, match="RANK=4 and WORLD_SIZE=4 do not fit"):
        World.from_env()


#: The README's launch commands, with 2 processes on this machine.
LAUNCHERS = {
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
    # Accelerate's multi-process launcher; with no GPU visible, lorafit runs the processes on CPU (gloo).
    "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"],
}


def _launch(launcher: str, args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the launcher; one that has not ended after `timeout` s fails the test with every process's
    Python stack (faulthandler, on a SIGABRT sent to the launcher and its workers), not a bare timeout."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONFAULTHANDLER"] = "1"
    command = [*LAUNCHERS[launcher], "-m", "lorafit", "train", *args]
    with subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            tree = [*psutil.Process(process.pid).children(recursive=True), psutil.Process(process.pid)]
            for each in tree:  # workers first: each Python process prints its threads' stacks, then dies
                with contextlib.suppress(psutil.NoSuchProcess):
                    each.send_signal(signal.SIGABRT)
            psutil.wait_procs(tree, timeout=20)
            for each in tree:
                with contextlib.suppress(psutil.NoSuchProcess):
                    each.kill()
            stdout, stderr = process.communicate()
            pytest.fail(f"{launcher} did not end within {timeout:g} s; stdout: {stdout[-2000:]}\nstacks:\n{stderr[-12000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


@pytest.mark.parametrize("launcher,method,extra", [
    # (LoRA with torchrun and no other setting is what every torchrun case below adds to.)
    ("torchrun", "full", {"train.grad_accum": 2, "train.lr": 1e-3}),
    ("accelerate", "lora", {"train.grad_accum": 1}),
    ("torchrun", "adalora", {"method.init_rank": 6}),  # rank budget from averaged grads
    # slices cut in pieces (one all-reduce, after the last), accumulated over 2 slices; each piece's
    # class-weighted sum over the global step's summed class weights
    ("torchrun", "lora", {"train.max_batch_tokens": 24, "train.grad_accum": 2,
                          "train.class_weights": "{food: 3.0, sport: 0.5}", "train.loss": "focal",
                          "train.sampler": "class_balanced"}),
    # rank 0 runs the teacher and shares its logits; each slice learns from its own examples' logits
    ("torchrun", "lora", {"distill.teacher": "TEACHER", "distill.alpha": 0.8}),
    # every process stores the frozen layer's states of all training texts and feeds its slices from them
    ("torchrun", "lora", {"method.layers": "[1]", "train.cache_frozen_layers": "true", "train.max_batch_tokens": 24}),
])
def test_two_gloo_processes_match_one_process(tmp_path, launcher, method, extra):
    # No dropout anywhere, so one process and two see the same gradients up to float summation order.
    overrides = dropout_free_overrides(tmp_path, method, **{"train.threads": 1, **extra})
    if "distill.teacher" in extra:  # the teacher: a run on the same data and seed, trained first
        train(load_config(None, [o for o in overrides if not o.startswith("distill.")]), tmp_path / "teacher")
        overrides = [o.replace("TEACHER", str(tmp_path / "teacher")) for o in overrides]

    one = load_config(None, overrides)
    if "train.max_batch_tokens" in extra:  # some batch must split differently on the two processes
        assert any(len(set(counts)) > 1 for counts in piece_counts(one, world=2))
    train(one, tmp_path / "one")
    done = _launch(launcher, [*overrides, "--out", str(tmp_path / "two")], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]

    a, b = tmp_path / "one", tmp_path / "two"
    assert sorted(p.name for p in b.iterdir()) == sorted(p.name for p in a.iterdir())  # rank 1 wrote nothing extra
    summary_a, summary_b = (json.loads((r / "summary.json").read_text()) for r in (a, b))
    assert summary_a["processes"] == 1 and summary_b["processes"] == 2
    assert_same_training(a, b, "model" if method == "full" else "adapter", tolerance=1e-4)


def test_killed_two_process_run_resumes_exactly(tiny_bert, tiny_data, tmp_path):
    """Dropout on: each rank draws its own masks, so a mid-epoch resume must restore each rank's own
    random state (rank 0's on every rank would give rank 1 rank 0's masks) to end where the
    uninterrupted 2-process run ends."""
    overrides = tiny_overrides(tiny_bert, tiny_data, **{
        "train.epochs": 3, "train.checkpoint_every": 2, "train.keep_checkpoints": 2, "method.dropout": 0.1,
        "train.threads": 1, "train.cpu_kernels": "stock", "train.lr": 1e-2})
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    done = _launch("torchrun", [*overrides, "--out", str(tmp_path / "reference")], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*LAUNCHERS["torchrun"], "-m", "lorafit", "train", *overrides, "--out", str(killed)], cwd=tmp_path,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_at_checkpoint(proc, killed, 4, tree=True)  # mid-epoch 1 (15 batches of 8 per epoch)
    resumed = subprocess.run([*LAUNCHERS["torchrun"], "-m", "lorafit", "train", "--resume", str(killed)], cwd=tmp_path,
                             env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_training(tmp_path / "reference", killed, "adapter", tolerance=1e-12)
    ea, eb = (json.loads((r / "eval.json").read_text()) for r in (tmp_path / "reference", killed))
    assert ea == eb
