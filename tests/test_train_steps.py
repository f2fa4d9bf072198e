"""What one optimiser step computes: gradient accumulation weights every example of the step alike,
fp16 steps go through a gradient scaler, weight decay applies to weight matrices by role, and a
resume refuses data that changed."""

from __future__ import annotations

import importlib
import json
import math

import pytest
import torch

from lorafit import batching, data
from lorafit.config import load_config
from lorafit.errors import UserError
from lorafit.methods import registry
from lorafit.models import build_classifier, find_targets
from lorafit.job import make_optimizer
from lorafit.train import resume, train

from conftest import assert_same_training, dropout_free_overrides, tiny_overrides


@pytest.mark.parametrize("extra", [
    {},
    # class weights: every example of a step weighs w_y / (sum of w_y over the step), however it is cut
    {"train.class_weights": "{food: 3.0, sport: 0.5}", "train.loss": "focal", "train.sampler": "class_balanced"},
], ids=["plain", "weighted-focal-balanced"])
def test_grad_accum_k_equals_a_k_times_larger_batch(tmp_path, monkeypatch, extra):
    """batch_size=B, grad_accum=2 over the very batches of a batch_size=2B run, cut unevenly (a third
    and two thirds, and a short last step) trains like batch_size=2B: every example of a step weighs
    1 / (examples in the step), however the step's batches are sized."""
    big = dropout_free_overrides(tmp_path / "setup", "lora", **{"train.batch_size": 12, "train.max_batch_tokens": "null", **extra})
    reference = train(load_config(None, big), tmp_path / "big")

    original = batching.length_grouped_batches
    cuts = []

    def cut_in_two(lengths, batch_size, rng, group=50):
        out = []
        for b in original(lengths, 2 * batch_size, rng, group):  # the reference's batches, in its order
            k = max(1, len(b) // 3)
            out += [b[:k], b[k:]] if len(b) > 1 else [b]
            cuts.append((len(b[:k]), len(b[k:])))
        return out

    monkeypatch.setattr(batching, "length_grouped_batches", cut_in_two)
    small = [o for o in big if not o.startswith("train.batch_size")] + ["train.batch_size=6", "train.grad_accum=2"]
    accumulated = train(load_config(None, small), tmp_path / "accumulated")
    assert any(a != b for a, b in cuts)  # uneven batches inside a step really occurred
    assert_same_training(reference.path, accumulated.path, "adapter", 1e-5)


def test_grad_accum_short_last_step_is_not_divided_by_grad_accum(tmp_path, monkeypatch):
    """An epoch of 3 batches with grad_accum=2: the last step holds one batch and must weigh its
    examples 1 / len(batch), as a run of one larger batch per step does."""
    big = dropout_free_overrides(tmp_path / "setup", "full", **{"train.max_batch_tokens": "null", "train.lr": 1e-3})
    cfg_big = load_config(None, big)
    n = len(data.load(cfg_big.data, cfg_big.seed)[0].splits["train"])
    original = batching.length_grouped_batches
    big_batch = -(-n // 2)  # two big batches: the second step of the accumulated run holds one batch
    monkeypatch.setattr(batching, "length_grouped_batches",
                        lambda lengths, batch_size, rng, group=50: original(lengths, big_batch, rng, group))
    reference = train(load_config(None, [*big, f"train.batch_size={big_batch}"]), tmp_path / "big")

    def three(lengths, batch_size, rng, group=50):
        first, second = original(lengths, big_batch, rng, group)
        half = len(first) // 2
        return [first[:half], first[half:], second]

    monkeypatch.setattr(batching, "length_grouped_batches", three)
    accumulated = train(load_config(None, [*big, f"train.batch_size={big_batch // 2}", "train.grad_accum=2"]),
                        tmp_path / "accumulated")
    assert_same_training(reference.path, accumulated.path, "model", 1e-5)


@pytest.mark.parametrize("method", ["lora", "adalora"])
def test_fp16_overflow_skips_the_step_instead_of_poisoning_the_weights(tiny_bert, tiny_data, tmp_path, monkeypatch, method):
    """fp16 autocast (here forced on CPU, as on a GPU without bf16) trains through torch.amp.GradScaler:
    a step whose gradients overflow is skipped and the scale backs off; the weights stay finite, and
    AdaLoRA's rank allocator never scores the skipped step's inf gradients (its statistics would be
    NaN for the rest of the run)."""
    job_module = importlib.import_module("lorafit.job")

    monkeypatch.setattr(job_module, "autocast_dtype", lambda cfg, device: torch.float16)
    trained: list[torch.Tensor] = []
    models = []
    make_optimizer_ = job_module.make_optimizer

    def capture(model, method, cfg):
        optimizer = make_optimizer_(model, method, cfg)
        trained.extend(p for g in optimizer.param_groups for p in g["params"])
        models.append(model)
        return optimizer

    monkeypatch.setattr(job_module, "make_optimizer", capture)
    backward_ = torch.Tensor.backward
    overflowed = []

    def backward(self, *args, **kwargs):
        backward_(self, *args, **kwargs)
        if not overflowed:  # the first step's gradients overflow, as fp16 ones can
            for p in trained:
                if p.grad is not None:
                    p.grad.fill_(float("inf"))
            overflowed.append(True)

    monkeypatch.setattr(torch.Tensor, "backward", backward)
    from peft.tuners.adalora.layer import RankAllocator

    update_ipt_, scored = RankAllocator.update_ipt, []

    def update_ipt(self, model):  # after each scoring: are the allocator's statistics all finite?
        update_ipt_(self, model)
        scored.append(all(torch.isfinite(t).all() for t in [*self.exp_avg_ipt.values(), *self.exp_avg_unc.values()]))

    monkeypatch.setattr(RankAllocator, "update_ipt", update_ipt)
    extra = {"method.name": "adalora", "method.rank": 2, "method.init_rank": 4} if method == "adalora" else {}
    overrides = tiny_overrides(tiny_bert, tiny_data, **{"train.epochs": 2, "train.checkpoint_every": 0, **extra})
    result = train(load_config(None, overrides), tmp_path / "run")
    assert overflowed
    assert result.summary["skipped_steps"] == 1
    assert result.summary["compute"]["autocast"] == "float16"
    assert all(torch.isfinite(p).all() for p in trained)
    assert math.isfinite(result.eval["loss"])
    if method == "adalora":
        assert scored and all(scored), "the rank allocator scored non-finite importance"


@pytest.mark.parametrize("method, vectors", [("adalora", "lora_E"), ("ia3", "ia3_l")])
def test_weight_decay_spares_scaling_vectors_by_role(tiny_bert, method, vectors):
    """AdaLoRA's singular values (r, 1) and IA3's scaling vectors (out, 1) are 2-D but not weight
    matrices: decaying them pulls the adapter towards zero (AdaLoRA) or the layer's output to 0 (IA3)."""
    overrides = [f"model.name={tiny_bert}", f"method.name={method}", "train.weight_decay=0.1"]
    if method == "adalora":
        overrides += ["method.rank=2", "method.init_rank=4"]
    cfg = load_config(None, overrides)
    model = build_classifier(cfg.model, 3, 0)
    m = registry.get(cfg.method.name)(cfg.method)
    model = m.apply(model, find_targets(model, cfg.method.targets, cfg.method.layers), 100)
    optimizer = make_optimizer(model, m, cfg)
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    scaling = [n for n, p in named.items() if p.requires_grad and vectors in n]
    matrices = [n for n, p in named.items() if p.requires_grad and ("lora_A" in n or "classifier" in n and n.endswith("weight"))]
    assert scaling and all(decay_of[id(named[n])] == 0.0 for n in scaling), scaling
    assert all(decay_of[id(named[n])] == 0.1 for n in matrices)
    biases = [n for n, p in named.items() if p.requires_grad and n.endswith("bias")]
    assert all(decay_of[id(named[n])] == 0.0 for n in biases)


@pytest.mark.parametrize("arch, method", [("bert", "full"), ("bert", "lora"), ("distilbert", "loraplus")])
def test_layer_lr_decay_gives_each_layer_its_rate(tiny_models, arch, method):
    """train.layer_lr_decay=0.5 on a 2-layer encoder: layer 1 (top) at lr * 0.5, layer 0 at lr * 0.25, the
    embeddings at lr * 0.125; the head at its own rate; the method's own groups (LoRA+'s B
    at lr_ratio x lr) decay the same way. Without it, every body weight at lr."""
    lr, head_lr = 1e-3, 7e-3
    overrides = [f"model.name={tiny_models[arch]}", f"method.name={method}", f"train.lr={lr}", f"train.head_lr={head_lr}"]

    def rates(extra):
        cfg = load_config(None, overrides + extra)
        model = build_classifier(cfg.model, 3, 0)
        m = registry.get(cfg.method.name)(cfg.method)
        model = m.apply(model, total_steps=100)
        optimizer = make_optimizer(model, m, cfg)
        lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
        return {n: lr_of[id(p)] for n, p in model.named_parameters() if p.requires_grad}

    def expected(name, decay):
        own = head_lr if "classifier" in name else lr * 16 if method == "loraplus" and ".lora_B." in name else lr
        if ".layer.1." in name:
            return own * decay
        if ".layer.0." in name:
            return own * decay**2
        return own * decay**3 if ".embeddings." in name else own

    plain, decayed = rates([]), rates(["train.layer_lr_decay=0.5"])
    assert any(".layer.0." in n for n in decayed) and any(".layer.1." in n for n in decayed)
    if method == "full":
        assert any(".embeddings." in n for n in decayed)
    for name in decayed:
        assert decayed[name] == pytest.approx(expected(name, 0.5)), name
        assert plain[name] == pytest.approx(expected(name, 1.0)), name


@pytest.mark.parametrize("split, edit", [("test", "text"), ("test", "label"), ("validation", "text")])
def test_resume_refuses_data_that_changed_in_any_split(tiny_bert, tiny_data, tmp_path, monkeypatch, split, edit):
    """Not only the train rows: an edited test or validation row (same row numbers) is refused too."""
    train_module = importlib.import_module("lorafit.train")
    overrides = tiny_overrides(tiny_bert, tiny_data, **{"train.epochs": 2, "data.validation_fraction": 0.2})

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # dies after the last epoch's checkpoint, before test

    monkeypatch.setattr(train_module, "_finish", crash)
    with pytest.raises(KeyboardInterrupt):
        train(load_config(None, overrides), tmp_path / "run")
    monkeypatch.undo()
    splits = json.loads((tmp_path / "run" / "splits.json").read_text())
    # validation is carved from train (stratified by label): edit one of its texts, which moves no row
    path, row = (tiny_data / "test.csv", 0) if split == "test" else (tiny_data / "train.csv", splits["validation"][0])
    lines = path.read_text().splitlines()
    text, label = lines[row + 1].rsplit(",", 1)
    lines[row + 1] = f"{text} pizza,{label}" if edit == "text" else f"{text},{'food' if label != 'food' else 'sport'}"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=f"the data changed since .*{split}.* cannot resume it exactly"):
        resume(tmp_path / "run")
    assert not (tmp_path / "run" / "summary.json").exists()


def test_a_run_begun_with_shuffled_batches_continues_with_them(tiny_bert, tiny_data, tmp_path):
    """A new run records compute.json batch_order and draws length runs (batching.length_grouped_batches); a
    run whose compute.json has no batch_order began with shuffled batches, and its continuation draws those."""
    import random

    from lorafit.job import prepare
    from lorafit.rundir import Compute, RunDir

    loop = importlib.import_module("lorafit.train")
    overrides = tiny_overrides(tiny_bert, tiny_data, **{"train.batch_size": 2})
    new = prepare(load_config(None, overrides), RunDir(tmp_path / "new"))
    assert new.compute.batch_order == batching.BATCH_ORDER == new.compute.to_json()["batch_order"]
    lengths = [len(t) for t in new.tokens["train"]]
    epoch = lambda: random.Random(new.cfg.seed * 1000 + 1)  # noqa: E731  the first epoch's draws
    assert loop._batches(new, 1, lengths) == batching.length_grouped_batches(lengths, 2, epoch())
    recorded = new.compute.to_json()
    older = Compute.from_json({k: v for k, v in recorded.items() if k != "batch_order"})
    for compute in (older, None):  # compute.json without batch_order, or none at all (a run older still)
        old = prepare(load_config(None, overrides), RunDir(tmp_path / "old"), recorded=compute, resumed=True)
        assert old.compute.batch_order == batching.OLD_BATCH_ORDER
        assert loop._batches(old, 1, lengths) == batching.shuffled_length_grouped_batches(lengths, 2, epoch())
        assert loop._batches(old, 1, lengths) != loop._batches(new, 1, lengths)
    same = prepare(load_config(None, overrides), RunDir(tmp_path / "same"), recorded=new.compute, resumed=True)
    assert loop._batches(same, 1, lengths) == loop._batches(new, 1, lengths)
    newer = Compute.from_json(recorded | {"batch_order": "by_moon_phase"})
    with pytest.raises(UserError, match="batch_order 'by_moon_phase', which this lorafit does not know"):
        prepare(load_config(None, overrides), RunDir(tmp_path / "newer"), recorded=newer, resumed=True)
