"""Token ids to batches, shared by training, prediction and serving.

Tokenising, the batch orders (length-grouped runs in shuffled megabatches for training, optionally over a
class-balanced draw of the examples; length-sorted for evaluation), the cut of a batch into pieces under a padded-token budget, and padding to tensors.
Pure functions of lengths and ids: no model, no device, no data files.
"""

from __future__ import annotations

import random
from typing import Callable, Iterator

import torch

__all__ = [
    "tokenize",
    "BATCH_ORDER",
    "OLD_BATCH_ORDER",
    "length_grouped_batches",
    "shuffled_length_grouped_batches",
    "class_balanced_draw",
    "class_balanced_batches",
    "sorted_batches",
    "split_by_tokens",
    "collate",
    "iterate",
]


def tokenize(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    return tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]


#: compute.json's `batch_order` of runs lorafit starts now: `length_grouped_batches`. Runs whose compute.json
#: has none began with `shuffled_length_grouped_batches` and resume with it.
BATCH_ORDER = "length_runs"
OLD_BATCH_ORDER = "shuffled"


def length_grouped_batches(lengths: list[int], batch_size: int, rng: random.Random, group: int = 50) -> list[list[int]]:
    """Batches of similar-length examples, in runs of growing length, so padding wastes almost nothing.

    Shuffle, cut into megabatches of `group` batches (fewer where the data holds under 4 x `group` batches, so
    that there are at least 4 megabatches, as transformers does: on under 8 batches of data, batches of random
    lengths), sort each by length and cut it into batches; the megabatches in
    random order, each one's batches shortest first. This is the order of transformers' LengthGroupedSampler
    (which runs longest first). Consecutive batches then often share a shape, which lets kernels built per
    shape be reused: on a Xeon with AMX, whose bf16 products oneDNN builds per shape, a Banking77 LoRA epoch in
    bf16 ran 8-13% faster than with `shuffled_length_grouped_batches`, the order before (and of the runs that
    began with it, which resume with it: `OLD_BATCH_ORDER`).
    """
    group = max(1, min(group, -(-len(lengths) // batch_size) // 4))
    megabatches = _sorted_megabatches(lengths, batch_size, rng, group)
    rng.shuffle(megabatches)
    return [batch for megabatch in megabatches for batch in megabatch]


def shuffled_length_grouped_batches(lengths: list[int], batch_size: int, rng: random.Random,
                                    group: int = 50) -> list[list[int]]:
    """The batches of runs begun before `length_grouped_batches` (compute.json without `batch_order`): shuffle,
    cut into megabatches of `group` batches, sort each by length, cut into batches, shuffle the batch order."""
    batches = [batch for megabatch in _sorted_megabatches(lengths, batch_size, rng, group) for batch in megabatch]
    rng.shuffle(batches)
    return batches


def _sorted_megabatches(lengths: list[int], batch_size: int, rng: random.Random, group: int) -> list[list[list[int]]]:
    """Every index once, shuffled, cut into megabatches of `group` batches, each sorted by length and cut into batches."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    span = batch_size * group
    chunks = [sorted(order[start : start + span], key=lambda i: lengths[i]) for start in range(0, len(order), span)]
    return [[chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)] for chunk in chunks]


def class_balanced_draw(labels: list[int], rng: random.Random) -> list[int]:
    """len(labels) example indices drawn with replacement so that every class is equally likely: each
    draw picks a class uniformly (among those with examples), then one of its examples uniformly."""
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    members = [by_class[label] for label in sorted(by_class)]
    return [rng.choice(rng.choice(members)) for _ in labels]


def class_balanced_batches(lengths: list[int], labels: list[int], batch_size: int, rng: random.Random,
                           group: int = 50, order: Callable[..., list[list[int]]] | None = None) -> list[list[int]]:
    """An epoch over a class-balanced draw (`class_balanced_draw`, as many draws as examples), batched
    by `order` (`length_grouped_batches` by default); an example may appear more than once, a rare one
    usually does."""
    drawn = class_balanced_draw(labels, rng)
    batches = (order or length_grouped_batches)([lengths[i] for i in drawn], batch_size, rng, group)
    return [[drawn[j] for j in batch] for batch in batches]


def sorted_batches(lengths: list[int], batch_size: int, max_tokens: int | None = None) -> list[list[int]]:
    """Evaluation order: by length, so no batch pads much; at most `max_tokens` padded tokens each."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    cut = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return [piece for batch in cut for piece in split_by_tokens(batch, lengths, max_tokens)]


def split_by_tokens(batch: list[int], lengths: list[int], max_tokens: int | None) -> list[list[int]]:
    """`batch` cut, in order, into pieces of at most `max_tokens` padded tokens (rows x longest row).

    A row longer than the budget is a piece of its own; None keeps the batch whole. Activation
    memory grows with padded tokens, so this bounds it; the training loop sums the pieces'
    gradients, which is the whole batch's gradient.
    """
    if max_tokens is None:
        return [batch]
    pieces: list[list[int]] = []
    piece: list[int] = []
    longest = 0
    for i in batch:
        if piece and (len(piece) + 1) * max(longest, lengths[i]) > max_tokens:
            pieces.append(piece)
            piece, longest = [], 0
        piece.append(i)
        longest = max(longest, lengths[i])
    if piece:
        pieces.append(piece)
    return pieces


def collate(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to the longest sequence in the batch -> (input_ids, attention_mask), both (B, T)."""
    longest = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, : len(seq)] = 1
    return input_ids, attention_mask


def iterate(token_ids: list[list[int]], batches: list[list[int]], pad_id: int) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """(batch indices, input_ids, attention_mask) for each batch of `batches`, in order."""
    for batch in batches:
        input_ids, attention_mask = collate([token_ids[i] for i in batch], pad_id)
        yield batch, input_ids, attention_mask
