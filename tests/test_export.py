"""`lorafit export`: every format reloads from its own files and matches the trained model."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

import lorafit
from lorafit import evaluate
from lorafit import export as export_module
from lorafit.cli import main
from lorafit.errors import UserError
from lorafit.export import export

from conftest import tiny_overrides, write_dataset


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("export-data"), n_train=150, n_test=40)


def _train(tiny_bert, data_dir, out, **extra):
    overrides = tiny_overrides(tiny_bert, data_dir, **{"train.epochs": 3, **extra})
    if extra.get("method.name") in ("full", "ia3"):
        overrides = [o for o in overrides if not o.startswith(("method.rank", "method.alpha"))]
    lorafit.train(lorafit.load_config(None, overrides), out)
    return out


@pytest.fixture(scope="module")
def lora_run(tiny_bert, data_dir, tmp_path_factory):
    return _train(tiny_bert, data_dir, tmp_path_factory.mktemp("export-runs") / "lora")


def _test_texts(data_dir) -> list[str]:
    return pd.read_csv(data_dir / "test.csv").text.tolist()


@pytest.mark.parametrize("fmt,quantize,files", [
    ("merged", None, {"config.json", "model.safetensors", "modeling_lorafit.py", "tokenizer.json", "tokenizer_config.json"}),
    ("adapter", None, {"adapter_config.json", "adapter_model.safetensors"}),
    ("onnx", None, {"model.onnx", "tokenizer.json", "tokenizer_config.json"}),
    ("onnx", "int8", {"model.onnx", "tokenizer.json", "tokenizer_config.json"}),
])
def test_export_reloads_with_parity(lora_run, data_dir, tmp_path, fmt, quantize, files):
    out = tmp_path / "exported"
    meta = export(lora_run, fmt, out, quantize=quantize)
    assert {p.name for p in out.iterdir()} == files | {"export.json", "config.yaml", "labels.json", "ood.json", "README.md"}  # README: the model card
    assert not list(tmp_path.glob(".*partial*")), "the temporary folder must be gone"
    assert [p.name for p in tmp_path.iterdir()] == ["exported"], "no temporary or replaced folder is left beside it"
    assert json.loads((out / "export.json").read_text()) == meta
    parity = meta["parity"]
    assert parity["passed"] and parity["split"] == "validation" and parity["examples"] == 15
    assert meta["files"] == {p.name: p.stat().st_size for p in out.iterdir() if p.is_file() and p.name != "export.json"} | {"export.json": meta["files"]["export.json"]}

    # The export, loaded on its own, gives the trained model's logits on unseen texts too.
    texts = _test_texts(data_dir)
    reference = lorafit.load(lora_run).logits(texts)
    exported = lorafit.load(out)
    assert exported.kind == fmt
    logits = exported.logits(texts)
    if quantize:
        assert (logits.argmax(-1) == reference.argmax(-1)).mean() >= 0.9
        assert np.abs(logits - reference).max() > 0, "int8 weights should change the logits a little"
    else:
        assert np.abs(logits - reference).max() <= 1e-4
        assert parity["max_abs_logit_diff"] <= 1e-4 and parity["top1_agreement"] == 1.0
    assert exported.predict(texts[:2], top_k=2)[0][0][0] in {"food", "sport", "travel"}


def test_merged_loads_in_plain_transformers_and_pipeline(lora_run, data_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    out = tmp_path / "merged"
    export(lora_run, "merged", out)
    texts = _test_texts(data_dir)
    reference = lorafit.load(lora_run)
    expected = reference.logits(texts)

    model = AutoModelForSequenceClassification.from_pretrained(out, trust_remote_code=True).eval()
    assert model.config.id2label == dict(enumerate(["food", "sport", "travel"]))
    tokenizer = AutoTokenizer.from_pretrained(out)
    batch = tokenizer(texts, padding=True, return_tensors="pt")  # padded together: mean pooling must mask
    with torch.no_grad():
        logits = model(**batch).logits.numpy()
    assert np.abs(logits - expected).max() <= 1e-4

    classify = pipeline("text-classification", model=str(out), trust_remote_code=True)
    got = classify(texts[:8])
    want = reference.predict(texts[:8], top_k=1)
    assert [g["label"] for g in got] == [w[0][0] for w in want]
    # transformers' pipeline knows nothing of the run's temperature (ood.json): its scores are the
    # softmax of the raw logits; lorafit.load's are calibrated (logits / T)
    raw = evaluate.softmax(expected[:8]).max(-1)
    assert [g["score"] for g in got] == pytest.approx(raw.tolist(), abs=1e-5)
    calibrated = evaluate.softmax(expected[:8] / reference.temperature).max(-1)
    assert [w[0][1] for w in want] == pytest.approx(calibrated.tolist(), abs=1e-5)


def test_merged_refuses_to_load_as_a_stock_model_without_its_code(lora_run, tmp_path):
    """Without trust_remote_code the folder must fail, not load into a [CLS]-pooling stock class."""
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "merged"
    export(lora_run, "merged", out)
    with pytest.raises((ValueError, OSError, KeyError)):
        AutoModelForSequenceClassification.from_pretrained(out, trust_remote_code=False)


@pytest.mark.parametrize("method", ["full", "dora", "adalora", "ia3", "loha"])
def test_merged_export_of_each_method(tiny_bert, data_dir, tmp_path, method):
    extra = {"method.name": method}
    if method == "adalora":
        extra.update({"method.init_rank": 6, "method.rank": 4})
    run = _train(tiny_bert, data_dir, tmp_path / "run", **extra)
    meta = export(run, "merged", tmp_path / "merged")
    assert meta["parity"]["passed"] and meta["parity"]["max_abs_logit_diff"] <= 1e-4
    texts = _test_texts(data_dir)
    assert np.abs(lorafit.load(tmp_path / "merged").logits(texts) - lorafit.load(run).logits(texts)).max() <= 1e-4


def test_broken_parity_fails_and_leaves_nothing(lora_run, tmp_path, monkeypatch):
    monkeypatch.setitem(export_module.TOLERANCES, "float32", {"max_abs_logit_diff": -1.0})
    out = tmp_path / "merged"
    with pytest.raises(UserError, match="breaks parity.*nothing was written"):
        export(lora_run, "merged", out)
    assert not out.exists()
    assert not list(tmp_path.iterdir())


def test_predict_cli_on_an_onnx_export(lora_run, tmp_path, capsys):
    out = tmp_path / "onnx"
    assert main(["export", str(lora_run), "--format", "onnx", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "parity:" in printed and "top-1 agreement 100.00%" in printed
    assert main(["predict", str(out), "pizza please", "--json"]) == 0
    line = json.loads(capsys.readouterr().out.strip())
    assert line["predictions"][0]["label"] in {"food", "sport", "travel"}
    assert line["predictions"] == sorted(line["predictions"], key=lambda p: -p["probability"])


@pytest.mark.parametrize("args,message", [
    (["--format", "merged", "--quantize", "int8"], "applies to --format onnx only"),
    (["--format", "adapter"], None),  # fine for LoRA; checked for `full` below
])
def test_export_bad_requests(lora_run, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    code = main(["export", str(lora_run), *args, "--out", str(out)])
    if message is None:
        assert code == 0
        # Exporting again to the same folder is refused; an export is not exported again.
        assert main(["export", str(lora_run), *args, "--out", str(out)]) == 2
        assert "already exists" in capsys.readouterr().err
        assert main(["export", str(out), "--format", "merged", "--out", str(tmp_path / "again")]) == 2
        assert "already an export" in capsys.readouterr().err
        return
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_export_inside_the_run_and_adapter_of_full_refused(tiny_bert, data_dir, lora_run, tmp_path, capsys):
    assert main(["export", str(lora_run), "--format", "merged", "--out", str(lora_run / "merged")]) == 2
    assert "outside the run folder" in capsys.readouterr().err
    # A parent of the run, even with --overwrite, would delete the run itself.
    assert main(["export", str(lora_run), "--format", "merged", "--out", str(lora_run.parent), "--overwrite"]) == 2
    assert "must not contain it" in capsys.readouterr().err and (lora_run / "adapter").is_dir()
    (tmp_path / "a-file").write_text("x")
    assert main(["export", str(lora_run), "--format", "merged", "--out", str(tmp_path / "a-file")]) == 2
    assert "a-file exists and is not a folder" in capsys.readouterr().err
    full = _train(tiny_bert, data_dir, tmp_path / "full", **{"method.name": "full"})
    assert main(["export", str(full), "--format", "adapter", "--out", str(tmp_path / "a")]) == 2
    assert "has no adapter; export --format merged or onnx" in capsys.readouterr().err


def test_export_records_the_base_hub_id_decided_at_training(lora_run, tmp_path):
    """export.json's base_model_hub_id is compute.json's (decided where the run trained), not worked out again."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    compute = json.loads((run / "compute.json").read_text())
    compute["base_model"]["hub_id"] = "someorg/tiny-base"
    (run / "compute.json").write_text(json.dumps(compute))
    meta = export(run, "adapter", tmp_path / "adapter")
    assert meta["base_model_hub_id"] == "someorg/tiny-base"
