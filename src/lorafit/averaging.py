"""train.ema: an exponential moving average of the trained weights, the copy a run is judged and saved by.

After every classification optimiser step the average moves towards the weights:
    average <- d * average + (1 - d) * weights,   d = min(train.ema, (1 + n) / (10 + n))
n counting the updates so far (the ramp of TensorFlow's ExponentialMovingAverage with num_updates: the
first steps' weights, far from trained, fade fast instead of lingering for 1 / (1 - train.ema) steps).
The optimiser keeps stepping the raw weights; validation, the best epoch's state and artifact, and
therefore test and every post-hoc fit, see the average (`applied`).

Only the trainable parameters are averaged (the frozen base never moves), in their own dtype, with
`torch._foreach_lerp_` (one fused pass). torch.optim.swa_utils.AveragedModel would deep-copy the whole
model, frozen base included (a second bert-base for a LoRA run), and average buffers the run does not train.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["WeightAverage"]


class WeightAverage:
    """The moving average of a model's trainable parameters (those with requires_grad when built)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.average: list[torch.Tensor] | None = None  # None until `start`
        self.updates = 0

    @property
    def started(self) -> bool:
        return self.average is not None

    def start(self) -> None:
        """The average begins as the weights now (before the first classification step)."""
        self.average = [p.detach().clone() for p in self.params]
        self.updates = 0

    def factor(self) -> float:
        """d of the next update."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        """One step of the average towards the current weights (after an optimiser step)."""
        assert self.average is not None, "start() first"
        torch._foreach_lerp_(self.average, [p.detach() for p in self.params], 1.0 - self.factor())
        self.updates += 1

    @contextmanager
    @torch.no_grad()
    def applied(self) -> Iterator[None]:
        """The model holds the averaged weights inside the block, its own ones again after it."""
        if self.average is None:
            yield
            return
        own = [p.detach().clone() for p in self.params]
        for p, a in zip(self.params, self.average):
            p.copy_(a)
        try:
            yield
        finally:
            for p, o in zip(self.params, own):
                p.copy_(o)

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, JSON-able data) for a checkpoint; no tensors before `start`."""
        tensors = {} if self.average is None else dict(zip(self.names, self.average))  # written at once: no copy
        return tensors, {"updates": self.updates, "started": self.started}

    def load(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        if not meta.get("started"):
            self.average, self.updates = None, 0
            return
        missing = [n for n in self.names if n not in tensors]
        if missing:
            raise RuntimeError(f"the checkpoint's weight average lacks {missing[:3]}")
        self.average = [tensors[n].to(p.device, p.dtype).clone() for n, p in zip(self.names, self.params)]
        self.updates = int(meta["updates"])
