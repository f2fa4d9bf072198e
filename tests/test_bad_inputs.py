"""Every bad input gets one line on stderr naming the problem, exit status 2, no traceback, and no run
folder left behind (nothing half-written). Each goes through the CLI entry point in-process.
Random bad inputs (files, overrides) are fuzzed in test_fuzz.py."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest

from lorafit.cli import main
from lorafit.errors import UserError
from lorafit.rundir import safe_name

from conftest import synthetic_frame, tiny_overrides, write_dataset


def train(capsys, out, *items: str) -> tuple[int, str]:
    """Run `lorafit train ITEMS --out OUT`; return (status, the one error line)."""
    capsys.readouterr()
    status = main(["train", *items, "--out", str(out)])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    errors = [line for line in captured.err.splitlines() if line.startswith("lorafit: error:")]
    assert len(errors) == 1, captured.err
    return status, errors[0]


def fails_cleanly(capsys, out, *items: str) -> str:
    """A bad input caught before any work: exit 2, stderr is only the error line, no run folder."""
    capsys.readouterr()
    status = main(["train", *items, "--out", str(out)])
    captured = capsys.readouterr()
    assert status == 2
    assert "Traceback" not in captured.err
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("lorafit: error: "), captured.err
    assert captured.out == ""
    assert not out.exists(), f"run folder {out} was created"
    return lines[0]


def quick(model, data, **extra) -> list[str]:
    return tiny_overrides(model, data, **{"train.epochs": 1, **extra})


# -- data ---------------------------------------------------------------------------------------

def test_missing_data_file(tiny_bert, tmp_path, capsys):
    missing = tmp_path / "nowhere" / "train.csv"
    line = fails_cleanly(capsys, tmp_path / "run", *quick(tiny_bert, missing))
    assert str(missing) in line and "not an existing file or folder" in line


def test_data_folder_without_train_file(tiny_bert, tmp_path, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    synthetic_frame(9).to_csv(folder / "test.csv", index=False)
    line = fails_cleanly(capsys, tmp_path / "run", *quick(tiny_bert, folder))
    assert "no train file" in line and str(folder) in line


def test_missing_text_column_lists_the_columns(tiny_bert, tmp_path, capsys):
    path = tmp_path / "data.csv"
    synthetic_frame(30).rename(columns={"text": "sentence"}).to_csv(path, index=False)
    line = fails_cleanly(capsys, tmp_path / "run", *quick(tiny_bert, path))
    assert "no text column 'text'" in line
    assert "columns are: sentence, label" in line
    assert "data.text_column" in line


def test_missing_label_column(tiny_bert, tiny_data, tmp_path, capsys):
    line = fails_cleanly(capsys, tmp_path / "run", *quick(tiny_bert, tiny_data, **{"data.label_column": "intent"}))
    assert "no label column 'intent'" in line and "columns are: text, label" in line


def test_only_empty_or_whitespace_texts(tiny_bert, tmp_path, capsys):
    path = tmp_path / "data.csv"
    pd.DataFrame({"text": ["", "   ", "\t", " "], "label": ["a", "b", "a", "b"]}).to_csv(path, index=False)
    capsys.readouterr()
    status = main(["train", *quick(tiny_bert, path), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    # The library's warning about the dropped rows, then the one error line.
    warning, error = err.splitlines()
    assert warning == f"{path}: dropped 4 rows with an empty text or label"
    assert error == f"lorafit: error: {path}: no usable rows (4 rows all had an empty text or label)"
    assert not (tmp_path / "run").exists()


def test_test_labels_unseen_in_training_are_listed(tiny_bert, tmp_path, capsys):
    folder = write_dataset(tmp_path / "data")
    test = pd.read_csv(folder / "test.csv")
    test.loc[[0, 5, 6], "label"] = ["music", "chess", "music"]
    test.to_csv(folder / "test.csv", index=False)
    line = fails_cleanly(capsys, tmp_path / "run", *quick(tiny_bert, folder))
    assert line.endswith("test split has labels never seen in training: chess, music")


def test_fewer_than_two_classes(tiny_bert, tmp_path, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    frame = synthetic_frame(30)
    frame["label"] = "travel"
    frame.to_csv(folder / "train.csv", index=False)
    frame.iloc[:6].to_csv(folder / "test.csv", index=False)
    line = fails_cleanly(capsys, tmp_path / "run", *quick(tiny_bert, folder))
    assert "1 class (travel)" in line and "at least 2" in line


# -- model and method ---------------------------------------------------------------------------

def test_unknown_method_lists_the_valid_ones(tiny_bert, tiny_data, tmp_path, capsys):
    line = fails_cleanly(capsys, tmp_path / "run", *quick(tiny_bert, tiny_data, **{"method.name": "qlora9000"}))
    assert "unknown method 'qlora9000'" in line
    assert "full" in line and "lora" in line


def test_target_that_matches_nothing(tiny_bert, tiny_data, tmp_path, capsys):
    line = fails_cleanly(capsys, tmp_path / "run", *quick(tiny_bert, tiny_data, **{"method.targets": "[nonexistent]"}))
    assert "method.targets" in line and "'nonexistent' matches no linear module" in line
    assert "all-linear" in line and "query" in line  # how to fix: valid groups and real module names


def test_unknown_local_model_path(tiny_data, tmp_path, capsys):
    line = fails_cleanly(capsys, tmp_path / "run", *quick("/nonexistent/model", tiny_data))
    assert "cannot load model '/nonexistent/model'" in line and "not a local folder" in line


def test_unknown_hub_model_offline(tiny_data, tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once, at import
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    line = fails_cleanly(capsys, tmp_path / "run", *quick("lorafit-tests/no-such-model-xyz", tiny_data))
    assert "cannot load model 'lorafit-tests/no-such-model-xyz'" in line


def test_model_folder_without_config(tiny_data, tmp_path, capsys):
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    (folder / "weights.txt").write_text("nope")
    line = fails_cleanly(capsys, tmp_path / "run", *quick(folder, tiny_data))
    assert "has no config.json" in line and str(folder) in line


# -- run folder ---------------------------------------------------------------------------------

def test_existing_run_folder_is_left_untouched(tiny_bert, tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    capsys.readouterr()
    status = main(["train", *quick(tiny_bert, tiny_data), "--out", str(out)])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    assert err.splitlines() == [f"lorafit: error: run folder {out} already exists; choose another --out or pass --overwrite"]
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "keep me"


# -- config -------------------------------------------------------------------------------------

def test_unreadable_yaml_config(tiny_bert, tiny_data, tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("train:\n  epochs: 1\n  lr: [1e-3\nmodel: {name: x}\n")
    line = fails_cleanly(capsys, tmp_path / "run", str(config), *quick(tiny_bert, tiny_data))
    assert f"cannot read YAML {config}" in line and "line" in line


def test_yaml_that_is_not_a_mapping(tiny_bert, tiny_data, tmp_path, capsys):
    config = tmp_path / "list.yaml"
    config.write_text("- train\n- model\n")
    line = fails_cleanly(capsys, tmp_path / "run", str(config), *quick(tiny_bert, tiny_data))
    assert "must hold a mapping" in line and "list" in line


def test_missing_config_file(tiny_bert, tiny_data, tmp_path, capsys):
    line = fails_cleanly(capsys, tmp_path / "run", str(tmp_path / "nope.yaml"), *quick(tiny_bert, tiny_data))
    assert "config file not found" in line and "nope.yaml" in line


def test_unknown_config_key_lists_the_valid_keys(tiny_bert, tiny_data, tmp_path, capsys):
    line = fails_cleanly(capsys, tmp_path / "run", *quick(tiny_bert, tiny_data, **{"train.epoch": 1}))
    assert "unknown key 'train.epoch'" in line
    assert "epochs" in line and "batch_size" in line


def test_unknown_key_in_yaml_file(tiny_bert, tiny_data, tmp_path, capsys):
    config = tmp_path / "typo.yaml"
    config.write_text("dataa:\n  name: x\n")
    line = fails_cleanly(capsys, tmp_path / "run", str(config), *quick(tiny_bert, tiny_data))
    assert "unknown key 'dataa'" in line and "data" in line and "train" in line


@pytest.mark.parametrize("override,words", [
    ("train.epochs=0", ["train.epochs", "above 0", "got 0"]),
    ("train.lr=-1", ["train.lr", "greater than 0"]),
    ("data.validation_fraction=1.5", ["data.validation_fraction", "less than 1"]),
    ("train.schedule=sawtooth", ["train.schedule", "linear", "cosine", "constant"]),
    ("train.batch_size=many", ["train.batch_size", "integer", "many"]),
])
def test_bad_value_names_the_key(tiny_bert, tiny_data, tmp_path, capsys, override, words):
    line = fails_cleanly(capsys, tmp_path / "run", *quick(tiny_bert, tiny_data), override)
    assert line.startswith("lorafit: error: config error: ")
    for word in words:
        assert word in line, (word, line)


def test_fp16_on_cpu_is_refused_and_says_what_runs_there(tiny_bert, tiny_data, tmp_path, capsys):
    line = fails_cleanly(capsys, tmp_path / "run", *quick(tiny_bert, tiny_data), "train.device=cpu", "train.precision=fp16")
    assert "train.precision=fp16 needs CUDA, not cpu" in line and "bf16" in line


def test_malformed_override(tiny_bert, tiny_data, tmp_path, capsys):
    line = fails_cleanly(capsys, tmp_path / "run", *quick(tiny_bert, tiny_data), "train.=3")
    assert "bad override 'train.=3'" in line and "dotted.key=value" in line


# -- training -----------------------------------------------------------------------------------

def test_diverging_loss_names_the_step(tiny_bert, tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    # No warmup (else step 1 runs at lr 0) and no clipping: step 1 moves the weights by ~1e30.
    status, line = train(capsys, out, *quick(tiny_bert, tiny_data, **{
        "train.lr": 1e30, "train.max_grad_norm": "null", "train.warmup": 0,
    }))
    assert status == 2
    assert "loss became nan at step 2 (epoch 1)" in line
    assert "no epoch finished, so there is no checkpoint" in line
    assert "lower train.lr" in line
    # The run folder exists (config, splits) and records where it diverged; no checkpoint.
    records = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["type"] == "diverged" and records[-1]["step"] == 2
    assert math.isnan(float(records[-1]["loss"]))
    assert not (out / "adapter").exists() and not (out / "eval.json").exists()


# -- names, pickles and damaged run folders -----------------------------------------------------

@pytest.mark.parametrize("name,reason", [
    ("..", "names a folder"), (".", "names a folder"), ("", "non-empty"), ("  ", "non-empty"),
    ("../escape", "contains a '/'"), ("/etc/passwd", "contains a '/'"), ("a/b", "contains a '/'"),
    ("..\\windows", "contains a '\\'"), ("C:evil", "contains a ':'"), ("nul\x00byte", "NUL byte"),
    ("line\nbreak", "control characters"), ("x" * 256, "longer than 255 bytes"),
])
def test_safe_name_refuses_anything_that_leaves_its_folder(name, reason):
    with pytest.raises(UserError) as caught:
        safe_name(name, "adapter name")
    message = str(caught.value)
    assert message.startswith("adapter name") and reason in message
    assert "\n" not in message


@pytest.mark.parametrize("name", ["b77-lora", "emotion_v2", "run.1", ".hidden", "über", "x" * 255])
def test_safe_name_keeps_plain_names(name):
    assert safe_name(name, "adapter name") == name


def _pickle_only_copy(model: Path, dest: Path) -> Path:
    """The tiny model with its weights as pytorch_model.bin (a pickle) instead of safetensors."""
    import torch
    from safetensors.torch import load_file

    shutil.copytree(model, dest)
    state = load_file(str(dest / "model.safetensors"))
    (dest / "model.safetensors").unlink()
    torch.save(state, dest / "pytorch_model.bin")
    return dest


def test_pickle_weights_are_refused_unless_trusted(tiny_bert, tiny_data, tmp_path, capsys):
    model = _pickle_only_copy(tiny_bert, tmp_path / "pickled")
    line = fails_cleanly(capsys, tmp_path / "run", *quick(model, tiny_data))
    assert str(model) in line and "pickle weights" in line and "arbitrary code" in line
    assert "model.trust_pickle=true" in line
    # With the flag the same folder trains.
    assert main(["train", *quick(model, tiny_data, **{"model.trust_pickle": "true"}), "--out", str(tmp_path / "ok")]) == 0


def test_pickle_in_a_run_folder_is_refused(tiny_bert, tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *quick(tiny_bert, tiny_data), "--out", str(out)]) == 0
    (out / "adapter" / "adapter_model.bin").write_bytes(b"not really a pickle")
    capsys.readouterr()
    assert main(["predict", str(out), "pizza please"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "adapter_model.bin" in err and "arbitrary code" in err and "model.trust_pickle" in err


def test_damaged_run_folder_files_are_user_errors(tiny_bert, tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *quick(tiny_bert, tiny_data), "--out", str(out)]) == 0
    (out / "labels.json").write_text('["food", "sp')
    capsys.readouterr()
    assert main(["predict", str(out), "pizza"]) == 2
    assert capsys.readouterr().err.startswith(f"lorafit: error: {out / 'labels.json'} is corrupt")
    (out / "config.yaml").write_text("train: [unclosed\n")
    assert main(["predict", str(out), "pizza"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lorafit: error: {out / 'config.yaml'} is corrupt") and err.count("\n") == 1


def test_predict_file_in_another_encoding(tiny_bert, tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *quick(tiny_bert, tiny_data), "--out", str(out)]) == 0
    texts = tmp_path / "texts.txt"
    texts.write_bytes("café\n".encode("latin-1"))
    capsys.readouterr()
    assert main(["predict", str(out), "--file", str(texts)]) == 2
    assert capsys.readouterr().err == f"lorafit: error: --file {texts} is not valid UTF-8 (byte 3); re-save it as UTF-8\n"


def test_predict_text_that_is_not_utf8(tiny_bert, tiny_data, tmp_path, capsys):
    """Bytes that are not UTF-8 reach argv as lone surrogates, which the tokenizer cannot take."""
    out = tmp_path / "run"
    assert main(["train", *quick(tiny_bert, tiny_data), "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["predict", str(out), "pizza", "caf\udce9"]) == 2
    assert capsys.readouterr().err == "lorafit: error: text 2 is not valid UTF-8: 'caf\\udce9'; pass texts in UTF-8\n"


def test_a_check_that_combines_settings_words_its_own_line():
    """Config._combinations' errors name their keys themselves: no empty key, no echo of the whole config."""
    from lorafit.config import load_config

    with pytest.raises(UserError) as caught:
        load_config(None, ["train.keep=last", "train.patience=3"])
    assert str(caught.value) == ("config error: train.patience stops on validation, which train.keep=last keeps out of "
                                 "choosing the weights; set train.patience=null or train.keep=best")
