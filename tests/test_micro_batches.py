"""train.max_batch_tokens: batches over the token budget run in pieces whose gradients add up to
the whole batch's, so training ends where whole batches end (up to float summation order)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import assert_same_training, dropout_free_overrides, piece_counts
from lorafit import batching
from lorafit.config import load_config
from lorafit.errors import UserError
from lorafit.inference import batched_logits
from lorafit.runtime import token_budget
from lorafit.train import train


@given(st.lists(st.integers(1, 40), min_size=1, max_size=60), st.integers(1, 200))
def test_pieces_keep_the_batch_in_order_within_the_budget(lengths, budget):
    batch = list(range(len(lengths)))
    random.Random(len(lengths)).shuffle(batch)
    pieces = batching.split_by_tokens(batch, lengths, budget)
    assert [i for piece in pieces for i in piece] == batch
    for k, piece in enumerate(pieces):
        padded = len(piece) * max(lengths[i] for i in piece)
        assert padded <= budget or len(piece) == 1  # a row over the budget goes alone
        if k + 1 < len(pieces):  # greedy: the next row would not have fitted
            grown = piece + pieces[k + 1][:1]
            assert len(grown) * max(lengths[i] for i in grown) > budget
    assert batching.split_by_tokens(batch, lengths, None) == [batch]


def test_sorted_batches_respect_rows_and_tokens():
    lengths = [random.Random(i).randint(1, 30) for i in range(200)]
    batches = batching.sorted_batches(lengths, 16, max_tokens=100)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(200)) and [lengths[i] for i in flat] == sorted(lengths)
    assert all(len(b) <= 16 and len(b) * max(lengths[i] for i in b) <= 100 for b in batches)
    assert len(batches) > len(batching.sorted_batches(lengths, 16))  # the budget did cut some


def test_auto_budget_bounds_cpu_memory_and_keeps_gpu_batches_whole():
    assert token_budget("auto", torch.device("cpu")) == 1024
    assert token_budget("auto", torch.device("cuda")) is None
    assert token_budget(300, torch.device("cuda")) == 300 and token_budget(None, torch.device("cpu")) is None
    assert load_config(None, []).train.max_batch_tokens == "auto"
    assert load_config(None, ["train.max_batch_tokens=512"]).train.max_batch_tokens == 512
    for bad, shown in (("0", "0"), ("abc", "'abc'"), ("1.5", "1.5"), ("true", "True")):
        with pytest.raises(UserError) as caught:
            load_config(None, [f"train.max_batch_tokens={bad}"])
        assert str(caught.value) == f"config error: train.max_batch_tokens: give a number of tokens above 0, auto or null (got {shown})"


def test_evaluation_logits_do_not_depend_on_the_budget(tiny_bert):
    from lorafit.config import ModelConfig
    from lorafit.models import build_classifier

    model = build_classifier(ModelConfig(name=str(tiny_bert)), 3, seed=0).eval()
    rng = random.Random(0)
    tokens = [[rng.randint(5, 20) for _ in range(rng.randint(1, 25))] for _ in range(70)]

    def backend(input_ids, attention_mask):
        with torch.inference_mode():
            return model(input_ids, attention_mask).numpy()

    whole = batched_logits(backend, tokens, 0, 64)
    pieces = batched_logits(backend, tokens, 0, 64, max_tokens=40)
    np.testing.assert_allclose(pieces, whole, atol=1e-5)


@pytest.mark.parametrize("method,extra", [
    ("lora", {"train.grad_accum": 2}),
    ("full", {"train.lr": 1e-3}),
    ("adalora", {"method.init_rank": 6}),  # its orthogonality penalty counts once per batch, not per piece
    # a step's weighted mean: each piece's class-weighted focal sum over the step's summed class weights
    ("lora", {"train.grad_accum": 2, "train.class_weights": "{food: 3.0, sport: 0.5}", "train.loss": "focal",
              "train.label_smoothing": 0.1, "train.sampler": "class_balanced"}),
])
def test_pieces_train_like_whole_batches(tmp_path, method, extra):
    overrides = dropout_free_overrides(tmp_path, method, **extra)
    whole = load_config(None, [*overrides, "train.max_batch_tokens=null"])
    train(whole, tmp_path / "whole")
    cut = load_config(None, [*overrides, "train.max_batch_tokens=24"])
    train(cut, tmp_path / "cut")

    # The budget really cut: more than half the batches of both epochs ran in several pieces.
    for epoch in (1, 2):
        counts = piece_counts(cut, epoch=epoch)
        assert sum(c > 1 for (c,) in counts) > len(counts) / 2
    assert_same_training(tmp_path / "whole", tmp_path / "cut", "model" if method == "full" else "adapter", tolerance=1e-4)
