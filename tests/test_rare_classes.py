"""Rare classes: train.class_weights, train.loss=focal and train.sampler=class_balanced.

The loss is checked against torch's weighted cross-entropy and the focal loss formula, its step
normaliser over micro-batches and processes, the sampler's class frequencies and determinism, a
resume that ends bit for bit like the uninterrupted run, and the bad inputs. That pieces, gradient
accumulation and two processes train like whole batches with these options is checked where those
equivalences are (test_micro_batches.py, test_train_steps.py, test_distributed.py)."""

from __future__ import annotations

import importlib
import math
import random
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from sklearn.utils.class_weight import compute_class_weight

from lorafit import batching
from lorafit.config import TrainConfig, load_config
from lorafit.distributed import World
from lorafit.errors import UserError
from lorafit.job import class_weights
from lorafit.train import sum_training_loss, resume, train

from conftest import assert_same_adapter_run, crash_after_step, tiny_overrides, train_fails_cleanly

WEIGHTS = torch.tensor([0.5, 2.0, 1.0, 3.5])


def _batch(n: int = 13, classes: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, classes, generator=g) * 2, torch.randint(0, classes, (n,), generator=g)


def _value_and_grad(fn, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = logits.clone().requires_grad_(True)
    value = fn(leaf)
    value.backward()
    return value.detach(), leaf.grad


# -- the loss -------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [1, 2, 3])
def test_weighted_loss_of_a_step_is_torchs_weighted_mean(size):
    """sum_i w_yi * loss_i / sum_i w_yi over the step, however the step is cut (here over `size`
    processes, each slice weighted by World.shard, as DDP averages them), equals
    F.cross_entropy(weight=w, reduction='mean') on the whole batch: value and gradient."""
    logits, y = _batch()
    step_weight = math.fsum(WEIGHTS.double()[y].tolist())
    cfg = TrainConfig(label_smoothing=0.0)

    def ours(leaf):
        shards = [World(rank, size).shard(list(range(len(y))), step_weight) for rank in range(size)]
        return sum(sum_training_loss(leaf[mine], y[mine], cfg, WEIGHTS) * weight for mine, weight in shards) / size

    value, grad = _value_and_grad(ours, logits)
    expected, expected_grad = _value_and_grad(lambda leaf: F.cross_entropy(leaf, y, weight=WEIGHTS, reduction="mean"), logits)
    torch.testing.assert_close(value, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("loss", ["ce", "focal"])
def test_a_training_step_takes_the_weighted_mean_over_its_batches_and_pieces(tmp_path, loss):
    """The loop itself (train._forward_backward): a step of two uneven micro-batches (grad_accum=2), each
    run in token-budget pieces, leaves the gradient of the step's weighted mean, sum_i w_yi * loss_i /
    sum_i w_yi over both batches -- for ce, torch's F.cross_entropy(weight=w) on one big batch."""
    from conftest import dropout_free_overrides
    from lorafit.job import prepare
    from lorafit.rundir import RunDir

    train_module = importlib.import_module("lorafit.train")
    overrides = dropout_free_overrides(tmp_path, "full", **{
        "train.grad_accum": 2, "train.max_batch_tokens": 24, "train.class_weights": "{food: 3.0, sport: 0.5}",
        "train.loss": loss, "train.focal_gamma": 1.5})
    job = prepare(load_config(None, overrides), RunDir(tmp_path / "run"))
    job.model.train()
    lengths = [len(t) for t in job.tokens["train"]]
    batches = [list(range(0, 7)), list(range(7, 40))]
    losses = [train_module._forward_backward(job, batches, i, lengths, boundary=i == 1)[0] for i in (0, 1)]
    assert len(batching.split_by_tokens(batches[1], lengths, job.max_tokens)) > 1  # pieces really ran
    got = {name: p.grad.clone() for name, p in job.model.named_parameters() if p.grad is not None}

    job.model.zero_grad(set_to_none=True)
    both = batches[0] + batches[1]
    input_ids, attention_mask = batching.collate([job.tokens["train"][j] for j in both], job.pad_id)
    logits = job.model(input_ids, attention_mask)
    y = torch.as_tensor(job.targets["train"][both])
    w = torch.as_tensor(job.class_weights, dtype=torch.float32)
    assert sorted(set(w[y].tolist())) == [0.5, 1.0, 3.0]
    if loss == "ce":
        expected = F.cross_entropy(logits, y, weight=w)
    else:
        p_t = torch.softmax(logits, -1)[torch.arange(len(y)), y]
        expected = (w[y] * (1 - p_t) ** 1.5 * F.cross_entropy(logits, y, reduction="none")).sum() / w[y].sum()
    expected.backward()
    assert sum(losses) / float(w[y].sum()) == pytest.approx(float(expected.detach()), rel=1e-5)
    for name, p in job.model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_unweighted_cross_entropy_is_the_plain_sum():
    logits, y = _batch()
    cfg = TrainConfig(label_smoothing=0.1)
    assert torch.equal(sum_training_loss(logits, y, cfg, None), F.cross_entropy(logits, y, label_smoothing=0.1, reduction="sum"))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("weights", [None, WEIGHTS])
def test_focal_with_gamma_zero_is_cross_entropy(smoothing, weights):
    logits, y = _batch()
    focal = TrainConfig(loss="focal", focal_gamma=0.0, label_smoothing=smoothing)
    ce = TrainConfig(label_smoothing=smoothing)
    value, grad = _value_and_grad(lambda leaf: sum_training_loss(leaf, y, focal, weights), logits)
    expected, expected_grad = _value_and_grad(lambda leaf: sum_training_loss(leaf, y, ce, weights), logits)
    torch.testing.assert_close(value, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("gamma", [0.5, 2.0, 5.0])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_focal_loss_is_lin_et_al_with_class_weights_as_alpha(gamma, smoothing):
    """FL_i = alpha_yi * (1 - p_t)^gamma * CE_i, computed here in float64 from the softmax; with label
    smoothing CE_i is the smoothed cross-entropy (the field's documented choice), p_t the true class's."""
    logits, y = _batch(n=40, classes=4, seed=1)
    got = sum_training_loss(logits, y, TrainConfig(loss="focal", focal_gamma=gamma, label_smoothing=smoothing), WEIGHTS)
    log_p = torch.log_softmax(logits.double(), dim=-1)  # (b, C)
    log_p_t = log_p[torch.arange(len(y)), y]
    smoothed = -(1 - smoothing) * log_p_t - smoothing * log_p.mean(-1)
    expected = (WEIGHTS.double()[y] * (1 - log_p_t.exp()) ** gamma * smoothed).sum()
    assert float(got) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_focal_gradient_stays_finite_on_a_perfectly_fitted_example(gamma):
    """p_t rounds to 1 in float32: (1 - p_t)^gamma has an infinite slope at 0 when gamma < 1."""
    logits = torch.tensor([[200.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    y = torch.tensor([0, 1])
    value, grad = _value_and_grad(lambda leaf: sum_training_loss(leaf, y, TrainConfig(loss="focal", focal_gamma=gamma, label_smoothing=0.0), None), logits)
    assert torch.isfinite(value) and torch.isfinite(grad).all()
    assert grad[1].abs().sum() > 0


# -- resolving train.class_weights -----------------------------------------------------------------

def test_balanced_weights_are_sklearns_and_a_mapping_defaults_to_one():
    names = ["anger", "joy", "love", "surprise"]
    ids = [0] * 50 + [1] * 30 + [2] * 15 + [3] * 5
    expected = compute_class_weight("balanced", classes=np.arange(4), y=np.array(ids))
    np.testing.assert_allclose(class_weights("balanced", names, ids), expected, rtol=1e-15)
    assert class_weights("none", names, ids) is None
    np.testing.assert_array_equal(class_weights({"love": 3.0, "surprise": 5.0}, names, ids), [1.0, 1.0, 3.0, 5.0])
    with pytest.raises(UserError, match=r"names labels the training data does not have: 'suprise'; its labels are: anger, joy, love, surprise$"):
        class_weights({"suprise": 5.0}, names, ids)


# -- the class-balanced sampler --------------------------------------------------------------------

def test_class_balanced_epochs_draw_every_class_alike():
    labels = [0] * 900 + [1] * 90 + [2] * 10
    lengths = [random.Random(i).randint(3, 40) for i in range(len(labels))]
    counts: Counter = Counter()
    for epoch in range(1, 6):
        batches = batching.class_balanced_batches(lengths, labels, 16, random.Random(epoch))
        drawn = [i for b in batches for i in b]
        assert len(drawn) == len(labels) and all(0 < len(b) <= 16 for b in batches)
        assert batches == batching.class_balanced_batches(lengths, labels, 16, random.Random(epoch))  # seed and epoch alone
        counts.update(labels[i] for i in drawn)
        # grouped by length as the length-grouped sampler does: little padding
        padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
        assert padded < 1.15 * sum(lengths[i] for i in drawn)
    # 5000 draws, each class 1/3: a binomial sd of 33, so +-200 is 6 sd
    assert all(abs(counts[c] - 5000 / 3) < 200 for c in range(3)), counts
    assert len({i for i, label in enumerate(labels) if label == 2} - set(drawn)) == 0  # the 10 rare ones all drawn
    assert batching.class_balanced_batches(lengths, labels, 16, random.Random(1)) != batches


# -- a run ------------------------------------------------------------------------------------------

EXTRA = {"train.epochs": 3, "train.checkpoint_every": 3, "train.keep_checkpoints": 2, "method.dropout": 0.1,
         "train.lr": 1e-2, "train.cpu_kernels": "stock", "train.sampler": "class_balanced", "train.loss": "focal",
         "train.class_weights": "{food: 3.0, sport: 0.5}", "train.label_smoothing": 0.1}


def test_class_balanced_focal_weighted_run_resumes_bit_for_bit_and_records_its_weights(tiny_bert, tiny_data, tmp_path, monkeypatch):
    """Interrupted mid-epoch 2 (after the checkpoint at step 12, epoch 1 being 14 steps) and resumed:
    the resumed epoch draws the same class-balanced batches, and the run ends as the uninterrupted one."""
    overrides = tiny_overrides(tiny_bert, tiny_data, **EXTRA)
    reference = train(load_config(None, overrides), tmp_path / "reference")
    derived = yaml.safe_load((reference.path / "config.yaml").read_text())["derived"]
    assert derived["class_weights"] == {"food": 3.0, "sport": 0.5, "travel": 1.0}
    assert reference.summary["steps"] == 3 * 14

    crash_after_step(overrides, tmp_path / "killed", monkeypatch, step=20)
    assert (tmp_path / "killed" / "checkpoints" / "step-00000018").is_dir()
    resume(tmp_path / "killed")
    assert_same_adapter_run(reference.path, tmp_path / "killed")


# -- bad inputs: one line, exit 2, nothing written ---------------------------------------------------

@pytest.mark.parametrize("key, value, message", [
    ("train.class_weights", "{food: 2, pizza: 3}",
     "train.class_weights names labels the training data does not have: 'pizza'; its labels are: food, sport, travel"),
    ("train.class_weights", "{food: -1}", "train.class_weights: each weight must be a finite number above 0 (not so for 'food')"),
    ("train.class_weights", "{food: 0, sport: 2}", "train.class_weights: each weight must be a finite number above 0 (not so for 'food')"),
    ("train.class_weights", "{food: .inf}", "train.class_weights: each weight must be a finite number above 0 (not so for 'food')"),
    ("train.class_weights", "heavy", "train.class_weights: give none, balanced or a mapping {label: weight} (got 'heavy')"),
    ("train.focal_gamma", "-0.5", "train.focal_gamma: Input should be greater than or equal to 0 (got -0.5)"),
    ("train.loss", "dice", "train.loss: Input should be 'ce' or 'focal' (got 'dice')"),
    ("train.sampler", "oversample", "train.sampler: Input should be 'length_grouped' or 'class_balanced' (got 'oversample')"),
])
def test_bad_rare_class_settings_fail_before_any_work(tiny_bert, tiny_data, tmp_path, capsys, key, value, message):
    line = train_fails_cleanly(capsys, tmp_path / "run", tiny_overrides(tiny_bert, tiny_data, **{"train.epochs": 1, key: value}))
    assert message in line, line
