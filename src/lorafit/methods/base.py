"""The method plug-in contract: a config class and a few hooks the training loop calls.

A method is one file in this package that defines a `MethodConfig` subclass (its settings, with
`name: Literal["<name>"]`) and a `Method` subclass, and calls `register(...)`. The loop never asks
which method runs; it only calls these hooks. `apply` chooses the modules to adapt itself, from the
method's settings (`AdapterMethod`), so callers never resolve targets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from ..models import find_targets

__all__ = ["MethodConfig", "AdapterConfig", "Method", "AdapterMethod", "is_head_param"]


class MethodConfig(BaseModel):
    """Settings shared by every method; each method's own class adds its fields."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    name: str
    """Fine-tuning method (see `lorafit methods`)."""


class Method:
    """Hooks with do-nothing defaults; a method overrides what it needs. Callers start with `apply`;
    a method puts its adapters in place in `inject`, on the modules `resolve_targets` chose.

    `model` below is always the `lorafit.models.SequenceClassifier` (possibly wrapped by peft).
    """

    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]]
    #: Where `save` writes inside the run folder ("adapter" or "model").
    artifact: ClassVar[str] = "adapter"
    #: Peak learning rates a run takes when train.lr / train.head_lr are null: the rates this method was
    #: measured with on Banking77 (bench/methods.py, README "Defaults and why"). None: train.lr for the head.
    default_lr: ClassVar[float] = 2e-3
    default_head_lr: ClassVar[float | None] = 5e-3

    def __init__(self, cfg: MethodConfig):
        self.cfg = cfg
        #: Full names of the modules `apply` adapted (none before it runs, none for full fine-tuning).
        self.adapted: list[str] = []

    # -- before training -------------------------------------------------------------------
    def apply(self, model: nn.Module, targets: list[str] | None = None, total_steps: int = 0) -> nn.Module:
        """Make `model` ready to train and return it; what it adapted is then `self.adapted`.

        `targets`: None (what training does) takes the modules the method's settings select on
        `model` (`resolve_targets`); a list, such as a saved adapter's modules, is used as given.
        `total_steps`: the run's optimiser steps, for step-budgeted methods (AdaLoRA).
        """
        self.adapted = self.resolve_targets(model) if targets is None else list(targets)
        return self.inject(model, self.adapted, total_steps)

    def resolve_targets(self, model: nn.Module) -> list[str]:
        """Full names of the modules this method adapts on `model`: none unless it has adapters."""
        return []

    def inject(self, model: nn.Module, targets: list[str], total_steps: int) -> nn.Module:
        """Put adapters on `targets` and set `requires_grad`; the classifier head must stay trainable."""
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


class AdapterMethod(Method):
    """A method that adds adapters to chosen modules: its settings are an `AdapterConfig`."""

    cfg: AdapterConfig

    def resolve_targets(self, model: nn.Module) -> list[str]:
        return find_targets(model, self.cfg.targets, self.cfg.layers)
