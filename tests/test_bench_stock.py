"""bench/stock_recipe.py, the stock baseline of bench/speed.py, scores what the Trainer predicted against the
right labels under the Trainer's length grouping (which since huggingface/transformers#33514 also reorders
evaluation)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lorafit.config import load_config
from lorafit.train import train

from conftest import build_tiny_encoder, tiny_overrides, write_dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A lorafit run folder: stock_recipe.py reads its train and test rows and labels (and its own tiny encoder,
    built here, not shared with other tests)."""
    root = tmp_path_factory.mktemp("stock")
    model = build_tiny_encoder(root / "model")
    data = write_dataset(root / "data", n_train=150, n_test=90)
    return train(load_config(None, tiny_overrides(model, data, **{"train.epochs": 1})), root / "run").path


def test_the_length_grouped_stock_recipe_scores_its_own_predictions(tiny_run, tmp_path):
    """Full fine-tuning of the tiny encoder learns the keyword task (3 classes, chance 1/3) well beyond chance
    on test with the Trainer's length grouping; scored against the dataset's label column, its shuffled
    predictions read as chance."""
    out = tmp_path / "stock.json"
    command = [sys.executable, str(ROOT / "bench" / "stock_recipe.py"), str(tiny_run), "--method", "full", "--lr", "2e-3",
               "--epochs", "30", "--batch-size", "16", "--threads", "1", "--group-by-length", "--out", str(out)]
    subprocess.run(command, check=True, capture_output=True, cwd=ROOT)
    result = json.loads(out.read_text())
    assert result["sampler"] == "LengthGroupedSampler"
    assert result["eval_sampler"] == "LengthGroupedSampler"
    assert result["test_accuracy"] > 0.8, result


def test_the_stock_recipe_trains_the_same_numbers_in_every_process(tiny_run, tmp_path):
    """The model is made after the seed is set: this PyTorch seeds its generator from the OS at start-up, so
    an unseeded head differed per process (the test above then scored 0.67 in some processes, 1.0 in others)."""
    losses = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.json"
        subprocess.run([sys.executable, str(ROOT / "bench" / "stock_recipe.py"), str(tiny_run), "--method", "lora",
                        "--epochs", "1", "--threads", "1", "--out", str(out)], check=True, capture_output=True, cwd=ROOT)
        losses.append(json.loads(out.read_text())["train_loss"])
    assert losses[0] == losses[1]
