"""train.cache_frozen_layers: compute the frozen lower layers once per training example, not every epoch.

When the adapters sit only in the upper layers (`method.layers`), the embeddings and the layers below the
lowest adapted one never change. With their dropout off, what they hand up for a training text is the
same in every epoch, so it is computed once, before the first step (`FrozenLayerCache.build`: length-sorted
batches, no gradients), and each training forward starts at the lowest adapted layer from those stored
states (`FrozenLayerCache.feeding`). A step then costs the upper layers' forward and backward only.

What changes against training without the cache: the frozen layers run without dropout (in eval mode).
Training with the cache equals training without it with those layers in eval mode, up to float
summation order (tested). Validation, test and prediction run the whole model as always.

Supported: encoders with an `embeddings` module and one list of layers (`layer` or `layers`), which each
take the previous layer's hidden states -- BERT, RoBERTa, DistilBERT, ELECTRA and kin. The stored states
are float32, (tokens x hidden size) per example: about 9,000 x 14 x 384 x 4 bytes = 190 MB for Banking77
on all-MiniLM-L6-v2.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from tqdm.auto import tqdm

from . import batching
from .errors import UserError
from .models import _LAYER_INDEX, SequenceClassifier
from .runtime import autocast

__all__ = ["FrozenLayerCache", "lowest_trained_layer"]

log = logging.getLogger(__name__)

def lowest_trained_layer(model: nn.Module) -> int | None:
    """The index of the lowest encoder layer with a trainable parameter (None: no layer trains). Refuses a
    model whose embeddings train: then nothing below the layers is frozen."""
    lowest = None
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if ".embeddings." in f".{name}":
            raise UserError(f"train.cache_frozen_layers: the embeddings train ({name}), so no layer below the adapted "
                            "ones is frozen; use an adapter method with method.layers above the lowest layers")
        match = _LAYER_INDEX.search(name)  # the pattern method.layers selects by
        if match:
            lowest = int(match.group(1)) if lowest is None else min(lowest, int(match.group(1)))
    return lowest


def _encoder_parts(model: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module, str, nn.ModuleList]:
    """(the encoder, its embeddings, the module holding its layer list, the list's attribute name, the list):
    the encoder is `SequenceClassifier.encoder`, wherever a method's wrapper put the classifier."""
    classifier = next((m for m in model.modules() if isinstance(m, SequenceClassifier)), None)
    if classifier is None:
        raise UserError("train.cache_frozen_layers: the model is not lorafit's classifier")
    encoder = classifier.encoder
    model_type = getattr(encoder.config, "model_type", type(encoder).__name__)
    embeddings = getattr(encoder, "embeddings", None)
    lists = [(name, m) for name, m in encoder.named_modules()
             if isinstance(m, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layer", "layers")]
    if not isinstance(embeddings, nn.Module) or len(lists) != 1:
        raise UserError(f"train.cache_frozen_layers: {model_type} encoders are not supported (it needs an `embeddings` "
                        "module and one list of layers, as BERT, RoBERTa and DistilBERT have); turn it off")
    name, layers = lists[0]
    parent = encoder.get_submodule(name.rsplit(".", 1)[0]) if "." in name else encoder
    return encoder, embeddings, parent, name.rsplit(".", 1)[-1], layers


class FrozenLayerCache:
    """The hidden states entering layer `first` of the encoder, for every training example."""

    def __init__(self, model: nn.Module):
        first = lowest_trained_layer(model)
        self._encoder, self.embeddings, self._parent, self._attr, self._layers = _encoder_parts(model)
        if first is None:
            raise UserError("train.cache_frozen_layers: no encoder layer trains, so there is no adapted layer to start from")
        if first == 0:
            raise UserError("train.cache_frozen_layers: the adapters reach layer 0, so no layer is frozen below them; "
                            f"restrict method.layers to upper layers (e.g. {list(range(len(self._layers) // 2, len(self._layers)))})")
        self.first = first
        self._upper = nn.ModuleList(list(self._layers)[first:])
        self._lower = nn.ModuleList(list(self._layers)[:first])
        self._flat: torch.Tensor | None = None  # (all tokens, H): every example's states, one after another
        self._offsets: list[int] = []
        self._lengths: list[int] = []

    @property
    def built(self) -> bool:
        return self._flat is not None

    @property
    def nbytes(self) -> int:
        return 0 if self._flat is None else self._flat.numel() * self._flat.element_size()

    def build(self, tokens: list[list[int]], pad_id: int, device: torch.device, amp: torch.dtype | None,
              max_tokens: int | None, progress: bool = False) -> None:
        """Run the embeddings and the layers below `first` over every training text, in eval mode (no
        dropout) and length-sorted batches, and keep each text's states. The batches depend only on the
        texts' lengths, so a resumed run stores the same floats."""
        started = time.perf_counter()
        lengths = [len(t) for t in tokens]
        order = sorted(range(len(tokens)), key=lambda j: (lengths[j], j))
        pieces = batching.split_by_tokens(order, lengths, max(max_tokens or 4096, max(lengths, default=1)))
        self._offsets = [0] * len(tokens)
        self._lengths = lengths
        offset = 0
        for j in order:
            self._offsets[j] = offset
            offset += lengths[j]
        modes = [(m, m.training) for m in (self.embeddings, *self._lower)]
        for m, _ in modes:
            m.eval()
        try:
            with torch.no_grad(), self._only(self._lower), autocast(device, amp):
                for piece in tqdm(pieces, desc=f"frozen layers 0-{self.first - 1}", unit="batch", disable=not progress,
                                  leave=False):
                    input_ids, attention_mask = batching.collate([tokens[j] for j in piece], pad_id)  # (b, T)
                    out = self._encoder(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
                    states = out.last_hidden_state.float()  # (b, T, H): what layer `first` receives
                    if self._flat is None:
                        self._flat = torch.empty(offset, states.shape[-1], dtype=torch.float32, device=device)
                    for row, j in enumerate(piece):
                        self._flat[self._offsets[j]:self._offsets[j] + lengths[j]] = states[row, :lengths[j]]
        finally:
            for m, mode in modes:
                m.train(mode)
        log.info("cached the states entering layer %d for %d training texts: %.0f MB in %.1f s", self.first, len(tokens),
                 self.nbytes / 2**20, time.perf_counter() - started)

    @contextmanager
    def feeding(self, rows: list[int]) -> Iterator[None]:
        """Within this block the model starts at layer `first` from the stored states of training examples
        `rows` (in the order of the batch's rows, padded as `batching.collate` pads): its embeddings
        hand them up and the layers below are skipped."""
        if self._flat is None:
            raise RuntimeError("FrozenLayerCache.feeding before build")
        states = pad_sequence([self._flat[self._offsets[j]:self._offsets[j] + self._lengths[j]] for j in rows],
                              batch_first=True)  # (b, T, H), zeros after each text's end
        self.embeddings.forward = lambda *args, **kwargs: states  # an instance attribute shadows the class's forward
        try:
            with self._only(self._upper):
                yield
        finally:
            del self.embeddings.forward

    @contextmanager
    def _only(self, layers: nn.ModuleList) -> Iterator[None]:
        """The encoder runs `layers` in place of its whole list of layers."""
        self._parent._modules[self._attr] = layers
        try:
            yield
        finally:
            self._parent._modules[self._attr] = self._layers
