"""LoRA (Hu et al., 2021): frozen W plus (alpha / rank) * B @ A, with peft as the engine.

The LoRA variants (`dora`, `rslora`, `loraplus`) are their own files; each subclasses `Lora` and
changes one thing. `init` picks how A and B start: peft's default (A Kaiming-uniform, B zero),
`gaussian` (A ~ N(0, 1/r)), or the SVD/QR initialisations `pissa` and `olora`, which move the
principal part of W into the adapter and keep a residual W in the base.

PiSSA/OLoRA change the base weights, so their trained adapter would only fit the residual base.
`save` therefore converts it into a plain rank-2r LoRA of the original base
(dW = s(BA - B0A0) = s' [B, -B0][A; A0] with s' = s), which loads on the unmodified model like any
other adapter; the conversion is exact up to float rounding.
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import torch
from pydantic import Field
from safetensors.torch import save_file
from torch import nn

from ..errors import UserError
from . import registry
from .base import AdapterConfig
from .peft_common import PeftMethod

if TYPE_CHECKING:
    import peft

INITS = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}


class LoraConfig(AdapterConfig):
    name: Literal["lora"] = "lora"
    rank: Annotated[int, Field(gt=0)] = 16
    """Rank r of the update B @ A."""
    alpha: Annotated[float, Field(gt=0)] = 32.0
    """Scaling numerator: the update is multiplied by alpha / rank."""
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.1
    """Dropout on the adapter's input."""
    rank_pattern: dict[str, Annotated[int, Field(gt=0)]] = {}
    """Per-module ranks overriding `rank`: {regex on the module name: rank}, e.g.
    {"layer\\.[0-2]\\..*query": 16}; peft's rank_pattern."""
    init: Literal["default", "gaussian", "pissa", "olora"] = "default"
    """How A and B start: default (A Kaiming-uniform, B zero), gaussian, pissa (principal singular
    vectors of W), olora (QR of W). pissa/olora keep a residual W in the base while training."""


@registry.register
class Lora(PeftMethod):
    name = "lora"
    config_class = LoraConfig

    def lora_kwargs(self) -> dict:
        """peft.LoraConfig arguments beyond rank, alpha, dropout and targets (the variants' hook)."""
        return {}

    def peft_config(self, targets: list[str], total_steps: int) -> peft.PeftConfig:
        import peft

        c = self.cfg
        return peft.LoraConfig(r=c.rank, lora_alpha=c.alpha, lora_dropout=c.dropout, target_modules=targets,
                               init_lora_weights=INITS[c.init], rank_pattern=dict(c.rank_pattern),
                               **self.lora_kwargs())

    @property
    def mutates_base(self) -> bool:
        return self.cfg.init in ("pissa", "olora")

    def inject(self, model: nn.Module, targets: list[str], total_steps: int) -> nn.Module:
        for pattern in self.cfg.rank_pattern:
            if not any(re.match(rf"(.*\.)?({pattern})$", t) for t in targets):
                raise UserError(f"method.rank_pattern: {pattern!r} matches none of the adapted modules "
                                f"(e.g. {', '.join(targets[:3])}); write a regex on the module names")
        model = super().inject(model, targets, total_steps)
        # PiSSA/OLoRA: remember A0, B0 (deterministic from W, so a resumed run recomputes them).
        self._initial = self.state_dict(model) if self.mutates_base else None
        return model

    def save(self, model: nn.Module, path: Path) -> None:
        if not self.mutates_base:
            return super().save(model, path)
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(model, save_embedding_layers=False)  # see PeftMethod.save
        for key in list(state):
            if ".lora_A." in key:
                state[key] = torch.cat([state[key], self._initial[key]], dim=0)  # (2r, in)
            elif ".lora_B." in key:
                state[key] = torch.cat([state[key], -self._initial[key]], dim=1)  # (out, 2r)
        config = copy.deepcopy(model.peft_config["default"])
        config.r *= 2
        config.rank_pattern = {k: 2 * v for k, v in (config.rank_pattern or {}).items()}
        config.lora_alpha *= math.sqrt(2) if config.use_rslora else 2  # keeps the scale s' = s
        config.init_lora_weights = True
        config.inference_mode = True
        path.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(str(path))
        save_file({k: v.contiguous() for k, v in state.items()}, str(path / "adapter_model.safetensors"),
                  metadata={"format": "pt"})
