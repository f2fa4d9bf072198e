"""Full fine-tuning: every weight trains. The trivial method, and the baseline."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import registry
from .base import Method, MethodConfig


class FullConfig(MethodConfig):
    name: Literal["full"] = "full"


@registry.register
class Full(Method):
    name = "full"
    config_class = FullConfig
    artifact = "model"

    def apply(self, model: nn.Module, targets: list[str], total_steps: int) -> nn.Module:
        model.requires_grad_(True)
        return model

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def load_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        model.load_state_dict(state)

    def save(self, model: nn.Module, path: Path) -> None:
        # The encoder as a plain transformers folder (AutoModel loads it), the head beside it.
        model.encoder.save_pretrained(str(path), safe_serialization=True)
        head = {f"classifier.{k}": v.contiguous() for k, v in model.classifier.state_dict().items()}
        save_file(head, str(path / "head.safetensors"))

    def load(self, base: nn.Module, path: Path) -> nn.Module:
        encoder = load_file(str(path / "model.safetensors"))
        state = {f"encoder.{k}": v for k, v in encoder.items()} | load_file(str(path / "head.safetensors"))
        missing, unexpected = base.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if not k.startswith("encoder.pooler")]:
            raise RuntimeError(f"saved model does not fit the base: missing {missing[:5]}, unexpected {unexpected[:5]}")
        return base
