"""LoKr (Yeh et al., 2023, LyCORIS): the update is a Kronecker product W1 (x) W2 of a small full
matrix and a (low-rank when small enough) second factor, scaled by alpha / rank. peft's LoKr."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field

from . import registry
from .loha import LohaConfig
from .peft_common import PeftMethod

if TYPE_CHECKING:
    import peft


class LokrConfig(LohaConfig):
    """LoHa's settings (rank, alpha, rank and module dropout) plus the Kronecker-specific one."""

    name: Literal["lokr"] = "lokr"
    rank: Annotated[int, Field(gt=0)] = 8
    """Rank of the second Kronecker factor when it is decomposed."""
    decompose_both: bool = False
    """Also decompose the first Kronecker factor into a low-rank product."""


@registry.register
class Lokr(PeftMethod):
    name = "lokr"
    config_class = LokrConfig

    def peft_config(self, targets: list[str], total_steps: int) -> peft.PeftConfig:
        import peft

        c = self.cfg
        return peft.LoKrConfig(r=c.rank, alpha=c.alpha, rank_dropout=c.rank_dropout, module_dropout=c.module_dropout,
                               decompose_both=c.decompose_both, target_modules=targets)
