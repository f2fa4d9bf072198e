"""Shared plumbing for methods whose engine is peft: inject, save, load, merge.

A peft method only says which `peft.PeftConfig` its settings make (`peft_config`); everything else
here is common, so what lorafit saves loads in plain peft unchanged. peft is imported inside the
hooks, never at module level: the config tree imports every method module for its settings class
and must not load peft (see `lorafit.methods`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .base import AdapterMethod

if TYPE_CHECKING:
    from peft import PeftConfig

__all__ = ["PeftMethod"]


class PeftMethod(AdapterMethod):
    artifact = "adapter"

    def peft_config(self, targets: list[str], total_steps: int) -> PeftConfig:
        raise NotImplementedError

    def inject(self, model: nn.Module, targets: list[str], total_steps: int) -> nn.Module:
        from peft import get_peft_model

        config = self.peft_config(targets, total_steps)
        # The head is new and task-specific: it trains and is saved with the adapter.
        config.modules_to_save = ["classifier"]
        config.base_model_name_or_path = getattr(model, "name_or_path", None)
        return get_peft_model(model, config)

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(model, save_embedding_layers=False)  # see save()
        return {k: v.detach().clone() for k, v in state.items()}

    def load_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, state)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise RuntimeError(f"adapter state has keys the model lacks: {unexpected[:5]}")

    def save(self, model: nn.Module, path: Path) -> None:
        # Targets are linear layers only, never embeddings; saying so spares peft its check of the
        # base's vocabulary, a hub request now that adapters name their base by hub id (models.hub_id).
        model.save_pretrained(str(path), safe_serialization=True, save_embedding_layers=False)

    def load(self, base: nn.Module, path: Path) -> nn.Module:
        from peft import PeftModel

        return PeftModel.from_pretrained(base, str(path))

    def merge(self, model: nn.Module) -> nn.Module:
        return model.merge_and_unload()
