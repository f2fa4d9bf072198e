"""AdaLoRA (Zhang et al., 2023): SVD-shaped updates P diag(E) Q whose ranks are pruned during
training by an importance score, moving a fixed budget to the modules that need it. peft's AdaLoRA,
driven the way peft's own `forward` would if it computed the loss:

- `total_step` comes from the resolved schedule; `tinit`/`tfinal` are fractions of it (< 1) or step
  counts (>= 1), like `train.warmup`;
- `update_and_allocate` runs after every optimiser step, before the gradients are cleared
  (the loop's `on_step_end`);
- the orthogonality penalty on P and Q, which peft adds only when the model returns the loss, is
  added here through `extra_loss`, since lorafit's loop computes its own loss;
- the importance statistics and the rank pattern travel in checkpoints, so a resumed run allocates
  exactly as an uninterrupted one;
- the final per-module ranks go to summary.json and the log.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from ..errors import UserError
from . import registry
from .base import AdapterConfig
from .peft_common import PeftMethod

if TYPE_CHECKING:
    import peft

ADAPTER = "default"
_STATS = ("ipt", "exp_avg_ipt", "exp_avg_unc")


class AdaLoraConfig(AdapterConfig):
    name: Literal["adalora"] = "adalora"
    rank: Annotated[int, Field(gt=0)] = 8
    """Target average rank per module once the budget has been allocated."""
    init_rank: Annotated[int, Field(gt=0)] = 12
    """Rank every module starts with (the budget shrinks from init_rank to rank on average)."""
    alpha: Annotated[float, Field(gt=0)] = 16.0
    """Scaling numerator of the update."""
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.1
    """Dropout on the adapter's input."""
    tinit: Annotated[float, Field(ge=0)] = 0.1
    """Steps of warm-up before pruning starts: a fraction of all steps (< 1) or a count (>= 1)."""
    tfinal: Annotated[float, Field(ge=0)] = 0.2
    """Steps at the end with the final ranks fixed: a fraction of all steps (< 1) or a count (>= 1)."""
    delta_t: Annotated[int, Field(gt=0)] = 10
    """Steps between two budget reallocations."""
    beta1: Annotated[float, Field(gt=0, lt=1)] = 0.85
    """Smoothing of the importance (sensitivity) average."""
    beta2: Annotated[float, Field(gt=0, lt=1)] = 0.85
    """Smoothing of the importance uncertainty."""
    orth_reg_weight: Annotated[float, Field(ge=0)] = 0.5
    """Weight of the orthogonality penalty ||P^T P - I|| + ||Q Q^T - I|| added to the loss."""

    @model_validator(mode="after")
    def _budget_shrinks(self):
        if self.rank > self.init_rank:
            raise ValueError(f"method.rank ({self.rank}) must not exceed method.init_rank ({self.init_rank}); "
                             "AdaLoRA prunes from init_rank down to rank")
        return self


def _steps(value: float, total: int) -> int:
    return round(value * total) if value < 1 else int(value)


@registry.register
class AdaLora(PeftMethod):
    name = "adalora"
    config_class = AdaLoraConfig

    def peft_config(self, targets: list[str], total_steps: int) -> peft.PeftConfig:
        import peft

        c = self.cfg
        tinit, tfinal = _steps(c.tinit, total_steps), _steps(c.tfinal, total_steps)
        if total_steps <= 0 or tinit >= total_steps - tfinal:
            raise UserError(
                f"adalora has no step budget: {total_steps} optimiser steps leave nothing between "
                f"tinit ({tinit}) and tfinal ({tfinal}); raise train.epochs or lower method.tinit / method.tfinal"
            )
        return peft.AdaLoraConfig(
            init_r=c.init_rank, target_r=c.rank, lora_alpha=c.alpha, lora_dropout=c.dropout, target_modules=targets,
            tinit=tinit, tfinal=tfinal, deltaT=c.delta_t, beta1=c.beta1, beta2=c.beta2,
            orth_reg_weight=c.orth_reg_weight, total_step=total_steps,
        )

    # -- inside the loop -------------------------------------------------------------------
    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        """peft's orthogonality term, as `AdaLoraModel.forward` computes it when it owns the loss."""
        if self.cfg.orth_reg_weight == 0 or not model.training:
            return None
        terms = []
        for name, p in model.named_parameters():
            if (".lora_A." in name or ".lora_B." in name) and f".{ADAPTER}" in name and p.requires_grad:
                cov = p @ p.T if ".lora_A." in name else p.T @ p  # (r, r)
                eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
                terms.append(torch.linalg.matrix_norm(cov - eye))  # Frobenius
        return self.cfg.orth_reg_weight * torch.stack(terms).mean() if terms else None

    def on_step_end(self, model: nn.Module, step: int) -> None:
        model.base_model.update_and_allocate(step)

    # -- weights: untruncated in memory, truncated to the kept ranks on disk -----------------
    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def load_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        params = dict(model.named_parameters())
        missing = [n for n, p in params.items() if p.requires_grad and n not in state]
        unexpected = [n for n in state if n not in params]
        if missing or unexpected:
            raise RuntimeError(f"adalora state does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
        with torch.no_grad():
            for n, v in state.items():
                params[n].copy_(v)

    def _kept(self, model: nn.Module) -> dict[str, list[bool]]:
        """Which singular values each module keeps: those of E not pruned to exactly zero."""
        return {n.removeprefix("base_model.model."): (p.detach().view(-1) != 0).tolist()
                for n, p in model.named_parameters() if f".lora_E.{ADAPTER}" in n}

    def save(self, model: nn.Module, path: Path) -> None:
        # Save with the rank pattern the weights really have (pruned E entries are exactly zero), so
        # the truncation peft applies on save drops nothing that contributes. The live pattern is
        # restored afterwards: save_pretrained rewrites the config in place.
        config = model.peft_config[ADAPTER]
        live = copy.deepcopy(config.rank_pattern)
        config.rank_pattern = self._kept(model)
        try:
            with warnings.catch_warnings():  # a module pruned to rank 0 saves zero-sized tensors, by design
                warnings.filterwarnings("ignore", message=".*have invalid shape")
                model.save_pretrained(str(path), safe_serialization=True, save_embedding_layers=False)  # see PeftMethod.save
        finally:
            config.rank_pattern = live

    def load(self, base: nn.Module, path: Path) -> nn.Module:
        with warnings.catch_warnings():  # peft checks AdaLoRA's own rank_pattern as if it were LoRA's
            warnings.filterwarnings("ignore", message="The following rank_pattern keys did not match")
            return super().load(base, path)

    # -- resume ------------------------------------------------------------------------------
    def checkpoint_state(self, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        allocator = model.base_model.rankallocator
        tensors = {f"{stat}/{n}": t.clone() for stat in _STATS for n, t in getattr(allocator, stat).items()}
        return tensors, {"rank_pattern": model.peft_config[ADAPTER].rank_pattern}

    def load_checkpoint_state(self, model: nn.Module, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        allocator = model.base_model.rankallocator
        for stat in _STATS:
            prefix = f"{stat}/"
            setattr(allocator, stat, {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        model.peft_config[ADAPTER].rank_pattern = meta.get("rank_pattern")

    # -- report ------------------------------------------------------------------------------
    def _allocated(self, model: nn.Module) -> dict[str, int]:
        """The allocator's decision at the end of training: kept singular values per module."""
        pattern = model.peft_config[ADAPTER].rank_pattern or {}
        ranks = {}
        for n, p in model.named_parameters():
            if f".lora_E.{ADAPTER}" in n:
                key = n.removeprefix("base_model.model.")
                kept = pattern.get(key, pattern.get(key.removesuffix(f".{ADAPTER}")))
                ranks[_module(key)] = sum(kept) if kept is not None else p.numel()
        return ranks

    def summary(self, model: nn.Module) -> dict[str, Any]:
        """`final_ranks`: what the budget allocated by the end of training. `saved_ranks`: the ranks
        of the saved (best-epoch) adapter -- the same once the best epoch falls in the final phase;
        larger if it fell in the budgeting phase, where pruned values regrow between reallocations
        and are kept so the saved adapter computes exactly what was evaluated."""
        final = self._allocated(model)
        saved = {_module(n): sum(kept) for n, kept in self._kept(model).items()}
        return {"initial_rank": self.cfg.init_rank, "target_rank": self.cfg.rank,
                "final_ranks": final, "final_rank_total": sum(final.values()),
                "saved_ranks": saved, "saved_rank_total": sum(saved.values())}


def _module(param_name: str) -> str:
    """`encoder.encoder.layer.0.attention.self.query.lora_E.default` -> `layer.0.attention.self.query`."""
    name = param_name.split(".lora_E")[0]
    return name[name.index("layer."):] if "layer." in name else name
