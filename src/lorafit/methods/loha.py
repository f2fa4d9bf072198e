"""LoHa (Hyeon-Woo et al., 2022, FedPara): the update is the Hadamard product of two low-rank
products, (B1 A1) * (B2 A2), scaled by alpha / rank. peft's LoHa."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field

from . import registry
from .base import AdapterConfig
from .peft_common import PeftMethod

if TYPE_CHECKING:
    import peft


class LohaConfig(AdapterConfig):
    name: Literal["loha"] = "loha"
    rank: Annotated[int, Field(gt=0)] = 8
    """Rank of each of the two factors."""
    alpha: Annotated[float, Field(gt=0)] = 16.0
    """Scaling numerator: the update is multiplied by alpha / rank."""
    rank_dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    """Dropout on the update's rows while training."""
    module_dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    """Probability of skipping a whole adapted module for a step."""


@registry.register
class Loha(PeftMethod):
    name = "loha"
    config_class = LohaConfig

    def peft_config(self, targets: list[str], total_steps: int) -> peft.PeftConfig:
        import peft

        c = self.cfg
        return peft.LoHaConfig(r=c.rank, alpha=c.alpha, rank_dropout=c.rank_dropout, module_dropout=c.module_dropout,
                               target_modules=targets)
