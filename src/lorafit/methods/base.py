"""The method plug-in contract: a config class and a few hooks the training loop calls.

A method is one file in this package that defines a `MethodConfig` subclass (its settings, with
`name: Literal["<name>"]`) and a `Method` subclass, and calls `register(...)`. The loop never asks
which method runs; it only calls these hooks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

__all__ = ["MethodConfig", "Method"]


class MethodConfig(BaseModel):
    """Settings shared by every method; each method's own class adds its fields."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    name: str
    """Fine-tuning method (see `lorafit methods`)."""


class Method:
    """Hooks with do-nothing defaults; a method overrides what it needs.

    `model` below is always the `lorafit.models.SequenceClassifier` (possibly wrapped by peft).
    """

    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]]
    #: Where `save` writes inside the run folder ("adapter" or "model").
    artifact: ClassVar[str] = "adapter"

    def __init__(self, cfg: MethodConfig):
        self.cfg = cfg

    # -- before training -------------------------------------------------------------------
    def apply(self, model: nn.Module, targets: list[str], total_steps: int) -> nn.Module:
        """Inject adapters and set `requires_grad`; the classifier head must stay trainable."""
        raise NotImplementedError

    def param_groups(self, model: nn.Module, lr: float, head_lr: float) -> list[dict[str, Any]]:
        """Trainable parameters as optimiser groups `{"name", "params", "lr"}`.

        Default: the new classification head at `head_lr`, everything else trainable at `lr`.
        A method with its own learning-rate rule (LoRA+ for B, say) overrides this.
        """
        body, head = [], []
        for name, p in model.named_parameters():
            if p.requires_grad:
                (head if is_head_param(name) else body).append(p)
        return [{"name": "body", "params": body, "lr": lr}, {"name": "head", "params": head, "lr": head_lr}]

    # -- inside the loop -------------------------------------------------------------------
    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        """A term added to the task loss before backward (AdaLoRA's orthogonality, say)."""
        return None

    def on_step_end(self, model: nn.Module, step: int) -> None:
        """Called after each optimiser step, after backward and before zero_grad."""

    # -- after training --------------------------------------------------------------------
    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """What `save` writes, as tensors (used to keep the best epoch in memory)."""
        raise NotImplementedError

    def load_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def save(self, model: nn.Module, path: Path) -> None:
        """Write the trained weights to `path` (a folder that does not exist yet)."""
        raise NotImplementedError

    def load(self, base: nn.Module, path: Path) -> nn.Module:
        """Rebuild the trained model from `save`'s folder on top of a freshly built base."""
        raise NotImplementedError

    def merge(self, model: nn.Module) -> nn.Module:
        """Fold the adapter into the base weights; returns a model with no adapter modules."""
        return model

    def checkpoint_state(self, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Method state beyond the weights that a resumed run needs (AdaLoRA's importance
        scores, say), as (tensors, JSON-able data). Default: none."""
        return {}, {}

    def load_checkpoint_state(self, model: nn.Module, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Restore what `checkpoint_state` returned."""

    def summary(self, model: nn.Module) -> dict[str, Any]:
        """Method-specific figures for summary.json (AdaLoRA's final ranks, say)."""
        return {}


def is_head_param(name: str) -> bool:
    """The classification head is the new, randomly initialised part: it gets its own lr."""
    return ".classifier." in f".{name}."


class AdapterConfig(MethodConfig):
    """Settings every adapter method shares: where the adapters go."""

    targets: list[str] = ["attention", "ffn"]
    """Modules to adapt: groups (attention, ffn, all-linear), module names (query, value,
    q_lin, ...) or regular expressions on full module names written re:<pattern>."""
    layers: list[int] | None = None
    """Encoder layer indices to adapt (0-based); null adapts every layer."""
