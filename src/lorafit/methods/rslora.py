"""rsLoRA (Kalajdzievski, 2023): the update is scaled by alpha / sqrt(rank) instead of alpha / rank,
so higher ranks keep learning instead of being damped. peft's `use_rslora`."""

from __future__ import annotations

from typing import Literal

from . import registry
from .lora import Lora, LoraConfig


class RsLoraConfig(LoraConfig):
    name: Literal["rslora"] = "rslora"


@registry.register
class RsLora(Lora):
    name = "rslora"
    config_class = RsLoraConfig

    def lora_kwargs(self) -> dict:
        return {"use_rslora": True}
