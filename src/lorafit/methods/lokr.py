"""LoKr (Yeh et al., 2023, LyCORIS): the update is a Kronecker product W1 (x) W2 of a small full
matrix and a (low-rank when small enough) second factor, scaled by alpha / rank. peft's LoKr."""

from __future__ import annotations

from typing import Annotated, Literal

import peft
from pydantic import Field

from . import registry
from .base import AdapterConfig
from .peft_common import PeftMethod


class LokrConfig(AdapterConfig):
    name: Literal["lokr"] = "lokr"
    rank: Annotated[int, Field(gt=0)] = 8
    """Rank of the second Kronecker factor when it is decomposed."""
    alpha: Annotated[float, Field(gt=0)] = 16.0
    """Scaling numerator: the update is multiplied by alpha / rank."""
    rank_dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    """Dropout on the update's rows while training."""
    module_dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    """Probability of skipping a whole adapted module for a step."""
    decompose_both: bool = False
    """Also decompose the first Kronecker factor into a low-rank product."""


@registry.register
class Lokr(PeftMethod):
    name = "lokr"
    config_class = LokrConfig

    def peft_config(self, targets: list[str], total_steps: int) -> peft.PeftConfig:
        c = self.cfg
        return peft.LoKrConfig(r=c.rank, alpha=c.alpha, rank_dropout=c.rank_dropout, module_dropout=c.module_dropout,
                               decompose_both=c.decompose_both, target_modules=targets)
