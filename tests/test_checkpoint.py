"""checkpoint.save on its own: a checkpoint folder is complete or absent, a failed write keeps the
previous one and leaves no hidden temporary folder behind, and only the newest `keep` survive."""

from __future__ import annotations

import pytest
import torch

from lorafit import checkpoint


def _save(run, step, value=0.0, keep=2):
    return checkpoint.save(run, step, {"model/w": torch.full((2, 3), value)}, {"progress": {"step": step}}, keep)


def _hidden(run):
    return [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]


def test_save_then_load_round_trips_and_leaves_nothing_hidden(tmp_path):
    path = _save(tmp_path, 3, 1.5)
    assert path == tmp_path / "checkpoints" / "step-00000003" == checkpoint.latest(tmp_path)
    tensors, meta = checkpoint.load(path)
    assert torch.equal(tensors["model/w"], torch.full((2, 3), 1.5)) and meta == {"progress": {"step": 3}}
    assert sorted(p.name for p in path.iterdir()) == ["state.json", "tensors.safetensors"]
    assert _hidden(tmp_path) == []


def test_saving_a_step_again_replaces_it(tmp_path):
    _save(tmp_path, 3, 1.0)
    _save(tmp_path, 3, 2.0)
    tensors, _ = checkpoint.load(checkpoint.latest(tmp_path))
    assert torch.equal(tensors["model/w"], torch.full((2, 3), 2.0))
    assert _hidden(tmp_path) == []


def test_a_failed_tensor_write_is_an_oserror_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    _save(tmp_path, 3, 1.0)

    def full_disk(tensors, filename):
        raise RuntimeError("No space left on device")  # safetensors' own error type, not an OSError

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    with pytest.raises(OSError, match="tensors.safetensors failed: No space left on device"):
        _save(tmp_path, 6, 2.0)
    assert checkpoint.latest(tmp_path).name == "step-00000003"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000003"]
    tensors, _ = checkpoint.load(checkpoint.latest(tmp_path))
    assert torch.equal(tensors["model/w"], torch.full((2, 3), 1.0))


def test_only_the_newest_keep_survive(tmp_path):
    for step in (3, 6, 9, 12):
        _save(tmp_path, step, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000009", "step-00000012"]
    checkpoint.remove_all(tmp_path)
    assert not (tmp_path / "checkpoints").exists() and checkpoint.latest(tmp_path) is None
