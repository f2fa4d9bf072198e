"""A run folder travels: its adapter names the base by hub id, not by a folder on the machine that
trained it, and a copy loads on a machine where only that hub id resolves (issue 20)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import lorafit
from lorafit.models import build_classifier, hub_id, resolve_model_path

from conftest import build_tiny_encoder, tiny_overrides, write_dataset

HUB_ID = "lorafit-test/tiny-bert"
REVISION = "0123456789abcdef0123456789abcdef01234567"
TEXTS = ["pizza please", "my golf trip", "tennis and a hotel", "the card", "salad salad"]


def cache_snapshot(hf_home: Path, repo_id: str, model: Path | None = None) -> Path:
    """A Hugging Face hub cache under `hf_home` holding `repo_id` at main (the layout
    huggingface_hub writes; offline, `from_pretrained(repo_id)` reads it)."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / REVISION
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(REVISION)
    if model is not None:
        shutil.copytree(model, snapshot)
    return snapshot


def test_hub_ids_recorded_for_aliases_caches_and_folders(tmp_path, monkeypatch):
    assert hub_id("minilm-l6") == hub_id("all-minilm-l6-v2") == "sentence-transformers/all-MiniLM-L6-v2"
    assert hub_id("org/some-model") == "org/some-model"
    snapshot = build_tiny_encoder(cache_snapshot(tmp_path / "hf", HUB_ID))
    assert hub_id(str(snapshot)) == HUB_ID
    # A git clone from the hub names its repository in .git/config.
    clone = build_tiny_encoder(tmp_path / "clone")
    (clone / ".git").mkdir()
    (clone / ".git" / "config").write_text('[remote "origin"]\n\turl = https://huggingface.co/acme/encoder-x.git\n')
    assert hub_id(str(clone)) == "acme/encoder-x"
    # A folder of unknown origin keeps the name the user gave (not the resolved absolute path).
    plain = build_tiny_encoder(tmp_path / "plain")
    monkeypatch.chdir(tmp_path)
    assert hub_id("plain") == "plain"
    assert resolve_model_path("plain") == str(plain.resolve())


def test_model_built_from_the_alias_names_its_hub_id():
    """The built-in model's adapters name sentence-transformers/all-MiniLM-L6-v2, not the package folder."""
    from lorafit.config import ModelConfig

    model = build_classifier(ModelConfig(name="minilm-l6"), 3, 0)
    assert model.name_or_path == "sentence-transformers/all-MiniLM-L6-v2"
    assert Path(resolve_model_path("minilm-l6")).is_dir()  # the local resolution is unchanged


def test_copied_run_loads_where_only_the_hub_id_resolves(tmp_path):
    from peft import PeftConfig

    snapshot = build_tiny_encoder(cache_snapshot(tmp_path / "here", HUB_ID))
    data = write_dataset(tmp_path / "data")
    run = tmp_path / "run"
    lorafit.train(lorafit.load_config(None, tiny_overrides(snapshot, data, **{"train.epochs": 1})), run)
    recorded = json.loads((run / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == HUB_ID
    assert str(tmp_path) not in (run / "adapter" / "adapter_config.json").read_text()  # nothing machine-local
    assert PeftConfig.from_pretrained(str(run / "adapter")).base_model_name_or_path == HUB_ID  # what plain peft sees
    expected = lorafit.load(run).logits(TEXTS)

    # "Another machine": the run copied elsewhere, the folder it trained from gone, the base only in
    # a hub cache under its id, no network.
    copied = tmp_path / "elsewhere" / "run"
    shutil.copytree(run, copied)
    (tmp_path / "here").rename(tmp_path / "gone")
    other_home = tmp_path / "other-machine-hf"
    cache_snapshot(other_home, HUB_ID, tmp_path / "gone" / snapshot.relative_to(tmp_path / "here"))
    env = {**os.environ, "HF_HOME": str(other_home), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    out = tmp_path / "logits.npz"
    code = ("import sys, numpy as np, lorafit; from lorafit.serve import Limits, Registry; "
            "run, out, texts = sys.argv[1], sys.argv[2], sys.argv[3:]; "
            "served = Registry(Limits()).add('a', run); "  # the server's shared-base path, too
            "np.savez(out, load=lorafit.load(run).logits(texts), serve=served.logits(texts))")
    result = subprocess.run([sys.executable, "-c", code, str(copied), str(out), *TEXTS], env=env,
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    got = np.load(out)
    np.testing.assert_allclose(got["load"], expected, atol=1e-5)
    np.testing.assert_allclose(got["serve"], expected, atol=1e-5)


def test_copied_run_without_a_hub_id_fails_clearly(tmp_path, tiny_bert):
    """A base of unknown origin cannot travel: loading the copy elsewhere names the missing model."""
    model = tmp_path / "mine"
    shutil.copytree(tiny_bert, model)
    data = write_dataset(tmp_path / "data")
    run = tmp_path / "run"
    lorafit.train(lorafit.load_config(None, tiny_overrides(model, data, **{"train.epochs": 1})), run)
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(model)
    model.rename(tmp_path / "moved")
    with pytest.raises(lorafit.UserError, match="cannot load model"):
        lorafit.load(run)


def test_only_a_recorded_hub_id_stands_in_for_a_missing_base(tmp_path):
    from lorafit.config import ModelConfig
    from lorafit.inference import base_model_config

    adapter = tmp_path / "adapter"
    adapter.mkdir()

    def chosen(name: str, recorded: str) -> str:
        (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": recorded}))
        return base_model_config(ModelConfig(name=name), adapter).name

    missing = str(tmp_path / "gone" / "model")
    assert chosen(missing, HUB_ID) == HUB_ID  # the copied-run case
    assert chosen(missing, str(tmp_path / "elsewhere")) == missing  # a recorded path is no better
    assert chosen("bert-base-uncased", missing) == "bert-base-uncased"  # a hub id in the config stays
    assert chosen("minilm-l6", HUB_ID) == "minilm-l6"  # an alias resolves here
    present = build_tiny_encoder(tmp_path / "present")
    assert chosen(str(present), HUB_ID) == str(present)  # a base that is here is used
