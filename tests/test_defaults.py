"""The defaults a run takes without a config file, and the rule that no choice ever reads test.

`lorafit train --data NAME --out DIR` must pick a whole recipe: epochs from the training set's size
(train.epochs=auto), the method's own learning rates (null train.lr / train.head_lr), and it must write
the numbers it chose into config.yaml, so the run folder says what trained. Every choice a run makes
(best epoch, early stopping, temperature, out-of-scope threshold, trained weights) depends on train and
validation only: two runs that differ only in their test file must make the same choices.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from safetensors.numpy import load_file

from lorafit.cli import main
from lorafit.config import AUTO_EPOCHS, load_config, resolve
from lorafit.methods import registry

from conftest import synthetic_frame, tiny_overrides


@pytest.mark.parametrize("n_train,batch,accum,epochs", [
    (9000, 32, 1, 4),     # Banking77 (10% carved out for validation): 282 steps/epoch -> 4 epochs, 1,128 steps
    (4906, 32, 1, 8),     # TREC-6: 154 steps/epoch -> 8
    (13084, 32, 1, 3),    # SNIPS: 409 steps/epoch -> 3
    (16000, 32, 1, 3),    # emotion: 500 steps/epoch -> 3 (the floor)
    (770, 32, 1, 20),     # Banking77 10-shot: 25 steps/epoch -> 44, capped at 20
    (9000, 16, 2, 4),     # steps count optimiser steps: 16 x 2 accumulated is batch 32's schedule
])
def test_auto_epochs_aim_at_a_number_of_optimiser_steps(n_train, batch, accum, epochs):
    cfg = load_config(None, [f"train.batch_size={batch}", f"train.grad_accum={accum}"])
    assert cfg.train.epochs == "auto"
    resolved_cfg, resolved = resolve(cfg, n_train)
    assert resolved_cfg.train.epochs == epochs == resolved["train.epochs"]
    assert AUTO_EPOCHS[0] <= epochs <= AUTO_EPOCHS[1]


def test_a_given_epoch_count_and_learning_rates_are_kept():
    cfg = load_config(None, ["train.epochs=7", "train.lr=3e-4", "train.head_lr=1e-3"])
    resolved_cfg, resolved = resolve(cfg, 9000)
    assert resolved == {}
    assert (resolved_cfg.train.epochs, resolved_cfg.train.lr, resolved_cfg.train.head_lr) == (7, 3e-4, 1e-3)


@pytest.mark.parametrize("method,lr,head_lr", [("lora", 2e-3, 5e-3), ("full", 1e-4, 2e-3), ("dora", 2e-3, 5e-3),
                                               ("loraplus", 5e-4, 5e-3), ("ia3", 1e-2, 5e-3)])
def test_null_learning_rates_take_the_methods_own(method, lr, head_lr):
    cfg = load_config(None, [f"method.name={method}"])
    resolved_cfg, resolved = resolve(cfg, 9000)
    assert (resolved_cfg.train.lr, resolved_cfg.train.head_lr) == (lr, head_lr)
    assert resolved["train.lr"] == lr and resolved["train.head_lr"] == head_lr


def test_a_method_without_a_head_rate_gives_the_head_train_lr(monkeypatch):
    monkeypatch.setattr(registry.get("lora"), "default_head_lr", None)
    resolved_cfg, _ = resolve(load_config(None, ["train.lr=3e-4"]), 9000)
    assert resolved_cfg.train.head_lr == 3e-4


def assert_same_recipe(a, b) -> None:
    """Two resolved configs have the same data, model, method, train, contrastive and ood sections."""
    for section in ("data", "model", "method", "train", "contrastive", "ood"):
        assert getattr(a, section) == getattr(b, section), section


def test_the_default_recipe_is_the_shipped_banking77_lora_one():
    """README: the shipped Banking77 LoRA config differs from the defaults only in naming its dataset and
    its validation share (which is the default too); resolved on Banking77's 9,000 training examples the
    two are the same recipe."""
    shipped, _ = resolve(load_config("configs/banking77-lora.yaml"), 9000)
    default, _ = resolve(load_config(None, ["data.name=banking77"]), 9000)
    assert_same_recipe(default, shipped)


def test_train_with_only_data_and_out_records_what_it_chose(tiny_bert, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    synthetic_frame(90, seed=3).to_csv(data / "train.csv", index=False)
    synthetic_frame(30, seed=4).to_csv(data / "test.csv", index=False)
    out = tmp_path / "run"
    # Only what a tiny random model needs besides the defaults: the model, a thread and no progress bars.
    assert main(["train", "--data", str(data), "--out", str(out), f"model.name={tiny_bert}", "train.threads=1",
                 "train.progress=false"]) == 0
    recorded = yaml.safe_load((out / "config.yaml").read_text())
    # 81 training rows at batch 32: 3 steps per epoch; 1,100 steps would be 367 epochs, capped at 20.
    assert recorded["train"]["epochs"] == 20 and recorded["train"]["lr"] == 2e-3 and recorded["train"]["head_lr"] == 5e-3
    assert recorded["derived"]["resolved"] == {"train.epochs": 20, "train.lr": 2e-3, "train.head_lr": 5e-3}
    assert recorded["derived"]["total_steps"] == 60
    assert recorded["method"]["name"] == "lora" and recorded["method"]["rank"] == 16
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 60


def test_data_flag_and_data_name_override_conflict(tmp_path, capsys):
    assert main(["train", "--data", "banking77", "data.name=emotion", "--out", str(tmp_path / "run")]) == 2
    assert "--data and data.name=" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def _write(folder, test_seed: int, n_test: int, shuffle_labels: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    synthetic_frame(90, seed=3).to_csv(folder / "train.csv", index=False)
    validation = synthetic_frame(24, seed=5)
    oos = validation.iloc[:6].assign(label="oos", text=lambda f: f.text.str.replace("flight", "golf"))
    pd.concat([validation.iloc[6:], oos]).to_csv(folder / "validation.csv", index=False)
    test = synthetic_frame(n_test, seed=test_seed)
    if shuffle_labels:
        test["label"] = test["label"].sample(frac=1.0, random_state=0).to_numpy()
    test.loc[:3, "label"] = "oos"
    test.to_csv(folder / "test.csv", index=False)


def _choices(run) -> dict:
    """Everything a run chose: its epochs' validation figures, best epoch, early stop, fitted
    temperature/threshold/feature statistics, and the trained weights."""
    epochs = [{k: v for k, v in r.items() if k not in ("seconds", "examples_per_second")}
              for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["type"] == "epoch"]
    summary = json.loads((run / "summary.json").read_text())
    weights = load_file(run / "adapter" / "adapter_model.safetensors")
    return {"epochs": epochs, "best_epoch": summary["best_epoch"], "stopped_early": summary.get("stopped_early"),
            "ood": json.loads((run / "ood.json").read_text()),
            "weights": {k: v.tobytes() for k, v in sorted(weights.items())}}


def test_no_choice_reads_the_test_split(tiny_bert, tmp_path):
    """Two runs on the same train and validation files, one of them with another test file (other texts, labels
    shuffled, another size): every choice must be identical. A selection that read test (a best epoch picked
    on it, a threshold or temperature fitted on it) would make them differ."""
    runs = []
    for name, test_seed, n_test, shuffle in (("a", 11, 30, False), ("b", 12, 45, True)):
        data = tmp_path / f"data_{name}"
        _write(data, test_seed, n_test, shuffle)
        out = tmp_path / f"run_{name}"
        overrides = tiny_overrides(tiny_bert, data, **{"train.epochs": 4, "train.patience": 1, "data.oos_label": "oos",
                                                       "ood.score": "mahalanobis", "train.metric": "loss"})
        assert main(["train", *overrides, "--out", str(out)]) == 0
        runs.append(out)
    a, b = (_choices(r) for r in runs)
    for key in a:
        assert a[key] == b[key], f"{key} depends on the test split"
    # ...while the test figures themselves differ, so the two test files did reach the evaluation.
    eval_a, eval_b = (json.loads((r / "eval.json").read_text()) for r in runs)
    assert (eval_a["examples"], eval_a["ood"]) != (eval_b["examples"], eval_b["ood"])
    assert np.isfinite(a["ood"]["temperature"])


def test_overrides_may_follow_the_options(tmp_path, capsys):
    """`lorafit train CONFIG --out DIR key=value`: the override after --out is read as one (argparse alone
    rejected it as an unrecognised argument); here a bad one, so the run stops at the config check."""
    assert main(["train", "configs/banking77-lora.yaml", "--out", str(tmp_path / "run"), "train.lr=-1"]) == 2
    err = capsys.readouterr().err
    assert "train.lr" in err and "unrecognized" not in err
    assert not (tmp_path / "run").exists()
    with pytest.raises(SystemExit):
        main(["train", "configs/banking77-lora.yaml", "--out", str(tmp_path / "run"), "not-an-override"])
    assert "unrecognized arguments: not-an-override" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "-2", "abc", "2.5"])
def test_a_bad_epoch_count_is_one_clear_message(value, capsys):
    assert main(["config", "show", f"train.epochs={value}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lorafit: error: config error: train.epochs: give a whole number of epochs above 0, or auto"), err
    assert "literal" not in err and "constrained" not in err


SHIPPED = sorted((Path(__file__).parents[1] / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", [p for p in SHIPPED if "sweeps" not in p.parts], ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    cfg = load_config(str(path), [])
    assert cfg.data.name and cfg.model.name


def test_the_emotion_few_shot_config_is_the_measured_recipe():
    """configs/emotion-8shot.yaml is exactly what bench/fewshot.py's contrastive20 variants trained: the
    Banking77 few-shot recipe with emotion's draw and a 20-epoch contrastive stage (README figures)."""
    configs = Path(__file__).parents[1] / "configs"
    measured = load_config(str(configs / "banking77-10shot.yaml"), ["data.name=emotion", "data.shots_per_class=8",
                                                             "contrastive.epochs=20", "contrastive.batch_size=48", "train.epochs=10"])
    assert load_config(str(configs / "emotion-8shot.yaml"), []) == measured


def test_the_emotion_full_config_is_the_measured_recipe():
    """configs/emotion-full.yaml is what bench/ablations.py's `full` variant trained on emotion (the README's
    figures): the defaults with method.name=full, resolved on emotion's 16,000 training tweets, written out."""
    shipped, shipped_choices = resolve(load_config("configs/emotion-full.yaml"), 16000)
    measured, _ = resolve(load_config(None, ["data.name=emotion", "method.name=full"]), 16000)
    assert_same_recipe(shipped, measured)
    assert shipped.train.epochs == 3 and shipped_choices == {}  # nothing left for the defaults to choose


def test_the_fast_banking77_config_is_the_measured_recipe():
    """configs/banking77-lora-fast.yaml is exactly the recipe the README's time-to-93.5% figures trained:
    the shipped Banking77 LoRA config with adapters on layers 3-5, the frozen layers cached, in bf16."""
    configs = Path(__file__).parents[1] / "configs"
    measured = load_config(str(configs / "banking77-lora.yaml"),
                           ["method.layers=[3,4,5]", "train.cache_frozen_layers=true", "train.precision=bf16"])
    assert load_config(str(configs / "banking77-lora-fast.yaml"), []) == measured
