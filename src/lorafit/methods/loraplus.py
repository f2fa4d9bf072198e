"""LoRA+ (Hayou et al., 2024): plain LoRA weights, but B learns `lr_ratio` times faster than A.

Only the optimiser changes, so this is the `param_groups` hook; the saved adapter is a plain LoRA.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field
from torch import nn

from . import registry
from .base import is_head_param
from .lora import Lora, LoraConfig


class LoraPlusConfig(LoraConfig):
    name: Literal["loraplus"] = "loraplus"
    lr_ratio: Annotated[float, Field(gt=0)] = 16.0
    """Learning rate of B over that of A (the paper suggests 2**4)."""


@registry.register
class LoraPlus(Lora):
    name = "loraplus"
    config_class = LoraPlusConfig
    default_lr = 5e-4

    def param_groups(self, model: nn.Module, lr: float, head_lr: float) -> list[dict[str, Any]]:
        groups: dict[str, list] = {"lora_A": [], "lora_B": [], "head": []}
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            groups["head" if is_head_param(name) else "lora_B" if ".lora_B." in name else "lora_A"].append(p)
        return [
            {"name": "lora_A", "params": groups["lora_A"], "lr": lr},
            {"name": "lora_B", "params": groups["lora_B"], "lr": lr * self.cfg.lr_ratio},
            {"name": "head", "params": groups["head"], "lr": head_lr},
        ]
