"""Few-shot training (issue 16): the seeded per-class draw and its record, the contrastive stage's losses
and batches, the centroid-initialised head, and a contrastive run that resumes bit for bit."""

from __future__ import annotations

import importlib
import json
import math
import random
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lorafit
from lorafit import contrastive, data
from lorafit.cli import main
from lorafit.config import load_config
from lorafit.train import resume

from conftest import kill_at_checkpoint, subprocess_env, synthetic_frame, tiny_overrides, train_command, write_dataset

# -- the draw -----------------------------------------------------------------------------------


def _labels(counts: dict[str, int], seed: int = 0) -> list[str]:
    labels = [label for label, n in counts.items() for _ in range(n)]
    random.Random(seed).shuffle(labels)
    return labels


def test_draw_takes_n_per_class_then_validation_from_the_rest():
    labels = _labels({"a": 20, "b": 12, "c": 7})
    train, validation = data.draw_shots(labels, 5, 3, seed=1)
    assert Counter(labels[i] for i in train) == {"a": 5, "b": 5, "c": 5}
    assert Counter(labels[i] for i in validation) == {"a": 3, "b": 3, "c": 2}  # c had 2 left
    assert not set(train) & set(validation)
    assert train == sorted(train) and validation == sorted(validation)
    assert data.draw_shots(labels, 5, 3, seed=1) == (train, validation)  # seeded
    assert data.draw_shots(labels, 5, 3, seed=2)[0] != train  # another draw


def _cfg(tmp_path: Path, tiny_bert: Path, **extra):
    folder = write_dataset(tmp_path / "data", n_train=150, n_test=30)
    return load_config(None, tiny_overrides(tiny_bert, folder, **extra))


def test_shots_per_class_draws_train_and_validation_and_records_them(tiny_bert, tmp_path):
    cfg = _cfg(tmp_path, tiny_bert, **{"data.shots_per_class": 4, "data.draw_seed": 7, "train.epochs": 1})
    result = lorafit.train(cfg, tmp_path / "run")
    splits = json.loads((tmp_path / "run" / "splits.json").read_text())
    assert len(splits["train"]) == 3 * 4 and len(splits["validation"]) == 3 * 4
    assert not set(splits["train"]) & set(splits["validation"])
    assert splits["provenance"]["train"] == "4 per class drawn from train (seed 7)"
    assert splits["provenance"]["validation"] == "4 per class drawn from the rest of train (seed 7)"
    assert result.summary["train_label_counts"] == {"food": 4, "sport": 4, "travel": 4}
    # the recorded rows are the draw: the same rows the function gives on the file's labels
    frame = synthetic_frame(150, 0)
    train, validation = data.draw_shots(frame["label"].tolist(), 4, 4, seed=7)
    assert splits["train"] == train and splits["validation"] == validation


def test_draw_seed_is_independent_of_the_training_seed(tiny_bert, tmp_path):
    drawn = {}
    for seed, draw in ((0, 3), (1, 3), (0, 4)):
        cfg = _cfg(tmp_path / f"{seed}-{draw}", tiny_bert, **{"data.shots_per_class": 3, "data.draw_seed": draw, "seed": seed})
        found, _ = data.load(cfg.data, cfg.seed)
        drawn[seed, draw] = found.splits["train"].rows
    assert drawn[0, 3] == drawn[1, 3]  # another training seed, the same draw
    assert drawn[0, 4] != drawn[0, 3]
    cfg = _cfg(tmp_path / "null", tiny_bert, **{"data.shots_per_class": 3, "seed": 3})  # null: the run's seed
    assert data.load(cfg.data, cfg.seed)[0].splits["train"].rows == drawn[0, 3]


def test_validation_shots_and_a_validation_file_is_replaced(tiny_bert, tmp_path):
    folder = write_dataset(tmp_path / "data", n_train=90, n_test=30)
    synthetic_frame(30, 5).to_csv(folder / "validation.csv", index=False)
    cfg = load_config(None, tiny_overrides(tiny_bert, folder, **{"data.shots_per_class": 2, "data.validation_shots": 5}))
    found, _ = data.load(cfg.data, cfg.seed)
    assert Counter(found.splits["validation"].labels) == {"food": 5, "sport": 5, "travel": 5}
    assert found.provenance["validation"].startswith("5 per class drawn from the rest of train")


def test_too_many_shots_is_one_clear_error(tiny_bert, tmp_path, capsys):
    folder = write_dataset(tmp_path / "data", n_train=30, n_test=9)  # 10 per class
    out = tmp_path / "run"
    status = main(["train", *tiny_overrides(tiny_bert, folder, **{"data.shots_per_class": 12}), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1
    assert "data.shots_per_class=12: 3 class(es) have fewer training examples" in err[0]
    assert "'food' (10)" in err[0] and "shots_per_class_min_ok" in err[0]
    assert not out.exists()


def test_shots_that_use_every_training_example_leave_no_validation_and_are_one_clear_error(tiny_bert, tmp_path, capsys):
    folder = write_dataset(tmp_path / "data", n_train=30, n_test=9)  # 10 per class: 10 shots leave none to validate on
    out = tmp_path / "run"
    status = main(["train", *tiny_overrides(tiny_bert, folder, **{"data.shots_per_class": 10}), "--out", str(out)])
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert status == 2 and len(err) == 1 and not captured.out
    assert "data.shots_per_class=10 uses every training example" in err[0] and "lower data.shots_per_class" in err[0]
    assert not out.exists()


@pytest.mark.parametrize("value", [0, -1, "x"])
def test_shots_below_one_is_a_config_error(tiny_bert, tmp_path, capsys, value):
    out = tmp_path / "run"
    status = main(["train", *tiny_overrides(tiny_bert, tmp_path, **{"data.shots_per_class": value}), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "data.shots_per_class" in err[0]
    assert not out.exists()


def test_min_ok_takes_what_a_small_class_has(tiny_bert, tmp_path):
    frame = synthetic_frame(60, 0)
    frame = frame[~((frame["label"] == "food") & (frame.index > 20))]  # food keeps 7 rows
    folder = tmp_path / "data"
    folder.mkdir()
    frame.to_csv(folder / "train.csv", index=False)
    synthetic_frame(30, 1).to_csv(folder / "test.csv", index=False)
    cfg = load_config(None, tiny_overrides(tiny_bert, folder, **{"data.shots_per_class": 10, "data.validation_shots": 2,
                                                                 "data.shots_per_class_min_ok": True}))
    found, _ = data.load(cfg.data, cfg.seed)
    assert Counter(found.splits["train"].labels) == {"food": 7, "sport": 10, "travel": 10}
    assert Counter(found.splits["validation"].labels) == {"sport": 2, "travel": 2}


def test_open_intent_protocol_with_few_shots(tiny_bert, tmp_path):
    """known_intents first (on all of train), then the draw among the known classes."""
    folder = tmp_path / "data"
    rng = random.Random(0)
    rows = [{"text": f"w{i % 6} filler {rng.random():.3f}", "label": f"c{i % 6}"} for i in range(120)]
    folder.mkdir()
    import pandas as pd
    pd.DataFrame(rows).to_csv(folder / "train.csv", index=False)
    pd.DataFrame(rows[:36]).to_csv(folder / "test.csv", index=False)
    cfg = load_config(None, tiny_overrides(tiny_bert, folder, **{"data.shots_per_class": 3, "data.known_intents": 0.5}))
    found, _ = data.load(cfg.data, cfg.seed)
    assert len(found.label_names) == 3 and len(found.splits["train"]) == 9 and len(found.splits["validation"]) == 9
    assert set(found.splits["train"].labels) == set(found.open_intent["known"])


# -- the contrastive stage's pieces -----------------------------------------------------------------


def _supcon_by_hand(features: torch.Tensor, labels: list[int], t: float) -> float:
    z = F.normalize(features.double(), dim=-1)
    total = 0.0
    for i in range(len(z)):
        positives = [p for p in range(len(z)) if p != i and labels[p] == labels[i]]
        if not positives:
            continue
        denominator = sum(math.exp(float(z[i] @ z[a]) / t) for a in range(len(z)) if a != i)
        total += -sum(math.log(math.exp(float(z[i] @ z[p]) / t) / denominator) for p in positives) / len(positives)
    return total


def test_supcon_loss_matches_the_formula():
    torch.manual_seed(0)
    features = torch.randn(9, 5)
    labels = [0, 0, 1, 1, 1, 2, 3, 3, 0]  # class 2 has no positive: not an anchor
    got = contrastive.supcon_loss(features, torch.tensor(labels), 0.3)
    assert float(got) == pytest.approx(_supcon_by_hand(features, labels, 0.3), rel=1e-5)
    none = contrastive.supcon_loss(features[:3], torch.tensor([0, 1, 2]), 0.3)
    assert float(none) == 0.0


def test_cosine_pair_loss_matches_setfits_objective():
    torch.manual_seed(1)
    features = torch.randn(6, 4)
    labels = [0, 1, 0, 2, 1, 1]
    z = F.normalize(features.double(), dim=-1)
    pairs = [(i, j) for i in range(6) for j in range(i + 1, 6)]
    by_hand = sum((float(z[i] @ z[j]) - (labels[i] == labels[j])) ** 2 for i, j in pairs) * 2 / 5
    assert float(contrastive.cosine_pair_loss(features, torch.tensor(labels))) == pytest.approx(by_hand, rel=1e-5)


def test_class_grouped_batches_cover_every_example_once_with_positives():
    labels = [i % 10 for i in range(100)]  # 10 classes x 10
    lengths = [random.Random(i).randint(3, 20) for i in range(100)]
    batches = contrastive.class_grouped_batches(lengths, labels, 20, 4, random.Random(0))
    assert len(batches) == 5 and sorted(i for b in batches for i in b) == list(range(100))
    for batch in batches:
        counts = Counter(labels[i] for i in batch)
        assert sum(n for n in counts.values() if n >= 2) >= 0.8 * len(batch)  # most examples have a positive
        assert [lengths[i] for i in batch] == sorted(lengths[i] for i in batch)
    assert contrastive.class_grouped_batches(lengths, labels, 20, 4, random.Random(0)) == batches


def test_centroid_head_is_a_scaled_cosine_to_class_means():
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.classifier = torch.nn.Linear(6, 3)
    vectors = torch.randn(12, 6) * 3
    labels = torch.tensor([0, 1, 2] * 4)
    contrastive.centroid_head(model, vectors, labels, scale=10.0)
    means = torch.stack([F.normalize(F.normalize(vectors[labels == c], dim=-1).sum(0), dim=0) for c in range(3)])
    x = torch.randn(6)
    x = x / x.norm() * vectors.norm(dim=1).mean()  # a vector of the training vectors' mean norm
    expected = 10.0 * (F.normalize(x, dim=0) @ means.T)
    torch.testing.assert_close(model.classifier(x), expected, rtol=1e-5, atol=1e-5)
    assert float(model.classifier.bias.detach().abs().max()) == 0.0


# -- a contrastive run -------------------------------------------------------------------------------

CONTRASTIVE = {"contrastive.epochs": 2, "contrastive.batch_size": 12, "contrastive.examples_per_class": 3,
               "model.head_init": "centroids", "data.shots_per_class": 8, "train.checkpoint_every": 2,
               "train.epochs": 2, "method.dropout": 0.1}


def test_contrastive_stage_trains_the_encoder_not_the_head_and_records_both_stages(tiny_bert, tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, tiny_bert, **{**CONTRASTIVE, "model.head_init": "random"})
    heads = []
    train_module = importlib.import_module("lorafit.train")
    real = train_module._sentence_vectors

    def spy(job, split):  # called at each contrastive epoch's end: the head as it stands then
        heads.append(job.model.classifier.weight.detach().clone())
        return real(job, split)

    monkeypatch.setattr(train_module, "_sentence_vectors", spy)
    lorafit.train(cfg, tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    kinds = [r["type"] for r in records if r["type"].endswith("epoch")]
    assert kinds == ["contrastive_epoch", "contrastive_epoch", "epoch", "epoch"]
    assert [r["epoch"] for r in records if r["type"].endswith("epoch")] == [1, 2, 3, 4]
    stage_one = [r for r in records if r["type"] == "contrastive_epoch"]
    assert all(0 <= r["val_centroid_accuracy"] <= 1 and r["train_loss"] > 0 for r in stage_one)
    assert len(heads) == 4 and all(torch.equal(h, heads[0]) for h in heads)  # the head did not train in stage one
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["epochs_run"] == 4 and summary["best_epoch"] in (3, 4) and not summary["stopped_early"]
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "total_steps: 10" in config  # 2 contrastive epochs of 2 batches (24 / 12), 2 of 3 steps (24 / 8)


def test_centroid_head_starts_where_nearest_centroid_classifies(tiny_bert, tmp_path, monkeypatch):
    """With head_init=centroids and no training step, the head's predictions on train are the nearest centroid's."""
    cfg = _cfg(tmp_path, tiny_bert, **{"model.head_init": "centroids", "data.shots_per_class": 8, "train.epochs": 1,
                                       "model.head_dropout": 0.0})
    seen = {}
    train_module = importlib.import_module("lorafit.train")
    real = train_module._centroid_head

    def check(job):
        real(job)
        vectors = train_module._sentence_vectors(job, "train")
        targets = torch.as_tensor(job.targets["train"])
        seen["head"] = (vectors @ job.model.classifier.weight.T.detach()).argmax(1)
        centroids = torch.stack([F.normalize(F.normalize(vectors[targets == c], dim=-1).sum(0), dim=0) for c in range(3)])
        seen["nearest"] = (F.normalize(vectors, dim=-1) @ centroids.T).argmax(1)

    monkeypatch.setattr(train_module, "_centroid_head", check)
    lorafit.train(cfg, tmp_path / "run")
    assert torch.equal(seen["head"], seen["nearest"])


@pytest.fixture(scope="module")
def contrastive_reference(tiny_bert, tmp_path_factory):
    """The uninterrupted contrastive run the killed ones must end like: (overrides, run folder), made once."""
    root = tmp_path_factory.mktemp("contrastive-reference")
    overrides = tiny_overrides(tiny_bert, write_dataset(root / "data", n_train=150, n_test=30),
                               **CONTRASTIVE, **{"train.cpu_kernels": "stock"})
    subprocess.run(train_command(overrides, root / "reference"), check=True, env=subprocess_env(), capture_output=True)
    return overrides, root / "reference"


@pytest.mark.parametrize("kill_after_step", [2, 4, 6])  # in the contrastive stage, at its end, in classification
def test_contrastive_run_resumes_bit_for_bit(contrastive_reference, tmp_path, kill_after_step):
    overrides, reference = contrastive_reference
    out = tmp_path / "killed"
    proc = subprocess.Popen(train_command(overrides, out), env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_at_checkpoint(proc, out, kill_after_step)
    resume(out)
    from safetensors.torch import load_file

    a, b = (load_file(str(r / "adapter" / "adapter_model.safetensors")) for r in (reference, out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("seconds", "examples_per_second")} for r in rows]  # noqa: E731
    read = lambda run: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert strip(read(reference)) == strip(read(out))


def test_then_train_head_keeps_the_contrastive_stage_s_adapters(tiny_bert, tmp_path, monkeypatch):
    """contrastive.then_train=head: after the contrastive stage only the head moves."""
    train_module = importlib.import_module("lorafit.train")
    snapshots = {}
    real = train_module._end_contrastive_epoch

    def spy(job, p, *args, **kwargs):
        real(job, p, *args, **kwargs)
        snapshots["adapters"] = {k: v.detach().clone() for k, v in job.model.named_parameters() if "lora_" in k}
        snapshots["model"] = job.model

    real_step = train_module._forward_backward

    def first_step(job, *args, **kwargs):  # the classification stage's first step, its head set (centroids)
        snapshots.setdefault("head", {k: v.detach().clone() for k, v in job.model.named_parameters() if "classifier" in k})
        return real_step(job, *args, **kwargs)

    monkeypatch.setattr(train_module, "_end_contrastive_epoch", spy)
    monkeypatch.setattr(train_module, "_forward_backward", first_step)
    cfg = _cfg(tmp_path, tiny_bert, **{**CONTRASTIVE, "contrastive.then_train": "head", "train.checkpoint_every": 0})
    lorafit.train(cfg, tmp_path / "run")
    after = {k: v for k, v in snapshots["model"].named_parameters() if "lora_" in k}
    assert after and all(torch.equal(after[k], snapshots["adapters"][k]) for k in after)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in records if r["type"] == "epoch"]) == 2
    # the head did train (its epoch losses need not fall: 2 epochs of a tiny model under dropout)
    head = {k: v for k, v in snapshots["model"].named_parameters() if "classifier" in k and v.requires_grad}
    assert head and all(not torch.equal(head[k], snapshots["head"][k]) for k in head)
