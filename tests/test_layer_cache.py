"""train.cache_frozen_layers (lorafit/layer_cache.py): training from the stored states of the frozen lower
layers equals training the whole model with those layers in eval mode -- per step (logits, gradients, the
random stream), per run (no encoder dropout, so eval mode changes nothing), and after a kill and resume."""

from __future__ import annotations

import importlib
import json

import pytest
import torch

from lorafit import batching
from lorafit.config import load_config
from lorafit.job import prepare
from lorafit.rundir import RunDir
from lorafit.runtime import autocast
from lorafit.train import resume, train

from conftest import (assert_same_adapter_run, assert_same_training, build_tiny_encoder, crash_after_step,
                      tiny_overrides, train_fails_cleanly, write_dataset)

CACHED = {"train.cache_frozen_layers": "true", "method.layers": "[1]", "method.dropout": 0.1}


def _job(tmp_path, model, data, **extra):
    job = prepare(load_config(None, tiny_overrides(model, data, **{**CACHED, **extra})), RunDir(tmp_path / "run"))
    job.layer_cache.build(job.tokens["train"], job.pad_id, job.device, job.amp, job.max_tokens)
    return job


@pytest.mark.parametrize("arch", ["bert", "distilbert", "roberta"])
@pytest.mark.parametrize("kernels", ["auto", "stock", "bf16"])
def test_a_cached_step_equals_the_whole_model_with_frozen_layers_in_eval(tiny_models, tiny_data, tmp_path, arch, kernels):
    """The loop's forward and backward (`train._forward_backward`) with the cache give the logits' loss and
    gradients of the whole model whose embeddings and layer 0 run in eval mode (dropout on above them, the
    same masks: the random stream is left in the same state). `bf16`: train.precision=bf16 on CPU, the states
    stored from the frozen layers under the autocast the whole model runs them in (stored from float32 layers
    instead, the gradients differ by ~4e-3 of their largest value)."""
    train_module = importlib.import_module("lorafit.train")
    extra = {"train.precision": "bf16", "train.device": "cpu"} if kernels == "bf16" else {"train.cpu_kernels": kernels}
    job = _job(tmp_path, tiny_models[arch], tiny_data, **extra, **{"train.max_batch_tokens": 60})
    assert job.layer_cache.first == 1 and job.layer_cache.nbytes > 0
    lengths = [len(t) for t in job.tokens["train"]]
    batch = [5, 0, 17, 3, 9, 40, 41, 2]
    assert len(batching.split_by_tokens(batch, lengths, 60)) > 1  # several pieces, each fed its own rows
    job.model.train()
    torch.manual_seed(7)
    loss, _ = train_module._forward_backward(job, [batch], 0, lengths, boundary=True)
    after = torch.rand(3)
    got = {name: p.grad.clone() for name, p in job.model.named_parameters() if p.grad is not None}
    assert any("layer.1." in name or "layers.1." in name for name in got) and not any(".0." in name for name in got)

    job.model.zero_grad(set_to_none=True)
    for module in (job.layer_cache.embeddings, job.layer_cache._layers[0]):
        module.eval()
    torch.manual_seed(7)
    expected = 0.0
    for piece in batching.split_by_tokens(batch, lengths, 60):
        input_ids, attention_mask = batching.collate([job.tokens["train"][j] for j in piece], job.pad_id)
        with autocast(job.device, job.amp):
            logits = job.forward(input_ids, attention_mask).float()
        loss_sum = torch.nn.functional.cross_entropy(logits, torch.as_tensor(job.targets["train"][piece]), reduction="sum")
        (loss_sum / len(batch)).backward()
        expected += float(loss_sum.detach())
    torch.testing.assert_close(torch.rand(3), after, rtol=0, atol=0)  # the same draws, no more, no fewer
    assert (job.amp == torch.bfloat16) is (kernels == "bf16")
    assert loss == pytest.approx(expected, rel=1e-5)
    for name, p in job.model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_the_whole_model_is_back_outside_the_block(tiny_bert, tiny_data, tmp_path):
    """Outside `feeding` (and after an error inside it) the encoder has its embeddings and every layer again:
    validation and prediction run the whole model."""
    job = _job(tmp_path, tiny_bert, tiny_data)
    job.model.eval()
    input_ids, attention_mask = batching.collate(job.tokens["train"][:4], job.pad_id)
    before = job.model(input_ids, attention_mask)
    with pytest.raises(ValueError), job.layer_cache.feeding([0, 1, 2, 3]):
        raise ValueError
    torch.testing.assert_close(job.model(input_ids, attention_mask), before, rtol=0, atol=0)
    with job.layer_cache.feeding([0, 1, 2, 3]):  # the stored states of the same texts: the same logits
        torch.testing.assert_close(job.model(input_ids, attention_mask), before, rtol=1e-5, atol=1e-6)


def test_without_encoder_dropout_a_cached_run_trains_like_the_whole_model(tmp_path):
    """No dropout inside the encoder (LoRA and head dropout stay on): eval mode changes nothing below the
    adapters, so whole runs -- token-budget pieces, gradient accumulation, validation, test -- agree."""
    model = build_tiny_encoder(tmp_path / "model", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    data = write_dataset(tmp_path / "data", n_train=150, n_test=40)
    base = {"method.layers": "[1]", "method.dropout": 0.1, "train.max_batch_tokens": 60, "train.grad_accum": 2,
            "train.batch_size": 9}
    whole = train(load_config(None, tiny_overrides(model, data, **base)), tmp_path / "whole")
    cached = train(load_config(None, tiny_overrides(model, data, **base, **{"train.cache_frozen_layers": "true"})),
                   tmp_path / "cached")
    assert_same_training(whole.path, cached.path, "adapter", 1e-4)
    config = (cached.path / "config.yaml").read_text()
    assert "cache_frozen_layers: true" in config and "cached_frozen_layers: 1" in config


@pytest.mark.parametrize("precision", ["fp32", "bf16"])  # bf16: configs/banking77-lora-fast.yaml's combination
def test_a_killed_cached_run_resumes_bit_for_bit(tiny_bert, tiny_data, tmp_path, monkeypatch, precision):
    """The states are rebuilt on resume from length-sorted batches that do not depend on the epoch: the same
    floats, so the resumed run ends as the uninterrupted one."""
    overrides = tiny_overrides(tiny_bert, tiny_data, **CACHED, **{"train.epochs": 3, "train.checkpoint_every": 3,
                                                                 "train.precision": precision, "train.device": "cpu"})
    reference = train(load_config(None, overrides), tmp_path / "reference")
    assert RunDir(reference.path).compute().autocast == {"fp32": None, "bf16": "bfloat16"}[precision]
    crash_after_step(overrides, tmp_path / "killed", monkeypatch, step=20)
    resume(tmp_path / "killed")
    assert_same_adapter_run(reference.path, tmp_path / "killed")
    assert json.loads((reference.path / "summary.json").read_text())["steps"] > 20


@pytest.mark.parametrize(("extra", "says"), [
    ({"method.layers": "null"}, "train.cache_frozen_layers needs adapters in upper layers only: set method.layers"),
    ({"method.name": "full"}, "train.cache_frozen_layers needs adapters in upper layers only"),
    ({"method.layers": "[0, 1]"}, "the adapters reach layer 0, so no layer is frozen below them"),
])
def test_nothing_to_cache_is_one_clear_line(tiny_bert, tiny_data, tmp_path, capsys, extra, says):
    items = tiny_overrides(tiny_bert, tiny_data, **{**CACHED, **extra})
    if extra.get("method.name") == "full":
        items = [i for i in items if not i.startswith(("method.rank", "method.alpha", "method.dropout", "method.layers"))]
    line = train_fails_cleanly(capsys, tmp_path / "run", items)
    assert says in line, line
