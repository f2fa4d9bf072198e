"""native-lora: lorafit's own LoRA layer, written from the paper rather than taken from peft.

    h = W x + b + (alpha / r) * B (A dropout(x)),   W, b frozen;  A (r x in) Kaiming-uniform, B (out x r) zero

It is the readable reference and the base for speed work. It matches peft's LoRA numerically (same
A and B give the same logits and gradients) and writes the same file format, so the adapter it
saves loads in plain peft (`PeftModel.from_pretrained`) and vice versa.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from safetensors.torch import load_file, save_file
from torch import nn

from . import registry
from .base import AdapterConfig, AdapterMethod

PEFT_PREFIX = "base_model.model."


class NativeLoraConfig(AdapterConfig):
    name: Literal["native-lora"] = "native-lora"
    rank: Annotated[int, Field(gt=0)] = 8
    """Rank r of the update B @ A."""
    alpha: Annotated[float, Field(gt=0)] = 16.0
    """Scaling numerator: the update is multiplied by alpha / rank."""
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.1
    """Dropout on the adapter's input."""


class LoraLinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.base_layer = base.requires_grad_(False)
        self.rank, self.scaling = rank, alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=base.weight.dtype, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear (and peft) initialise A
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (..., in) -> (..., out)
        out = self.base_layer(x)
        return out + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The base linear with W + (alpha / r) B A folded in."""
        self.base_layer.weight += (self.lora_B @ self.lora_A) * self.scaling
        return self.base_layer


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


@registry.register
class NativeLora(AdapterMethod):
    name = "native-lora"
    config_class = NativeLoraConfig

    def inject(self, model: nn.Module, targets: list[str], total_steps: int) -> nn.Module:
        c = self.cfg
        model.requires_grad_(False)
        for name in targets:
            _replace(model, name, LoraLinear(model.get_submodule(name), c.rank, c.alpha, c.dropout))
        model.classifier.requires_grad_(True)
        return model

    # -- weights, in peft's key layout ------------------------------------------------------------
    @staticmethod
    def _params(model: nn.Module) -> dict[str, torch.Tensor]:
        """Every saved tensor of the adapted model, under the key peft's file format gives it."""
        params = {}
        for name, module in model.named_modules():
            if isinstance(module, LoraLinear):
                params[f"{PEFT_PREFIX}{name}.lora_A.weight"] = module.lora_A
                params[f"{PEFT_PREFIX}{name}.lora_B.weight"] = module.lora_B
        for key, value in model.classifier.state_dict(keep_vars=True).items():
            params[f"{PEFT_PREFIX}classifier.{key}"] = value
        return params

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self._params(model).items()}

    def load_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        params = self._params(model)
        if set(params) != set(state):
            raise RuntimeError(f"adapter does not fit: missing {sorted(set(params) - set(state))[:3]}, "
                               f"unexpected {sorted(set(state) - set(params))[:3]}")
        with torch.no_grad():
            for key, value in state.items():
                params[key].copy_(value)

    def save(self, model: nn.Module, path: Path) -> None:
        import peft  # only for its config file format; see lorafit.methods

        c = self.cfg
        config = peft.LoraConfig(r=c.rank, lora_alpha=c.alpha, lora_dropout=c.dropout, target_modules=self.adapted,
                                 modules_to_save=["classifier"], inference_mode=True)
        config.base_model_name_or_path = getattr(model, "name_or_path", None)
        path.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(str(path))
        state = {k: v.contiguous() for k, v in self.state_dict(model).items()}
        save_file(state, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})

    def load(self, base: nn.Module, path: Path) -> nn.Module:
        config = json.loads((path / "adapter_config.json").read_text())
        targets = config["target_modules"]
        model = self.apply(base, sorted(targets) if isinstance(targets, list) else [targets], total_steps=0)
        self.load_state_dict(model, load_file(str(path / "adapter_model.safetensors")))
        return model

    def merge(self, model: nn.Module) -> nn.Module:
        for name, module in list(model.named_modules()):
            if isinstance(module, LoraLinear):
                _replace(model, name, module.merged())
        return model
