"""Where and how tensors run: device choice, autocast, threads, seeding, memory figures."""

from __future__ import annotations

import contextlib
import random
import resource
import sys

import numpy as np
import torch

from . import hardware
from .config import TrainConfig
from .errors import UserError


__all__ = ["select_device", "autocast", "seed_everything", "peak_memory_mb", "set_threads", "token_budget"]


#: train.max_batch_tokens=auto on CPU: one Banking77 LoRA epoch peaked at 2,573 MB with 2,048, 1,638 MB
#: with 1,024 and 1,447 MB with 512, at the same speed except 512 (-12 %); README "Speed".
CPU_TOKEN_BUDGET = 1024


def token_budget(setting: int | str | None, device: torch.device) -> int | None:
    """Padded tokens per forward pass: train.max_batch_tokens with auto resolved for `device`."""
    if setting == "auto":
        return CPU_TOKEN_BUDGET if device.type == "cpu" else None
    return setting


def select_device(choice: str) -> torch.device:
    if choice == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device=cuda but no CUDA GPU is visible; use train.device=auto or cpu")
    if choice == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("train.device=mps but MPS is not available; use train.device=auto or cpu")
    return torch.device(choice)


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The dtype training autocasts to. `auto`: bf16 where the GPU supports it, else fp16, on CUDA; float32
    elsewhere (on CPU the exact default). `bf16` also on CPU when asked: where the CPU multiplies bf16
    natively (AVX-512 BF16, AMX, Arm BF16) its products run about twice float32's rate (README, Speed);
    elsewhere it is emulated and slower, which a warning says. `fp16` on CUDA only."""
    if cfg.precision == "fp32" or (cfg.precision == "auto" and device.type != "cuda"):
        return None
    if device.type == "cpu" and cfg.precision == "bf16":
        hardware.warn_if_emulated_bf16("train.precision=bf16")
        return torch.bfloat16
    if device.type != "cuda":
        hint = "use precision=auto, fp32" + (" or bf16" if cfg.precision == "fp16" else "")
        where = "CUDA" if cfg.precision == "fp16" else "CUDA or a CPU"
        raise UserError(f"train.precision={cfg.precision} needs {where}, not {device.type}; {hint}")
    if cfg.precision == "fp16":
        return torch.float16
    if cfg.precision == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def set_threads(threads: int | None) -> None:
    if threads is not None:
        torch.set_num_threads(threads)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated on a GPU; peak resident set size of this process elsewhere."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024
