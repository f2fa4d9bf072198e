"""`lorafit soup`: the runs' merged weights averaged into one merged-format folder, calibrated on validation
only where every run held out the same validation examples."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from safetensors.numpy import load_file

import lorafit
from lorafit.cli import main
from lorafit.evaluate import softmax
from lorafit.export import export

from conftest import synthetic_frame, tiny_overrides, write_dataset


@pytest.fixture
def with_validation(tmp_path):
    folder = write_dataset(tmp_path / "data-val")
    synthetic_frame(30, 7).to_csv(folder / "validation.csv", index=False)
    return folder


def _runs(tiny_bert, data, tmp_path, seeds=(0, 1), **extra):
    runs = []
    for seed in seeds:
        out = tmp_path / f"run-{seed}"
        settings = {"train.lr": 2e-2, "train.epochs": 6, **extra}  # runs that learn the keywords (~75%)
        lorafit.train(lorafit.load_config(None, tiny_overrides(tiny_bert, data, seed=seed, **settings)), out)
        runs.append(out)
    return runs


def test_soup_averages_the_merged_weights_and_calibrates_on_the_shared_validation(tiny_bert, with_validation, tmp_path, capsys):
    runs = _runs(tiny_bert, with_validation, tmp_path)
    assert main(["soup", *map(str, runs), "--out", str(tmp_path / "soup")]) == 0
    assert "held out by every run" in capsys.readouterr().out
    # every tensor is the mean of the runs' merged tensors (as `lorafit export --format merged` writes them)
    merged = []
    for run in runs:
        export(run, "merged", tmp_path / f"{run.name}-merged")
        merged.append(load_file(str(tmp_path / f"{run.name}-merged" / "model.safetensors")))
    souped = load_file(str(tmp_path / "soup" / "model.safetensors"))
    assert souped.keys() == merged[0].keys()
    for key in souped:
        np.testing.assert_allclose(souped[key], (merged[0][key] + merged[1][key]) / 2, atol=1e-6, err_msg=key)
    assert any(np.abs(merged[0][k] - merged[1][k]).max() > 1e-3 for k in souped)  # the seeds did differ
    meta = json.loads((tmp_path / "soup" / "export.json").read_text())
    assert meta["format"] == "merged" and meta["soup"]["seeds"] == [0, 1] and len(meta["soup"]["runs"]) == 2
    # calibrated on the validation split both runs held out: the temperature that minimises its NLL
    soup = lorafit.load(tmp_path / "soup")
    record = json.loads((tmp_path / "soup" / "ood.json").read_text())
    assert soup.temperature == record["temperature"] == meta["calibration"]["temperature"] and soup.threshold is not None
    validation = pd.read_csv(with_validation / "validation.csv")
    logits = soup.logits(list(validation["text"]))
    targets = np.array([soup.labels.index(label) for label in validation["label"]])
    nll = lambda t: -np.mean(np.log(softmax(logits / t)[np.arange(len(targets)), targets]))  # noqa: E731
    assert nll(soup.temperature) <= min(nll(soup.temperature * 1.05), nll(soup.temperature / 1.05)) + 1e-9
    assert main(["eval", str(tmp_path / "soup")]) == 0


def test_a_soup_of_one_run_twice_is_that_run(tiny_bert, with_validation, tmp_path):
    run = _runs(tiny_bert, with_validation, tmp_path, seeds=(0,))[0]
    lorafit.soup([run, run], tmp_path / "soup")
    texts = ["pizza please", "my golf trip", "the card", "a long trip by train to the match"]
    np.testing.assert_allclose(lorafit.load(tmp_path / "soup").logits(texts), lorafit.load(run).logits(texts), atol=1e-5)


def test_runs_with_different_validation_splits_give_an_uncalibrated_soup(tiny_bert, tiny_data, tmp_path):
    runs = _runs(tiny_bert, tiny_data, tmp_path)  # validation carved from train with each run's seed
    meta = lorafit.soup(runs, tmp_path / "soup")
    assert meta["calibration"].startswith("none: the runs held out different validation examples")
    assert not (tmp_path / "soup" / "ood.json").exists()
    soup = lorafit.load(tmp_path / "soup")
    assert soup.temperature == 1.0 and soup.threshold is None


def test_bad_soups_fail_in_one_line_and_write_nothing(tiny_bert, with_validation, tiny_data, tmp_path, capsys):
    a, b = _runs(tiny_bert, with_validation, tmp_path)
    other = tmp_path / "other"
    lorafit.train(lorafit.load_config(None, tiny_overrides(tiny_bert, tiny_data, **{"data.max_length": 16})), other)
    capsys.readouterr()
    cases = [([str(a)], "a soup needs at least two runs"),
             ([str(a), str(other)], "only runs of one data.max_length average"),
             ([str(a), str(tmp_path / "missing")], "missing"),
             ([str(a), str(b), "--out", str(a / "inside")], "--out must be outside the runs' folders")]
    for args, message in cases:
        out = ["--out", str(tmp_path / "soup")] if "--out" not in args else []
        assert main(["soup", *args, *out]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "soup").exists() and not (a / "inside").exists()
    lorafit.soup([a, b], tmp_path / "soup")
    capsys.readouterr()
    assert main(["card", str(tmp_path / "soup")]) == 2  # no run's figures are the soup's
    assert "is a soup of 2 runs" in capsys.readouterr().err


def test_a_soup_exports_to_onnx_with_its_calibration(tiny_bert, with_validation, tmp_path, capsys):
    """A soup has no run folder to export from: `lorafit export SOUP --format onnx` traces its merged weights,
    passes the float parity check against it, and carries its temperature and threshold; other formats are
    refused in one line."""
    runs = _runs(tiny_bert, with_validation, tmp_path)
    lorafit.soup(runs, tmp_path / "soup")
    capsys.readouterr()
    assert main(["export", str(tmp_path / "soup"), "--format", "onnx", "--out", str(tmp_path / "onnx")]) == 0
    meta = json.loads((tmp_path / "onnx" / "export.json").read_text())
    assert meta["parity"]["passed"] and meta["soup"]["seeds"] == [0, 1] and meta["method"] == "soup"
    soup, onnx = lorafit.load(tmp_path / "soup"), lorafit.load(tmp_path / "onnx")
    texts = ["pizza please", "my golf trip", "the card", "a long trip by train to the match"]
    np.testing.assert_allclose(onnx.logits(texts), soup.logits(texts), atol=1e-4)
    assert (onnx.temperature, onnx.threshold) == (soup.temperature, soup.threshold) and soup.threshold is not None
    capsys.readouterr()
    assert main(["export", str(tmp_path / "soup"), "--format", "merged", "--out", str(tmp_path / "m")]) == 2
    assert "is a soup (merged weights): it exports to --format onnx only" in capsys.readouterr().err


def test_an_adapter_soup_of_lora_runs_computes_the_merged_soup(tiny_bert, with_validation, tmp_path, capsys):
    """`--adapter`: plain LoRA runs (here of different ranks and scales) as one LoRA adapter of rank r_a + r_b
    giving the merged soup's logits; it serves on a shared base and exports merged and ONNX. A DoRA run is
    refused in one line."""
    from fastapi.testclient import TestClient

    from lorafit.serve import create_app

    a = _runs(tiny_bert, with_validation, tmp_path / "a", seeds=(0,), **{"method.name": "rslora"})[0]
    b = _runs(tiny_bert, with_validation, tmp_path / "b", seeds=(1,), **{"method.rank": 2, "method.alpha": 8})[0]
    lorafit.soup([a, b], tmp_path / "merged-soup")
    assert main(["soup", str(a), str(b), "--adapter", "--out", str(tmp_path / "adapter-soup")]) == 0
    config = json.loads((tmp_path / "adapter-soup" / "adapter_config.json").read_text())
    assert config["r"] == 4 + 2 and config["lora_alpha"] == 6
    recorded = lorafit.load_config(tmp_path / "adapter-soup" / "config.yaml").method  # what every reader builds
    assert (recorded.name, recorded.rank, recorded.alpha) == ("lora", 6, 6.0)
    texts = ["pizza please", "my golf trip", "the card", "a long trip by train to the match"]
    merged, adapter = lorafit.load(tmp_path / "merged-soup"), lorafit.load(tmp_path / "adapter-soup")
    np.testing.assert_allclose(adapter.logits(texts), merged.logits(texts), atol=1e-5)
    assert adapter.temperature == pytest.approx(merged.temperature, rel=1e-3)
    with TestClient(create_app([("soup", str(tmp_path / "adapter-soup"), None)])) as client:
        assert client.get("/v1/adapters").json()["adapters"][0]["shared_base"]
        served = client.post("/v1/predict", json={"texts": texts, "top_k": 1}).json()["predictions"]
    assert [p["label"] for p in served] == [merged.labels[i] for i in merged.logits(texts).argmax(-1)]
    assert main(["export", str(tmp_path / "adapter-soup"), "--format", "merged", "--out", str(tmp_path / "m")]) == 0
    np.testing.assert_allclose(lorafit.load(tmp_path / "m").logits(texts), merged.logits(texts), atol=1e-5)
    assert main(["export", str(tmp_path / "adapter-soup"), "--format", "onnx", "--out", str(tmp_path / "o")]) == 0
    capsys.readouterr()
    assert main(["export", str(tmp_path / "o"), "--format", "onnx", "--out", str(tmp_path / "o2")]) == 2
    assert "is an export (onnx) of a soup; export the soup folder itself" in capsys.readouterr().err
    for method in ("dora", "native-lora"):
        other = _runs(tiny_bert, with_validation, tmp_path / method, seeds=(2,), **{"method.name": method})[0]
        capsys.readouterr()
        assert main(["soup", str(a), str(other), "--adapter", "--out", str(tmp_path / "x")]) == 2
        assert "is not a plain LoRA adapter" in capsys.readouterr().err and not (tmp_path / "x").exists()
