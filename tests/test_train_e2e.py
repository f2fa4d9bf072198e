"""End to end: `lorafit train` in a temp dir on a tiny random encoder, then predict/eval from the folder."""

from __future__ import annotations

import importlib
import inspect
import json

import numpy as np
import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file

import lorafit
from lorafit import evaluate
from lorafit.cli import main
from lorafit.errors import UserError
from lorafit.models import build_classifier
from lorafit.rundir import RunDir

from conftest import tiny_overrides

RUN_FILES = {"config.yaml", "labels.json", "splits.json", "compute.json", "metrics.jsonl", "eval.json", "predictions.json", "ood.json",
             "summary.json", "README.md"}


@pytest.mark.parametrize("method,artifact", [("lora", "adapter"), ("full", "model")])
def test_train_writes_exactly_the_run_folder(tiny_bert, tiny_data, tmp_path, method, artifact, capsys):
    out = tmp_path / "run"
    extra = {"method.name": method}
    overrides = tiny_overrides(tiny_bert, tiny_data, **extra)
    if method == "full":
        overrides = [o for o in overrides if not o.startswith(("method.rank", "method.alpha"))]
    assert main(["train", *overrides, "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == RUN_FILES | {artifact}
    if artifact == "adapter":
        assert {p.name for p in (out / "adapter").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    else:
        assert {p.name for p in (out / "model").iterdir()} == {"config.json", "model.safetensors", "modeling_lorafit.py"}
        _check_loads_in_transformers(out)
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt")), "weights must be safetensors only"

    summary = json.loads((out / "summary.json").read_text())
    for key in ("trainable_params", "total_params", "trainable_percent", "adapter_bytes", "train_seconds",
                "seconds_per_epoch", "train_examples_per_second", "peak_memory_mb", "best_epoch", "device", "versions"):
        assert key in summary, key
    assert summary["adapter_bytes"] == sum(p.stat().st_size for p in (out / artifact).rglob("*") if p.is_file())
    if method == "full":
        assert summary["trainable_params"] == summary["total_params"]
    else:
        assert 0 < summary["trainable_params"] < summary["total_params"]

    ev = json.loads((out / "eval.json").read_text())
    assert ev["split"] == "test"
    for key in ("accuracy", "macro_f1", "weighted_f1", "loss", "per_class", "confusion"):
        assert key in ev
    labels = json.loads((out / "labels.json").read_text())
    assert labels == ["food", "sport", "travel"]
    assert set(ev["per_class"]) == set(labels)
    assert np.array(ev["confusion"]).sum() == ev["examples"] == 30
    predictions = json.loads((out / "predictions.json").read_text())
    assert len(predictions["target"]) == len(predictions["predicted"]) == len(predictions["probability"]) == 30
    confusion = np.zeros_like(np.array(ev["confusion"]))
    np.add.at(confusion, (predictions["target"], predictions["predicted"]), 1)
    assert confusion.tolist() == ev["confusion"]
    assert all(1 / 3 <= p <= 1 for p in predictions["probability"])

    records = RunDir(out).metrics()
    epochs = [r for r in records if r["type"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert any(r["type"] == "step" for r in records)
    for r in epochs:
        assert {"train_loss", "val_loss", "val_accuracy", "val_macro_f1"} <= set(r)

    # The table and the test summary are printed.
    err = capsys.readouterr().err
    assert "val_acc" in err and "test (best epoch" in err


def _check_loads_in_transformers(run) -> None:
    """Full fine-tuning's model/ is a transformers folder with lorafit's pooling and head."""
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(run / "model", trust_remote_code=True).eval()
    clf = lorafit.load(run)
    texts = ["my pizza please", "golf trip", "a hotel and a flight for the trip"]
    batch = clf.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.numpy()
    assert np.abs(logits - clf.logits(texts)).max() <= 1e-5


def test_reloaded_run_reproduces_logged_test_metrics_exactly(tiny_bert, tiny_data, tmp_path):
    out = tmp_path / "run"
    result = lorafit.train(lorafit.load_config(None, tiny_overrides(tiny_bert, tiny_data, **{"train.epochs": 3})), out)
    import pandas as pd

    frame = pd.read_csv(tiny_data / "test.csv")
    # The training-time modules give the logged numbers bit for bit; the default load folds the
    # adapter into the weights, which moves the loss by float rounding only.
    for merge, rel in ((False, 0), (True, 1e-6)):
        again = lorafit.load(out, merge=merge).evaluate(frame.text.tolist(), frame.label.tolist())
        assert again["accuracy"] == result.eval["accuracy"]
        assert again["macro_f1"] == result.eval["macro_f1"]
        assert again["loss"] == pytest.approx(result.eval["loss"], rel=rel, abs=0)
        assert again["confusion"] == result.eval["confusion"]


def test_adapter_loads_in_plain_peft(tiny_bert, tiny_data, tmp_path):
    out = tmp_path / "run"
    lorafit.train(lorafit.load_config(None, tiny_overrides(tiny_bert, tiny_data)), out)
    cfg = RunDir(out).config()
    base = build_classifier(cfg.model, 3, seed=123)  # a different head init: the adapter must carry the head
    model = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    clf = lorafit.load(out)
    enc = clf.tokenizer(["my pizza please", "golf trip"], padding=True, return_tensors="pt")
    import torch

    with torch.inference_mode():
        a = model(enc["input_ids"], enc["attention_mask"])
        b = clf.model(enc["input_ids"], enc["attention_mask"])
    # lorafit.load folds the adapter into the weights (and may run linears on oneDNN): float rounding only.
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_predict_and_eval_cli(tiny_bert, tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    lorafit.train(lorafit.load_config(None, tiny_overrides(tiny_bert, tiny_data)), out)
    capsys.readouterr()
    assert main(["predict", str(out), "my pizza please", "--top-k", "2"]) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if l.strip()]
    assert len(lines) == 2 and all("%" in l for l in lines)

    texts = tmp_path / "texts.txt"
    texts.write_text("hotel trip\n\ngolf please\n")
    assert main(["predict", str(out), "--file", str(texts), "--top-k", "3"]) == 0
    rows = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in rows] == ["hotel trip", "golf please"]
    for r in rows:
        probs = [p["probability"] for p in r["predictions"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True)
        assert abs(sum(probs) - 1) < 1e-4  # 3 labels: top-3 is the whole distribution

    logged = json.loads((out / "eval.json").read_text())
    assert main(["eval", str(out), "--output", str(tmp_path / "e.json")]) == 0
    again = json.loads((tmp_path / "e.json").read_text())
    assert again["accuracy"] == logged["accuracy"] and again["macro_f1"] == logged["macro_f1"]
    assert main(["eval", str(out), "--split", "validation"]) == 0
    assert "accuracy" in capsys.readouterr().out
    # Another dataset file, evaluated whole.
    assert main(["eval", str(out), "--data", str(tiny_data / "train.csv")]) == 0


def test_python_api_matches_cli(tiny_bert, tiny_data, tmp_path):
    """lorafit.train with a dict config gives the same numbers as the CLI with the same overrides."""
    overrides = tiny_overrides(tiny_bert, tiny_data)
    main(["train", *overrides, "--out", str(tmp_path / "cli"), "--quiet"])
    cfg = lorafit.load_config(None, overrides)
    result = lorafit.train(cfg.model_dump(), tmp_path / "api")
    cli_eval = json.loads((tmp_path / "cli" / "eval.json").read_text())
    assert result.eval["accuracy"] == cli_eval["accuracy"] and result.eval["loss"] == cli_eval["loss"]


def test_training_is_deterministic(tiny_bert, tiny_data, tmp_path):
    overrides = tiny_overrides(tiny_bert, tiny_data, **{"train.epochs": 3})
    a = lorafit.train(lorafit.load_config(None, overrides), tmp_path / "a")
    b = lorafit.train(lorafit.load_config(None, overrides), tmp_path / "b")
    assert a.eval["loss"] == b.eval["loss"] and a.eval["confusion"] == b.eval["confusion"]
    assert RunDir(tmp_path / "a").metrics()[-1]["val_loss"] == RunDir(tmp_path / "b").metrics()[-1]["val_loss"]


def test_training_learns(tiny_bert, tiny_data, tmp_path):
    # 8 epochs: after 6, seeds 0-5 ended at 0.867-1.0 on the 30 test rows (seed 0 at the threshold, under
    # either dropout draw); after 8, at 0.967-1.0.
    overrides = tiny_overrides(tiny_bert, tiny_data, **{"method.name": "full", "train.epochs": 8, "train.lr": 3e-3})
    overrides = [o for o in overrides if not o.startswith(("method.rank", "method.alpha"))]
    result = lorafit.train(lorafit.load_config(None, overrides), tmp_path / "a")
    epochs = [r for r in RunDir(tmp_path / "a").metrics() if r["type"] == "epoch"]
    assert epochs[-1]["train_loss"] < 0.5 * epochs[0]["train_loss"]
    # Keyword classes are easy: a working loop must get (nearly) all of them.
    assert result.eval["accuracy"] >= 0.9


def test_bf16_on_cpu_trains_in_bf16_and_learns_what_float32_learns(tiny_bert, tiny_data, tmp_path, monkeypatch, caplog):
    """train.precision=bf16 on CPU autocasts (recorded in compute.json; the losses move off float32's by bf16
    rounding, not more), keeps float32 weights, learns, and warns where the CPU has no native bf16."""
    from lorafit import hardware

    extra = {"train.epochs": 4, "train.lr": 1e-2, "train.device": "cpu"}
    runs = {}
    for precision in ("fp32", "bf16"):
        cfg = lorafit.load_config(None, tiny_overrides(tiny_bert, tiny_data, **extra, **{"train.precision": precision}))
        runs[precision] = (lorafit.train(cfg, tmp_path / precision), RunDir(tmp_path / precision))
    assert runs["fp32"][1].compute().autocast is None and runs["bf16"][1].compute().autocast == "bfloat16"
    assert json.loads((tmp_path / "bf16" / "summary.json").read_text())["cpu_fast_paths"]["fused_lora"] > 0
    losses = {p: [r["train_loss"] for r in run.metrics() if r["type"] == "epoch"] for p, (_, run) in runs.items()}
    assert losses["bf16"] != losses["fp32"]  # autocast took effect
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.05)  # ...and changed only the rounding
    assert losses["bf16"][-1] < 0.85 * losses["bf16"][0]  # it learns (fp32 here: the same within 5%)
    assert runs["bf16"][0].eval["accuracy"] >= runs["fp32"][0].eval["accuracy"] - 0.1
    weights = load_file(str(tmp_path / "bf16" / "adapter" / "adapter_model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.float32}
    monkeypatch.setattr(hardware, "native_bf16", lambda info=None: False)
    cfg = lorafit.load_config(None, tiny_overrides(tiny_bert, tiny_data, **{**extra, "train.epochs": 1, "train.precision": "bf16"}))
    with caplog.at_level("WARNING", logger="lorafit"):
        lorafit.train(cfg, tmp_path / "emulated")
    assert "no native bf16" in caplog.text and "slower than fp32" in caplog.text


def test_run_config_round_trips(tiny_bert, tiny_data, tmp_path):
    out = tmp_path / "run"
    cfg = lorafit.load_config(None, tiny_overrides(tiny_bert, tiny_data))
    lorafit.train(cfg, out)
    saved = RunDir(out).config()
    # Columns were resolved (null -> the actual columns), everything else is as given.
    assert saved.data.text_column == "text" and saved.data.label_column == "label"
    assert saved.model_dump(exclude={"data"}) == cfg.model_dump(exclude={"data"})
    raw = yaml.safe_load((out / "config.yaml").read_text())
    assert raw["derived"]["total_steps"] == raw["derived"]["steps_per_epoch"] * 2


def _scripted_validation(monkeypatch, accuracies: list[float]) -> None:
    """Validation accuracy reads `accuracies` epoch by epoch (test metrics stay real), so a run's
    best epoch is known in advance while its weights keep changing."""
    train_module = importlib.import_module("lorafit.train")
    real, calls = evaluate.classification_metrics, iter(accuracies)

    def metrics(logits, targets, label_names):
        out = real(logits, targets, label_names)
        stack = [frame.function for frame in inspect.stack()[1:3]]
        return {**out, "accuracy": next(calls)} if "_end_epoch" in stack else out

    monkeypatch.setattr(train_module, "classification_metrics", metrics)


def test_early_stopping_evaluates_the_best_epoch_not_the_last(tiny_bert, tiny_data, tmp_path, monkeypatch):
    """Validation peaks at epoch 1 and gets worse while the weights keep moving (a real learning
    rate): early stopping after 2 stale epochs must test epoch 1's weights, which a run of exactly 1
    epoch (same constant schedule, same batches and masks) has; epoch 3's give another eval.json."""
    settings = {"train.patience": 2, "train.schedule": "constant", "train.warmup": 0, "train.metric": "accuracy",
                "train.lr": 5e-3}
    _scripted_validation(monkeypatch, [0.9, 0.5, 0.4])
    result = lorafit.train(lorafit.load_config(None, tiny_overrides(tiny_bert, tiny_data, **settings, **{"train.epochs": 5})),
                           tmp_path / "stopped")
    epochs = [r for r in RunDir(tmp_path / "stopped").metrics() if r["type"] == "epoch"]
    assert result.summary["stopped_early"] is True
    assert len(epochs) == 3 and result.summary["best_epoch"] == 1

    _scripted_validation(monkeypatch, [0.9])
    one = lorafit.train(lorafit.load_config(None, tiny_overrides(tiny_bert, tiny_data, **settings, **{"train.epochs": 1})),
                        tmp_path / "one")
    _scripted_validation(monkeypatch, [0.1, 0.2, 0.3])
    last = lorafit.train(lorafit.load_config(None, tiny_overrides(tiny_bert, tiny_data, **settings, **{"train.epochs": 3})),
                         tmp_path / "last")
    read = lambda run: json.loads((run / "eval.json").read_text())  # noqa: E731
    assert read(tmp_path / "stopped") == read(tmp_path / "one")
    assert read(tmp_path / "last") != read(tmp_path / "one")  # epoch 3 differs: testing it would be caught


def test_keep_last_tests_the_final_epoch_even_when_validation_peaked_earlier(tiny_bert, tiny_data, tmp_path, monkeypatch):
    """train.keep=last: validation peaks at epoch 1, but the run keeps, saves and tests epoch 3's weights --
    the same as a plain 3-epoch run whose validation happens to rise every epoch; with train.keep=best
    (the default) the same scripted validation tests epoch 1's, which differ."""
    settings = {"train.schedule": "constant", "train.warmup": 0, "train.lr": 5e-3, "train.epochs": 3}
    _scripted_validation(monkeypatch, [0.9, 0.5, 0.4])
    kept = lorafit.train(lorafit.load_config(None, tiny_overrides(tiny_bert, tiny_data, **settings, **{"train.keep": "last"})),
                         tmp_path / "last")
    assert kept.summary["best_epoch"] == 3 and kept.summary["best_validation"] == {"accuracy": 0.4}
    _scripted_validation(monkeypatch, [0.1, 0.2, 0.3])
    rising = lorafit.train(lorafit.load_config(None, tiny_overrides(tiny_bert, tiny_data, **settings)), tmp_path / "rising")
    _scripted_validation(monkeypatch, [0.9, 0.5, 0.4])
    best = lorafit.train(lorafit.load_config(None, tiny_overrides(tiny_bert, tiny_data, **settings)), tmp_path / "best")
    assert best.summary["best_epoch"] == 1
    read = lambda run: json.loads((run / "eval.json").read_text())  # noqa: E731
    assert read(tmp_path / "last") == read(tmp_path / "rising")
    assert read(tmp_path / "best") != read(tmp_path / "last")
    assert (RunDir(tmp_path / "last").path / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (RunDir(tmp_path / "rising").path / "adapter" / "adapter_model.safetensors").read_bytes()


def test_keep_last_with_patience_is_one_config_error():
    with pytest.raises(UserError, match="train.patience stops on validation"):
        lorafit.load_config(None, ["train.keep=last", "train.patience=2"])
