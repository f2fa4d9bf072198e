"""LoRA (Hu et al., 2021): frozen W plus (alpha / rank) * B @ A, with peft as the engine."""

from __future__ import annotations

from typing import Annotated, Literal

import peft
from pydantic import Field

from . import registry
from .base import AdapterConfig
from .peft_common import PeftMethod


class LoraConfig(AdapterConfig):
    name: Literal["lora"] = "lora"
    rank: Annotated[int, Field(gt=0)] = 8
    """Rank r of the update B @ A."""
    alpha: Annotated[float, Field(gt=0)] = 16.0
    """Scaling numerator: the update is multiplied by alpha / rank."""
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.1
    """Dropout on the adapter's input."""


@registry.register
class Lora(PeftMethod):
    name = "lora"
    config_class = LoraConfig

    def peft_config(self, targets: list[str], total_steps: int) -> peft.PeftConfig:
        c = self.cfg
        return peft.LoraConfig(r=c.rank, lora_alpha=c.alpha, lora_dropout=c.dropout, target_modules=targets)
