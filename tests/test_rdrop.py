"""R-Drop (train.rdrop): the loss against Liang et al. 2021's formula, the loop running each example
twice with its own dropout masks within half the token budget, a run without dropout training exactly
like a run without R-Drop, and a killed run resuming bit for bit."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from lorafit import batching
from lorafit.config import TrainConfig, load_config
from lorafit.train import resume, sum_rdrop_loss, sum_training_loss, train

from conftest import (assert_same_adapter_run, assert_same_training, crash_after_step, dropout_free_overrides,
                      tiny_overrides)

WEIGHTS = torch.tensor([0.5, 2.0, 1.0, 3.5])


def _pair(n: int = 17, classes: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    first = torch.randn(n, classes, generator=g) * 2
    return first, first + torch.randn(n, classes, generator=g), torch.randint(0, classes, (n,), generator=g)


@pytest.mark.parametrize("alpha", [0.5, 4.0])
@pytest.mark.parametrize("loss,smoothing,weights", [("ce", 0.0, None), ("ce", 0.1, WEIGHTS), ("focal", 0.1, WEIGHTS)])
def test_rdrop_loss_is_liang_et_al_halved(alpha, loss, smoothing, weights):
    """Per example w_y * [(l_1 + l_2) / 2 + alpha / 4 * (KL(p1||p2) + KL(p2||p1))], the KLs from torch's
    F.kl_div in float64 and l_k the example's training loss in pass k (sum_training_loss of that row)."""
    first, second, y = _pair()
    cfg = TrainConfig(rdrop=alpha, loss=loss, label_smoothing=smoothing)
    got = sum_rdrop_loss(first, second, y, cfg, weights)
    log_p1, log_p2 = F.log_softmax(first.double(), -1), F.log_softmax(second.double(), -1)
    kl = (F.kl_div(log_p2, log_p1, log_target=True, reduction="none").sum(-1)  # KL(p1 || p2)
          + F.kl_div(log_p1, log_p2, log_target=True, reduction="none").sum(-1))
    per_pass = [torch.stack([sum_training_loss(logits[i:i + 1], y[i:i + 1], cfg, None) for i in range(len(y))]).double()
                for logits in (first, second)]
    w = torch.ones(len(y), dtype=torch.float64) if weights is None else weights.double()[y]
    expected = (w * ((per_pass[0] + per_pass[1]) / 2 + alpha / 4 * kl)).sum()
    assert float(got) == pytest.approx(float(expected), rel=1e-5)
    assert float(got) > float((w * (per_pass[0] + per_pass[1]) / 2).sum()) + 1e-3  # the KL term is there


def test_rdrop_distils_both_passes():
    """With a teacher each pass's loss is the distillation mix (`sum_training_loss` with the teacher)."""
    from lorafit.config import DistillConfig

    first, second, y = _pair()
    teacher = torch.randn(first.shape, generator=torch.Generator().manual_seed(5)) * 3
    cfg, distill = TrainConfig(rdrop=2.0, label_smoothing=0.1), DistillConfig(teacher="t", alpha=0.6, temperature=2.0)
    got = sum_rdrop_loss(first, second, y, cfg, WEIGHTS, teacher, distill)
    without_kl = sum_rdrop_loss(first, second, y, TrainConfig(rdrop=1e-30, label_smoothing=0.1), WEIGHTS, teacher, distill)
    halves = (sum_training_loss(first, y, cfg, WEIGHTS, teacher, distill) + sum_training_loss(second, y, cfg, WEIGHTS, teacher, distill)) / 2
    assert float(without_kl) == pytest.approx(float(halves), rel=1e-5)
    kl_only = got - without_kl
    assert float(kl_only) == pytest.approx(float(sum_rdrop_loss(first, second, y, cfg, WEIGHTS) - sum_rdrop_loss(
        first, second, y, TrainConfig(rdrop=1e-30, label_smoothing=0.1), WEIGHTS)), rel=1e-4)


def test_two_identical_passes_give_the_plain_loss_and_gradient():
    first, _, y = _pair()
    cfg = TrainConfig(rdrop=1.0, label_smoothing=0.1)

    def value_and_grad(fn):
        leaf = first.clone().requires_grad_(True)
        value = fn(leaf)
        value.backward()
        return value.detach(), leaf.grad

    got, got_grad = value_and_grad(lambda leaf: sum_rdrop_loss(leaf, leaf, y, cfg, WEIGHTS))
    expected, expected_grad = value_and_grad(lambda leaf: sum_training_loss(leaf, y, cfg, WEIGHTS))
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(got_grad, expected_grad, rtol=1e-5, atol=1e-7)


def _job(tmp_path, tiny_bert, tiny_data, **extra):
    from lorafit.job import prepare
    from lorafit.rundir import RunDir

    overrides = tiny_overrides(tiny_bert, tiny_data, **{"train.rdrop": 1.0, "method.dropout": 0.1, **extra})
    job = prepare(load_config(None, overrides), RunDir(tmp_path / "run"))
    job.model.train()
    return job, [len(t) for t in job.tokens["train"]]


def test_a_step_runs_each_example_twice_with_its_own_dropout(tiny_bert, tiny_data, tmp_path):
    """The loop (train._forward_backward) leaves the gradient of the R-Drop loss over the batch stacked
    on itself, replayed here from the same random state; the two passes really differ (dropout on)."""
    train_module = importlib.import_module("lorafit.train")
    job, lengths = _job(tmp_path, tiny_bert, tiny_data, **{"train.max_batch_tokens": "null"})
    batch = list(range(11))
    torch.manual_seed(123)
    loss, _ = train_module._forward_backward(job, [batch], 0, lengths, boundary=True)
    got = {name: p.grad.clone() for name, p in job.model.named_parameters() if p.grad is not None}
    assert got

    job.model.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    input_ids, attention_mask = batching.collate([job.tokens["train"][j] for j in batch], job.pad_id)
    logits = job.forward(input_ids.repeat(2, 1), attention_mask.repeat(2, 1)).float()  # (22, C)
    y = torch.as_tensor(job.targets["train"][batch])
    assert (logits[:11] - logits[11:]).abs().max() > 1e-3  # each copy drew its own dropout masks
    expected = sum_rdrop_loss(logits[:11], logits[11:], y, job.cfg.train, None)
    (expected / len(batch)).backward()
    assert loss == pytest.approx(float(expected.detach()), rel=1e-5)
    for name, p in job.model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_both_passes_fit_the_token_budget(tiny_bert, tiny_data, tmp_path, monkeypatch):
    """Stacked, a piece holds half the examples train.max_batch_tokens allows: no forward pass over budget."""
    train_module = importlib.import_module("lorafit.train")
    job, lengths = _job(tmp_path, tiny_bert, tiny_data, **{"train.max_batch_tokens": 40})
    seen = []
    forward = job.forward
    monkeypatch.setattr(job, "forward", lambda ids, mask: (seen.append(tuple(ids.shape)), forward(ids, mask))[1])
    batch = list(range(16))
    train_module._forward_backward(job, [batch], 0, lengths, boundary=True)
    assert len(seen) > 1 and all(rows * width <= 40 for rows, width in seen), seen
    assert sum(rows for rows, _ in seen) == 2 * len(batch)


def test_without_dropout_rdrop_trains_like_plain_cross_entropy(tmp_path):
    """No dropout anywhere: both passes agree, the KL term is 0 and the mean of two equal losses is the
    loss, so whole runs (token-budget pieces, gradient accumulation) match the run without R-Drop."""
    overrides = dropout_free_overrides(tmp_path, "lora", **{"train.grad_accum": 2, "train.max_batch_tokens": 48,
                                                             "train.label_smoothing": 0.1})
    train(load_config(None, overrides), tmp_path / "plain")
    train(load_config(None, [*overrides, "train.rdrop=1.0"]), tmp_path / "rdrop")
    assert_same_training(tmp_path / "plain", tmp_path / "rdrop", "adapter", tolerance=1e-5)
    assert "| regularisation | R-Drop alpha 1.0 |" in (tmp_path / "rdrop" / "README.md").read_text()


def test_rdrop_run_resumes_bit_for_bit(tiny_bert, tiny_data, tmp_path, monkeypatch):
    overrides = tiny_overrides(tiny_bert, tiny_data, **{"train.rdrop": 0.5, "method.dropout": 0.1,
                                                         "train.checkpoint_every": 6})
    reference = train(load_config(None, overrides), tmp_path / "reference")
    crash_after_step(overrides, tmp_path / "killed", monkeypatch, step=reference.summary["steps"] - 3)
    resume(tmp_path / "killed")
    assert_same_adapter_run(reference.path, tmp_path / "killed")
