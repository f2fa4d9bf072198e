"""DoRA (Liu et al., 2024): W split into magnitude and direction; LoRA updates the direction and the
per-output-row magnitude trains too. peft's `use_dora`."""

from __future__ import annotations

from typing import Literal

from . import registry
from .lora import Lora, LoraConfig


class DoraConfig(LoraConfig):
    name: Literal["dora"] = "dora"


@registry.register
class Dora(Lora):
    name = "dora"
    config_class = DoraConfig

    def lora_kwargs(self) -> dict:
        return {"use_dora": True}
