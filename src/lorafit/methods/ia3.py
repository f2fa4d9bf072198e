"""(IA)^3 (Liu et al., 2022): learned vectors rescale activations. Attention targets scale their
output; feed-forward targets (the `ffn` group) scale their input, as in the paper. peft's IA3."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from torch import nn

from ..errors import UserError
from ..models import find_targets
from . import registry
from .base import AdapterConfig
from .peft_common import PeftMethod

if TYPE_CHECKING:
    import peft


class IA3Config(AdapterConfig):
    name: Literal["ia3"] = "ia3"


@registry.register
class IA3(PeftMethod):
    name = "ia3"
    config_class = IA3Config
    default_lr = 1e-2

    def inject(self, model: nn.Module, targets: list[str], total_steps: int) -> nn.Module:
        try:
            ffn = set(find_targets(model, ["ffn"], None))
        except UserError:  # no ffn group known for this architecture: scale outputs everywhere
            ffn = set()
        self._feedforward = [t for t in targets if t in ffn]
        return super().inject(model, targets, total_steps)

    def peft_config(self, targets: list[str], total_steps: int) -> peft.PeftConfig:
        import peft

        return peft.IA3Config(target_modules=targets, feedforward_modules=self._feedforward)
