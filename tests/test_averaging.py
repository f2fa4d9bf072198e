"""train.ema: the moving average of the trained weights (lorafit/averaging.py).

The average follows its formula step by step (checked against a float64 recomputation from the
weights after every optimiser step of a real run), validation and the saved artifact see the
average while training continues from the raw weights, a killed run resumes bit for bit, and
AdaLoRA is refused in one line."""

from __future__ import annotations

import importlib
import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from lorafit.averaging import WeightAverage
from lorafit.cli import main
from lorafit.config import load_config
from lorafit.train import resume, train

from conftest import assert_same_adapter_run, crash_after_step, tiny_overrides

DECAY = 0.9


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().double().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_average_follows_its_formula_and_applied_restores_the_weights():
    model = nn.Linear(3, 2)
    model.bias.requires_grad_(False)  # frozen: not averaged
    average = WeightAverage(model, DECAY)
    assert average.names == ["weight"] and not average.started
    average.start()
    expected = model.weight.detach().double().clone()
    for t in range(30):
        with torch.no_grad():
            model.weight.add_(torch.randn(2, 3))
        average.update()
        d = min(DECAY, (1 + t) / (10 + t))
        expected = d * expected + (1 - d) * model.weight.detach().double()
    own = model.weight.detach().clone()
    with average.applied():
        torch.testing.assert_close(model.weight.detach().double(), expected, rtol=0, atol=1e-6)
    assert torch.equal(model.weight, own)
    tensors, meta = average.state()
    other = WeightAverage(model, DECAY)
    other.load(tensors, meta)
    assert other.updates == 30 and torch.equal(other.average[0], average.average[0])


def test_validation_and_artifact_see_the_average_of_the_steps(tiny_bert, tiny_data, tmp_path, monkeypatch):
    """Every epoch's validation runs on exactly the average of the weights after each optimiser step
    (recomputed here in float64), the saved adapter holds the best epoch's average, and training goes on
    from the raw weights (they differ from the average)."""
    train_module = importlib.import_module("lorafit.train")
    step, validate = train_module._optimizer_step, train_module._validate
    after_steps: list[dict[str, torch.Tensor]] = []
    validated: dict[int, dict[str, torch.Tensor]] = {}
    raw: dict[int, dict[str, torch.Tensor]] = {}

    def recording_step(job, p):
        if not after_steps:
            after_steps.append(_trainable(job.model))  # the weights the average starts from
        step(job, p)
        after_steps.append(_trainable(job.model))

    def recording_validate(job, p, *args):
        validated[p.step] = _trainable(job.model)
        raw[p.step] = after_steps[-1]
        return validate(job, p, *args)

    monkeypatch.setattr(train_module, "_optimizer_step", recording_step)
    monkeypatch.setattr(train_module, "_validate", recording_validate)
    result = train(load_config(None, tiny_overrides(tiny_bert, tiny_data, **{"train.ema": DECAY, "train.epochs": 3})),
                   tmp_path / "run")

    average = dict(after_steps[0])
    for t, weights in enumerate(after_steps[1:]):
        d = min(DECAY, (1 + t) / (10 + t))
        average = {n: d * average[n] + (1 - d) * weights[n] for n in average}
        if t + 1 in validated:
            for n, value in validated[t + 1].items():
                torch.testing.assert_close(value, average[n], rtol=0, atol=1e-6, msg=f"{n} at step {t + 1}")
            assert any(not torch.equal(validated[t + 1][n], raw[t + 1][n]) for n in average), "validation saw the raw weights"
    assert len(validated) == 3

    best_step = next(r["step"] for r in map(json.loads, (result.path / "metrics.jsonl").read_text().splitlines())
                     if r["type"] == "epoch" and r["epoch"] == result.summary["best_epoch"])
    saved = load_file(str(result.path / "adapter" / "adapter_model.safetensors"))
    best = [v.float() for v in validated[best_step].values()]
    for key, value in saved.items():
        assert any(v.shape == value.shape and torch.equal(v, value) for v in best), f"{key} is not the best epoch's average"


EXTRA = {"train.epochs": 3, "train.checkpoint_every": 3, "train.keep_checkpoints": 2, "method.dropout": 0.1,
         "train.lr": 1e-2, "train.cpu_kernels": "stock", "train.ema": DECAY}


def test_a_killed_run_with_ema_resumes_bit_for_bit(tiny_bert, tiny_data, tmp_path, monkeypatch):
    """Killed mid-epoch 2 (after the checkpoint at step 18) and resumed: the average comes back from the
    checkpoint, and the run ends as the uninterrupted one (same validation records, test figures, adapter)."""
    overrides = tiny_overrides(tiny_bert, tiny_data, **EXTRA)
    reference = train(load_config(None, overrides), tmp_path / "reference")
    crash_after_step(overrides, tmp_path / "killed", monkeypatch, step=20)
    assert (tmp_path / "killed" / "checkpoints" / "step-00000018").is_dir()
    resume(tmp_path / "killed")
    assert_same_adapter_run(reference.path, tmp_path / "killed")


def test_ema_with_adalora_is_one_clear_line(tiny_bert, tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    status = main(["train", *tiny_overrides(tiny_bert, tiny_data, **{"method.name": "adalora", "train.ema": 0.99}),
                   "--out", str(out)])
    err = capsys.readouterr().err.splitlines()
    assert status == 2 and len(err) == 1 and "train.ema does not combine with method adalora" in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("extra", [
    {"method.name": "full", "train.lr": 1e-3},
    {"contrastive.epochs": 1, "model.head_init": "centroids", "train.epochs": 2},
], ids=["full", "after-a-contrastive-stage"])
def test_ema_averages_the_classification_steps_of_any_method(tiny_bert, tiny_data, tmp_path, monkeypatch, extra):
    """Full fine-tuning averages every trainable weight; after a contrastive stage the average starts from the
    weights the classification stage starts with (the centroid head set) and counts only its steps."""
    from lorafit import averaging

    seen = {"updates": 0, "starts": 0, "sizes": set()}
    start, update = averaging.WeightAverage.start, averaging.WeightAverage.update

    def counting_start(self):
        seen["starts"] += 1
        seen["sizes"].add(sum(p.numel() for p in self.params))
        start(self)

    def counting_update(self):
        seen["updates"] += 1
        update(self)

    monkeypatch.setattr(averaging.WeightAverage, "start", counting_start)
    monkeypatch.setattr(averaging.WeightAverage, "update", counting_update)
    overrides = [o for o in tiny_overrides(tiny_bert, tiny_data, **{"train.ema": DECAY, **extra})
                 if extra.get("method.name") != "full" or not o.startswith(("method.rank", "method.alpha"))]
    result = train(load_config(None, overrides), tmp_path / "run")
    records = [json.loads(line) for line in (result.path / "metrics.jsonl").read_text().splitlines()]
    contrastive_steps = max([r["step"] for r in records if r["type"] == "contrastive_epoch"], default=0)
    assert seen["starts"] == 1
    assert seen["updates"] == result.summary["steps"] - contrastive_steps > 0
    if extra.get("method.name") == "full":
        assert seen["sizes"] == {result.summary["trainable_params"]}  # every weight of the model
