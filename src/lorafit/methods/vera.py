"""VeRA (Kopiczko et al., 2024): one pair of frozen random matrices A, B shared by every adapted
layer; each layer trains only two scaling vectors, d (rank) and b (out features). peft's VeRA."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field

from . import registry
from .base import AdapterConfig
from .peft_common import PeftMethod

if TYPE_CHECKING:
    import peft


class VeraConfig(AdapterConfig):
    name: Literal["vera"] = "vera"
    rank: Annotated[int, Field(gt=0)] = 256
    """Rank of the shared random projections (VeRA uses high ranks: only d and b train)."""
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    """Dropout on the adapter's input."""
    d_initial: Annotated[float, Field(gt=0)] = 0.1
    """Initial value of the d scaling vector (b starts at zero)."""
    projection_seed: int = 0
    """Seed of the shared random A and B (saved with the adapter)."""


@registry.register
class Vera(PeftMethod):
    name = "vera"
    config_class = VeraConfig
    default_lr = 1e-2

    def peft_config(self, targets: list[str], total_steps: int) -> peft.PeftConfig:
        import peft

        c = self.cfg
        return peft.VeraConfig(r=c.rank, vera_dropout=c.dropout, d_initial=c.d_initial, target_modules=targets,
                               projection_prng_key=c.projection_seed, save_projection=True)
