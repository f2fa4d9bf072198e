"""Full fine-tuning: every weight trains. The trivial method, and the baseline."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file
from torch import nn

from ..models import save_transformers_folder
from . import registry
from .base import Method, MethodConfig


class FullConfig(MethodConfig):
    name: Literal["full"] = "full"


@registry.register
class Full(Method):
    name = "full"
    config_class = FullConfig
    default_lr = 1e-4
    default_head_lr = 2e-3
    artifact = "model"

    def inject(self, model: nn.Module, targets: list[str], total_steps: int) -> nn.Module:
        model.requires_grad_(True)  # every weight trains; nothing to inject
        return model

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def load_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        model.load_state_dict(state)

    def save(self, model: nn.Module, path: Path) -> None:
        # A transformers folder: AutoModelForSequenceClassification(..., trust_remote_code=True) loads it.
        save_transformers_folder(model, path)

    def load(self, base: nn.Module, path: Path) -> nn.Module:
        state = load_file(str(path / "model.safetensors"))
        if (path / "head.safetensors").is_file():  # the layout of lorafit 0.1 runs: encoder folder + head file
            state = {f"encoder.{k}": v for k, v in state.items()} | load_file(str(path / "head.safetensors"))
        missing, unexpected = base.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if not k.startswith("encoder.pooler")]:
            raise RuntimeError(f"saved model does not fit the base: missing {missing[:5]}, unexpected {unexpected[:5]}")
        return base
