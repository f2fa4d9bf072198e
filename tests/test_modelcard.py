"""Model cards: every run folder and export has a README.md in the Hugging Face format, made from its
own files (issue 20)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

import lorafit
from lorafit.cli import main
from lorafit.errors import UserError
from lorafit.export import export
from lorafit.modelcard import render, write

from conftest import tiny_overrides, write_dataset


@pytest.fixture(scope="module")
def run(tiny_bert, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("card")
    out = root / "run"
    lorafit.train(lorafit.load_config(None, tiny_overrides(tiny_bert, write_dataset(root / "data"))), out)
    return out


def _metrics(card: ModelCard) -> dict[str, float]:
    (entry,) = card.data.to_dict()["model-index"]
    (result,) = entry["results"]
    assert result["task"]["type"] == "text-classification"
    return {m["name"]: m["value"] for m in result["metrics"]}


def test_train_writes_a_card_whose_front_matter_the_hub_library_reads(run):
    card = ModelCard.load(run / "README.md")  # parses the YAML front matter as the hub does
    data = card.data.to_dict()
    assert data["library_name"] == "peft"
    assert data["pipeline_tag"] == "text-classification"
    assert data["metrics"] == ["accuracy", "f1"]
    assert "lorafit" in data["tags"] and "lora" in data["tags"]
    assert "base_model" not in data  # the tiny base is a local folder of unknown origin: no hub id to link
    ev = json.loads((run / "eval.json").read_text())
    assert _metrics(card) == {"Accuracy": round(ev["accuracy"], 4), "Macro F1": round(ev["macro_f1"], 4),
                              "Weighted F1": round(ev["weighted_f1"], 4)}
    # The card is the function of the files: regenerating gives the same text.
    assert render(run) == (run / "README.md").read_text()


def test_card_body_holds_config_splits_weak_spots_efficiency_use_and_loading(run):
    text = (run / "README.md").read_text()
    for heading in ("## Training", "## Data", "## Results", "## Weak spots", "## Efficiency",
                    "## Intended use and limitations", "## How to load"):
        assert heading in text, heading
    ev = json.loads((run / "eval.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    splits = json.loads((run / "splits.json").read_text())
    assert f"| test | {ev['examples']} | {100 * ev['accuracy']:.2f}% | {100 * ev['macro_f1']:.2f}% |" in text
    for split in ("train", "validation", "test"):
        assert f"| {split} | {len(splits[split])} |" in text  # splits.json lists the rows
        assert splits["content_sha256"][split][:16] in text
    weakest = min(ev["per_class"].items(), key=lambda kv: (kv[1]["f1"], kv[0]))
    assert f"| `{weakest[0]}` | {100 * weakest[1]['precision']:.2f}% | {100 * weakest[1]['recall']:.2f}% | " \
           f"{100 * weakest[1]['f1']:.2f}% |" in text
    pair = ev["top_confusions"][0]
    assert f"| `{pair['true']}` | `{pair['predicted']}` | {pair['count']} |" in text
    assert f"{summary['trainable_params']:,} of {summary['total_params']:,}" in text
    assert "rank=4" in text and "alpha=8.0" in text
    assert (run / "config.yaml").read_text().strip() in text  # the whole resolved config
    assert "lorafit.load(folder)" in text and "PeftModel.from_pretrained(base" in text


def test_the_card_says_which_epoch_was_kept_and_how(run, tmp_path):
    import shutil

    summary = json.loads((run / "summary.json").read_text())
    text = render(run)
    assert f"best epoch {summary['best_epoch']} (by validation accuracy)" in text
    assert "The model of the best epoch (chosen on validation)" in text and "Best validation: accuracy" in text
    last = tmp_path / "last"
    shutil.copytree(run, last)
    config = (last / "config.yaml").read_text()
    (last / "config.yaml").write_text(config.replace("  keep: best\n", "  keep: last\n"))
    text = render(last)
    assert f"kept the last, epoch {summary['best_epoch']} (train.keep=last)" in text and "by validation" not in text
    assert "The model of the last epoch (train.keep=last: validation chose nothing)" in text
    assert "Validation of the last epoch: accuracy" in text and "Best validation" not in text


def test_card_loading_snippets_run(run):
    """The card's Python blocks load this very folder (with `folder` pointed at it)."""
    blocks = re.findall(r"```python\n(.*?)```", (run / "README.md").read_text(), re.S)
    assert len(blocks) == 2
    for block in blocks:
        code = re.sub(r'^folder = .*$', f"folder = {str(run)!r}", block, flags=re.M)
        scope: dict = {}
        exec(compile(code, "README.md", "exec"), scope)  # noqa: S102
    assert scope["logits"].shape == (1, 3)


def test_export_cards(run, tmp_path):
    merged = tmp_path / "merged"
    meta = export(run, "merged", merged)
    card = ModelCard.load(merged / "README.md")
    assert card.data.library_name == "transformers" and "custom_code" in card.data.tags
    assert "README.md" in meta["files"]
    ev = json.loads((run / "eval.json").read_text())
    assert _metrics(card)["Accuracy"] == round(ev["accuracy"], 4)
    assert "trust_remote_code=True" in card.text and f"{meta['parity']['max_abs_logit_diff']:.2e}" in card.text
    # named after the folder the export ends up in, not the temporary one it was written in
    assert card.text.lstrip().startswith("# merged") and 'path/to/merged"' in card.text and ".tmp" not in card.text

    adapter = tmp_path / "adapter"
    export(run, "adapter", adapter)
    card = ModelCard.load(adapter / "README.md")  # lorafit's card, not peft's stub
    assert card.data.library_name == "peft" and "## Weak spots" in card.text
    assert "PeftModel.from_pretrained(base, folder)" in card.text

    # An int8 export's figure is the one measured on its weights (parity, validation), not the float
    # model's test accuracy. (A tiny random model cannot keep int8 parity, so the card is rendered from
    # the figures such an export would record.)
    int8 = {**meta, "format": "onnx", "quantize": "int8",
            "parity": {**meta["parity"], "export_accuracy": 0.5, "tolerance": {"min_top1_agreement": 0.97}}}
    card = ModelCard(render(merged, export_meta=int8))
    assert card.data.library_name == "onnx" and "int8 weights" in card.text
    (entry,) = card.data.to_dict()["model-index"]
    (result,) = entry["results"]
    assert result["dataset"]["split"] == "validation"
    assert result["metrics"] == [{"type": "accuracy", "value": 0.5, "name": "Accuracy"}]


def test_card_cli_regenerates_and_refuses_what_it_cannot_describe(run, tmp_path, capsys):
    (run / "README.md").write_text("edited by hand\n")
    assert main(["card", str(run)]) == 0
    assert (run / "README.md").read_text() == render(run)
    assert main(["card", str(tmp_path / "missing")]) == 2
    assert "run folder not found" in capsys.readouterr().err
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    for name in ("config.yaml", "labels.json"):
        (unfinished / name).write_text((run / name).read_text())
    with pytest.raises(UserError, match="has no eval.json: the run did not finish"):
        write(unfinished)
    assert not (unfinished / "README.md").exists()


def test_a_relative_local_base_is_never_called_a_hub_id_wherever_the_card_is_rendered(tiny_bert, tmp_path, monkeypatch):
    """Trained from `models/tiny` (a folder relative to the working directory, which looks like a hub
    id): the card must not name it `base_model` when rendered from another directory, where the
    folder does not exist."""
    import shutil

    work = tmp_path / "work"
    shutil.copytree(tiny_bert, work / "models" / "tiny")
    data = write_dataset(work / "data")
    monkeypatch.chdir(work)
    lorafit.train(lorafit.load_config(None, tiny_overrides(Path("models/tiny"), data)), work / "run")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    card = ModelCard(render(work / "run"))
    assert card.data.base_model is None
    assert "`models/tiny` (a local model folder)" in card.text
