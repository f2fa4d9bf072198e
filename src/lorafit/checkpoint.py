"""Crash-safe training checkpoints: written atomically, safetensors + JSON only (no pickle).

A checkpoint is a folder `checkpoints/step-00001234/` holding
    tensors.safetensors   weights (the method's trainable state), the best epoch's weights,
                          the optimiser's moment tensors and the torch RNG states
    state.json            where the loop stands, the optimiser's hyperparameters, the
                          scheduler, the Python/NumPy RNG states
It is written through `atomic.folder` (a hidden temporary folder, then renamed), so a checkpoint
folder is either complete or absent, whenever the process dies. The newest `keep` survive.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from . import atomic

__all__ = ["save", "latest", "load", "capture_rng", "restore_rng", "optimizer_to_flat", "optimizer_from_flat"]

PREFIX = "step-"


def _folder(run_path: Path) -> Path:
    return run_path / "checkpoints"


def capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = state
    py = random.getstate()
    np_state = np.random.get_state()
    meta = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng/torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng/cuda/"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, state, gauss = meta["python"]
    random.setstate((version, tuple(state), gauss))
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer state dict as (tensors, JSON): safetensors cannot hold Python objects."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optimizer/{index}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}/{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer/"):
            _, index, name = key.split("/", 2)
            state.setdefault(int(index), {})[name] = value
    for key, value in meta["scalars"].items():
        index, name = key.split("/", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save(run_path: Path, step: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any], keep: int) -> Path:
    """Write one checkpoint atomically, then prune all but the newest `keep`."""
    folder = _folder(run_path)
    folder.mkdir(exist_ok=True)
    final = folder / f"{PREFIX}{step:08d}"
    with atomic.folder(final) as tmp:
        try:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / "tensors.safetensors"))
        except Exception as e:  # safetensors reports a failed write (disk full, ...) as its own error type
            raise OSError(f"writing {tmp / 'tensors.safetensors'} failed: {e}") from e
        atomic.write_text(tmp / "state.json", json.dumps(meta))
    for old in sorted(p for p in folder.iterdir() if p.name.startswith(PREFIX))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(run_path: Path) -> Path | None:
    folder = _folder(run_path)
    if not folder.is_dir():
        return None
    complete = sorted(p for p in folder.iterdir() if p.name.startswith(PREFIX) and (p / "state.json").is_file())
    return complete[-1] if complete else None


def load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    return load_file(str(path / "tensors.safetensors")), json.loads((path / "state.json").read_text(encoding="utf-8"))


def remove_all(run_path: Path) -> None:
    shutil.rmtree(_folder(run_path), ignore_errors=True)
