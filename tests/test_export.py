"""`lorafit export`: every format reloads from its own files and matches the trained model."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

import lorafit
from lorafit import evaluate, quantization
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
    ("onnx", "int8-static", {"model.onnx", "tokenizer.json", "tokenizer_config.json"}),
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
        # MatMul/Gemm weights in 7 bits (reduce_range): full-range int8 weights saturate ORT's 16-bit
        # pair sums on CPUs without VNNI (AVX2 only), where this parity check then fails
        import onnx
        from onnx import numpy_helper
        weights = [numpy_helper.to_array(t) for t in onnx.load(str(out / "model.onnx")).graph.initializer
                   if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2]
        assert weights and max(int(np.abs(w.astype(np.int16)).max()) for w in weights) <= 64
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


def test_loading_a_merged_export_warns_of_nothing(lora_run, tmp_path):
    """The tokenizer of a merged folder loads without transformers reading config.json (whose model type,
    lorafit-classifier, it would warn is not the one it instantiates)."""
    import logging

    import transformers

    export(lora_run, "merged", tmp_path / "merged")
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    library = logging.getLogger("transformers")
    level = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_warning()  # as a Python user has it (the CLI quietens it)
    library.addHandler(handler)
    try:
        lorafit.load(tmp_path / "merged").logits(["a text"])
    finally:
        library.removeHandler(handler)
        transformers.utils.logging.set_verbosity(level)
    assert not [m for m in seen if "You are using a model of type" in m], seen


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
    (["--format", "merged", "--quantize", "int8-static"], "applies to --format onnx only"),
    (["--format", "onnx", "--quantize", "int8", "--min-agreement", "1.5"], "--min-agreement must be a fraction in [0, 1], got 1.5"),
    (["--format", "onnx", "--quantize", "int8", "--min-agreement", "nan"], "--min-agreement must be a fraction in [0, 1], got nan"),
    (["--format", "onnx", "--quantize", "int8-static", "--max-accuracy-drop", "-0.1"],
     "--max-accuracy-drop must be a fraction in [0, 1], got -0.1"),
    # float exports compute the same function: a loosened int8 tolerance is refused, not silently ignored
    (["--format", "onnx", "--min-agreement", "0.9"], "--min-agreement and --max-accuracy-drop apply to int8 exports"),
    (["--format", "merged", "--max-accuracy-drop", "0.1"], "--min-agreement and --max-accuracy-drop apply to int8 exports"),
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


def _graph_ops(folder) -> set[str]:
    import onnx

    return {node.op_type for node in onnx.load(str(folder / "model.onnx")).graph.node}


def test_static_int8_is_calibrated_on_training_texts_and_ignores_batch_mates(lora_run, data_dir, tmp_path):
    """int8-static: activation scales fixed at export (QDQ), so a text scores the same alone or in any batch;
    dynamic int8 scales each batch's activations by that batch's range, so its scores move with the batch."""
    from lorafit.inference import run_split
    from lorafit.rundir import RunDir

    static = export(lora_run, "onnx", tmp_path / "static", quantize="int8-static")
    dynamic = export(lora_run, "onnx", tmp_path / "dynamic", quantize="int8")
    train = run_split(RunDir(lora_run), RunDir(lora_run).config(), "train")
    assert static["quantize"] == "int8-static" and static["parity"]["passed"]
    record = static["quantization"]
    assert record["kind"] == "static" and record["format"] == "QDQ" and "fixed scale" in record["activations"]
    assert record["calibration"] == {"split": "train", "texts": len(train), "of": len(train), "method": "MinMax", "seed": 0}
    assert len(train) == 135 < quantization.CALIBRATION_TEXTS, "a run with fewer training texts calibrates on all of them"
    assert dynamic["quantization"]["kind"] == "dynamic" and "calibration" not in dynamic["quantization"]
    # What the graphs hold: fixed-scale QDQ pairs, against run-time scale computation.
    assert {"QuantizeLinear", "DequantizeLinear"} <= _graph_ops(tmp_path / "static")
    assert "DynamicQuantizeLinear" not in _graph_ops(tmp_path / "static")
    assert "DynamicQuantizeLinear" in _graph_ops(tmp_path / "dynamic") and "QuantizeLinear" not in _graph_ops(tmp_path / "dynamic")

    texts = _test_texts(data_dir)  # 40 texts of 3 to 10 words: one batch, padded to the longest
    assert len({len(t.split()) for t in texts}) > 3
    for folder, kind in ((tmp_path / "static", "static"), (tmp_path / "dynamic", "dynamic")):
        classifier = lorafit.load(folder)
        in_batch = classifier.predict(texts, top_k=3)
        alone = [classifier.predict(text, top_k=3)[0] for text in texts]
        worst = max(abs(p - q) for a, b in zip(in_batch, alone) for (_, p), (_, q) in zip(sorted(a), sorted(b)))
        logits_worst = max(float(np.abs(classifier.logits([t])[0] - row).max())
                           for t, row in zip(texts, classifier.logits(texts)))
        if kind == "static":
            assert worst <= 1e-6 and logits_worst <= 1e-6, f"static int8 scores depend on batch-mates: {worst}"
        else:  # documented, not wanted: the reason int8-static exists (measured here: about 1e-2 in logits)
            assert logits_worst > 1e-4, "dynamic int8 was expected to depend on batch-mates on this model"


@pytest.fixture(scope="module")
def light_run(tiny_bert, tmp_path_factory):
    """A lightly trained run (500 rows, 1 epoch, a small learning rate from a nearest-centroid head): its
    classes are close, so int8's small logit changes flip several of its 51 validation predictions."""
    data = write_dataset(tmp_path_factory.mktemp("light-data"), n_train=500, n_test=40)
    out = tmp_path_factory.mktemp("light-runs") / "light"
    overrides = tiny_overrides(tiny_bert, data, **{"train.epochs": 1, "train.lr": 1e-4, "model.head_init": "centroids"})
    lorafit.train(lorafit.load_config(None, overrides), out)
    return out


def test_tolerance_flags_accept_a_larger_int8_drop_knowingly(light_run, tmp_path, capsys):
    from lorafit.inference import label_indices, run_split
    from lorafit.rundir import RunDir

    refused = tmp_path / "refused"
    assert main(["export", str(light_run), "--format", "onnx", "--quantize", "int8", "--out", str(refused)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lorafit: error")]  # after the log lines
    assert len(errors) == 1 and "breaks parity" in errors[0] and "--min-agreement" in errors[0] and "--max-accuracy-drop" in errors[0]
    assert not refused.exists() and not list(tmp_path.iterdir())

    out = tmp_path / "accepted"
    args = ["export", str(light_run), "--format", "onnx", "--quantize", "int8", "--out", str(out),
            "--min-agreement", "0.8", "--max-accuracy-drop", "0.05"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    parity = json.loads((out / "export.json").read_text())["parity"]
    assert parity["passed"] and parity["top1_agreement"] < export_module.TOLERANCES["int8"]["min_top1_agreement"]
    assert parity["tolerance"] == {"min_top1_agreement": 0.8, "max_accuracy_drop": 0.05}
    assert parity["tolerance_source"] == {"min_top1_agreement": "user", "max_accuracy_drop": "user"}
    assert parity["default_tolerance"] == export_module.TOLERANCES["int8"]
    assert "set by the user" in printed and "--min-agreement 0.8" in printed and "--max-accuracy-drop 0.05" in printed
    assert "set by the user" in (out / "README.md").read_text()  # the model card says so too

    # The recorded figures are a recount's: the export against the training-time model on the validation split.
    run = RunDir(light_run)
    validation = run_split(run, run.config(), "validation")
    reference = lorafit.load(light_run, merge=False).logits(validation.texts).argmax(-1)
    exported = lorafit.load(out).logits(validation.texts).argmax(-1)
    targets = label_indices(validation.labels, run.labels())
    assert parity["examples"] == len(validation) == 51
    assert parity["top1_agreement"] == float((reference == exported).mean())
    assert parity["reference_accuracy"] == float((reference == targets).mean())
    assert parity["export_accuracy"] == float((exported == targets).mean())

    # The Python API takes the same parameters; one left out keeps its default, and says so.
    meta = export(light_run, "onnx", tmp_path / "api", quantize="int8", min_agreement=0.5, max_accuracy_drop=1.0)
    assert meta["parity"]["tolerance"] == {"min_top1_agreement": 0.5, "max_accuracy_drop": 1.0}
    with pytest.raises(UserError, match="breaks parity.*--min-agreement"):
        export(light_run, "onnx", tmp_path / "api2", quantize="int8", max_accuracy_drop=1.0)
    assert not (tmp_path / "api2").exists()
    with pytest.raises(UserError, match="apply to int8 exports"):
        export(light_run, "merged", tmp_path / "merged", min_agreement=0.5)


def test_static_calibration_sample_is_seeded_training_texts(light_run, tmp_path, monkeypatch):
    """The calibration batches are 256 of the run's training texts, drawn with the run's seed, in their order."""
    from lorafit.inference import run_split
    from lorafit.rundir import RunDir

    texts = [f"text {i}" for i in range(1000)]
    sample = quantization.calibration_sample(texts, seed=0)
    assert len(sample) == 256 == len(set(sample)) and sample == quantization.calibration_sample(texts, seed=0)
    assert sample == sorted(sample, key=texts.index) and sample != quantization.calibration_sample(texts, seed=1)
    assert quantization.calibration_sample(texts[:10], seed=0) == texts[:10]

    seen = []
    real = quantization.static

    def spy(graph, out, token_ids, pad_id, batch_size, max_tokens):
        seen.append((token_ids, batch_size))
        return real(graph, out, token_ids, pad_id, batch_size, max_tokens)

    monkeypatch.setattr(quantization, "static", spy)
    meta = export(light_run, "onnx", tmp_path / "static", quantize="int8-static", min_agreement=0.5, max_accuracy_drop=1.0)
    run = RunDir(light_run)
    train = run_split(run, run.config(), "train")
    assert len(train) == 449
    assert meta["quantization"]["calibration"] == {"split": "train", "texts": 256, "of": 449, "method": "MinMax", "seed": 0}
    expected = lorafit.load(light_run).tokenize(quantization.calibration_sample(train.texts, seed=0))
    assert seen == [(expected, 64)]  # padded per batch of at most 64, as lorafit.load batches an ONNX export


def test_bf16_prediction_runs_the_stock_layers_under_bf16_autocast(lora_run, data_dir, monkeypatch, caplog):
    """`precision=bf16` on CPU: the products run in bf16 (so the logits move a little from float32's),
    through PyTorch's layers (oneDNN's float32 linear would keep them in float32) with their frozen weights
    cast once (frozen_casts.py: autocast's numbers to the bit), and stay close; on a CPU without native bf16
    a warning says it is emulated, and none where the CPU has it."""
    from lorafit import hardware, kernels

    for native in (True, False):
        monkeypatch.setattr(hardware, "native_bf16", lambda info=None: native)
        caplog.clear()
        with caplog.at_level("WARNING", logger="lorafit"):
            lorafit.load(lora_run, device="cpu", precision="bf16")
        assert ("bf16 prediction is emulated here and slower than fp32" in caplog.text) is not native

    monkeypatch.setattr(kernels, "decide", lambda threads: {"onednn_linear": True})  # a host where oneDNN wins in fp32
    texts = _test_texts(data_dir)
    exact = lorafit.load(lora_run, device="cpu")
    assert exact.backend.amp is None and exact.backend.fast_paths.counts.get("onednn_linear")
    fast = lorafit.load(lora_run, device="cpu", precision="bf16")
    assert fast.backend.amp == torch.bfloat16 and list(fast.backend.fast_paths.counts) == ["cast_once_linear"]
    a, b = exact.logits(texts), fast.logits(texts)
    assert b.dtype == np.float32 and not np.array_equal(a, b)  # bf16 arithmetic did run
    fast.backend.fast_paths.undo()  # stock layers: autocast casts the weights at every call, to the same numbers
    linears = sum(type(m) is torch.nn.Linear for m in fast.backend.model.modules())
    assert fast.backend.fast_paths.counts["cast_once_linear"] == linears > 0  # every linear layer had been switched
    assert np.array_equal(fast.logits(texts), b)
    assert np.abs(a - b).max() < 0.05 * max(1.0, np.abs(a).max())
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.9


@pytest.fixture(scope="module")
def bf16_run(tiny_bert, data_dir, tmp_path_factory):
    return _train(tiny_bert, data_dir, tmp_path_factory.mktemp("export-runs") / "half",
                  **{"train.precision": "bf16", "train.device": "cpu"})


@pytest.mark.parametrize("fmt", ["merged", "onnx"])
def test_a_run_trained_in_bf16_exports_with_float32_parity(bf16_run, tmp_path, fmt):
    """train.precision=bf16 on CPU: the export's parity check compares the merged model with the training-time
    one in float32 (what it checks is the merge and the graph, not bf16 rounding, which differs between a merged
    and an unmerged model by more than the float32 tolerance); loaded by default, the export runs in bf16 as the
    run does, an ONNX graph in its own precision."""
    meta = export(bf16_run, fmt, tmp_path / fmt)
    assert meta["parity"]["passed"] and meta["parity"]["top1_agreement"] == 1.0
    assert lorafit.load(tmp_path / fmt).precision == ("bf16" if fmt == "merged" else "onnx graph")


def test_precision_requests_that_cannot_hold(lora_run, tmp_path, capsys):
    onnx = tmp_path / "onnx"
    export(lora_run, "onnx", onnx)
    with pytest.raises(UserError, match="ONNX Runtime runs the graph in its own precision"):
        lorafit.load(onnx, precision="bf16")
    with pytest.raises(UserError, match="fp16 runs on CUDA only"):
        lorafit.load(lora_run, device="cpu", precision="fp16")
    with pytest.raises(UserError, match="unknown precision 'int4'"):
        lorafit.load(lora_run, device="cpu", precision="int4")
    assert main(["predict", str(lora_run), "pizza please", "--json", "--device", "cpu", "--precision", "bf16"]) == 0
    assert json.loads(capsys.readouterr().out.strip())["predictions"][0]["label"] in {"food", "sport", "travel"}
    assert main(["eval", str(lora_run), "--refit", "--precision", "bf16"]) == 2
    assert "--refit fits in the run's own precision" in capsys.readouterr().err
