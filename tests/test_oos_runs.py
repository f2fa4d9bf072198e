"""Out-of-scope data (data.oos_label, data.known_intents) and the calibration fitted after training, end to end."""

from __future__ import annotations

import json
import random

import numpy as np
import pandas as pd
import pytest

import lorafit
from lorafit.cli import main

from conftest import FILLER, synthetic_frame, tiny_overrides


def _with_oos(n: int, seed: int) -> pd.DataFrame:
    """The synthetic intents plus 'oos' rows: filler words only, no intent keyword."""
    rng = random.Random(seed)
    oos = [{"text": " ".join(rng.choice(FILLER) for _ in range(rng.randint(3, 9))), "label": "oos"} for _ in range(n // 4)]
    return pd.concat([synthetic_frame(n, seed), pd.DataFrame(oos)], ignore_index=True)


@pytest.fixture
def oos_data(tmp_path):
    folder = tmp_path / "oos-data"
    folder.mkdir()
    _with_oos(160, 0).to_csv(folder / "train.csv", index=False)
    _with_oos(48, 1).to_csv(folder / "test.csv", index=False)
    return folder


def test_oos_label_is_kept_out_of_training_and_scored(tiny_bert, oos_data, tmp_path):
    out = tmp_path / "run"
    result = lorafit.train(lorafit.load_config(None, tiny_overrides(tiny_bert, oos_data, **{"data.oos_label": "oos"})), out)
    assert json.loads((out / "labels.json").read_text()) == ["food", "sport", "travel"]
    splits = json.loads((out / "splits.json").read_text())
    assert splits["oos"]["label"] == "oos" and splits["oos"]["examples"]["train"] == 0
    assert splits["oos"]["examples"]["test"] == 12 and splits["oos"]["examples"]["validation"] > 0
    ev = result.eval
    assert ev["examples"] == 48  # in-scope test examples only in the classification figures
    table = ev["ood"]["scores"]
    assert set(table) == {"msp", "energy", "mahalanobis", "knn", "base_knn", "hybrid"}
    for row in table.values():
        assert row["oos_examples"] == 12 and row["examples"] == 60 and 0 <= row["auroc"] <= 1
    record = json.loads((out / "ood.json").read_text())
    assert record["source"].startswith("validation: max validation accuracy")  # OOS in validation: accuracy rule
    assert record["threshold"] == record["scores"]["msp"]["threshold"]
    assert record["temperature"] > 0 and "ece_after" in ev["calibration"]
    # `lorafit eval` re-scores the in-scope test examples, as training did
    assert main(["eval", str(out), "--output", str(tmp_path / "again.json")]) == 0
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["examples"] == 48 and again["accuracy"] == pytest.approx(ev["accuracy"])
    # the report shows the table and the reliability diagram
    assert main(["report", str(out), "--out", str(tmp_path / "report")]) == 0
    text = (tmp_path / "report" / "report.md").read_text()
    assert "Out-of-scope detection (test; thresholds chosen on validation)" in text
    assert f"| mahalanobis | {100 * table['mahalanobis']['auroc']:.2f} |" in text and "msp (decides)" in text
    assert (tmp_path / "report" / "report_files" / "reliability.png").is_file()


def test_base_knn_reads_the_pretrained_encoder_and_hybrid_is_standardised_on_validation(tiny_bert, oos_data, tmp_path):
    """base_knn: the cosine similarity to the nearest training vector of the *pre-trained* encoder (recomputed
    here with transformers: masked mean of the last hidden states), whatever the fine-tuning did; hybrid's
    parts are standardised by their in-scope validation scores, recorded in ood.json."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    out = tmp_path / "run"
    lorafit.train(lorafit.load_config(None, tiny_overrides(tiny_bert, oos_data, **{"data.oos_label": "oos", "train.lr": 5e-2})), out)
    frame = pd.read_csv(oos_data / "train.csv")
    rows = json.loads((out / "splits.json").read_text())
    train = frame.iloc[rows["train"]]
    validation = frame.iloc[rows["validation"]]
    validation = validation[validation["label"] != "oos"]
    tokenizer, encoder = AutoTokenizer.from_pretrained(str(tiny_bert)), AutoModel.from_pretrained(str(tiny_bert)).eval()

    def vectors(texts):
        batch = tokenizer(list(texts), padding=True, return_tensors="pt")
        with torch.no_grad():
            states = encoder(**batch).last_hidden_state
        mask = batch["attention_mask"][..., None].float()
        v = (states * mask).sum(1) / mask.sum(1)
        return torch.nn.functional.normalize(v, dim=-1).numpy().astype(np.float64)

    nearest = (vectors(validation["text"]) @ vectors(train["text"]).T).max(-1)
    hybrid = json.loads((out / "ood.json").read_text())["scores"]["hybrid"]
    assert hybrid["standardised"]["base_knn"]["mean"] == pytest.approx(nearest.mean(), abs=1e-5)
    assert hybrid["standardised"]["base_knn"]["sd"] == pytest.approx(nearest.std(), abs=1e-5)
    assert set(hybrid["standardised"]) == {"energy", "base_knn"}


def test_refit_repeats_the_post_hoc_stage_and_takes_new_ood_settings(tiny_bert, oos_data, tmp_path, capsys):
    """`lorafit eval RUN --refit` on an untouched run gives back training's ood.json and OOS table (the weights
    loaded from the folder are the ones trained); with --ood k=3 the knn threshold moves, config.yaml records
    k: 3, and the classification figures stay as trained."""
    import yaml

    out = tmp_path / "run"
    result = lorafit.train(lorafit.load_config(None, tiny_overrides(tiny_bert, oos_data, **{"data.oos_label": "oos"})), out)
    trained_ood = json.loads((out / "ood.json").read_text())
    assert main(["eval", str(out), "--refit"]) == 0
    assert "hybrid" in capsys.readouterr().out
    again = json.loads((out / "eval.json").read_text())
    refitted = json.loads((out / "ood.json").read_text())
    assert refitted["temperature"] == pytest.approx(trained_ood["temperature"], rel=1e-5)
    for kind, row in result.eval["ood"]["scores"].items():
        assert again["ood"]["scores"][kind]["auroc"] == pytest.approx(row["auroc"], abs=1e-6), kind
        assert refitted["scores"][kind]["threshold"] == pytest.approx(trained_ood["scores"][kind]["threshold"], rel=1e-5, abs=1e-6)
    assert main(["eval", str(out), "--refit", "--ood", "k=3"]) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["ood"]["k"] == 3
    moved = json.loads((out / "ood.json").read_text())["scores"]["knn"]["threshold"]
    assert moved != trained_ood["scores"]["knn"]["threshold"]
    final = json.loads((out / "eval.json").read_text())
    assert {k: final[k] for k in ("accuracy", "confusion", "per_class")} == {k: result.eval[k] for k in ("accuracy", "confusion", "per_class")}


def test_predictions_and_predict_use_the_fitted_temperature(tiny_bert, oos_data, tmp_path):
    out = tmp_path / "run"
    lorafit.train(lorafit.load_config(None, tiny_overrides(tiny_bert, oos_data, **{"data.oos_label": "oos"})), out)
    temperature = json.loads((out / "ood.json").read_text())["temperature"]
    assert temperature != 1.0
    classifier = lorafit.load(out)
    assert classifier.temperature == temperature
    test = pd.read_csv(oos_data / "test.csv")
    texts = [t for t, label in zip(test["text"], test["label"]) if label != "oos"]
    shown = [top[0][1] for top in classifier.predict(texts, top_k=1)]
    logged = json.loads((out / "predictions.json").read_text())["probability"]
    np.testing.assert_allclose(shown, logged, atol=1e-5)


def test_open_intent_protocol_draws_known_classes_and_makes_the_rest_oos(tiny_bert, tiny_data, tmp_path):
    out = tmp_path / "run"
    result = lorafit.train(lorafit.load_config(None, tiny_overrides(tiny_bert, tiny_data, **{"data.known_intents": 0.67})), out)
    splits = json.loads((out / "splits.json").read_text())
    known, unknown = splits["open_intent"]["known"], splits["open_intent"]["unknown"]
    assert len(known) == 2 and len(unknown) == 1
    assert json.loads((out / "labels.json").read_text()) == known
    test = pd.read_csv(tiny_data / "test.csv")
    assert splits["oos"]["examples"]["test"] == int((test["label"] == unknown[0]).sum())
    assert splits["oos"]["examples"]["train"] == splits["oos"]["examples"]["validation"] == 0
    record = json.loads((out / "ood.json").read_text())
    assert record["source"] == "validation: 95% in-scope validation recall"  # no OOS in validation
    assert result.eval["ood"]["scores"]["msp"]["oos_examples"] == splits["oos"]["examples"]["test"]


@pytest.mark.parametrize("setting,message", [
    ({"data.oos_label": "nope"}, "data.oos_label 'nope' names no label of the data"),
    ({"data.known_intents": 0.3}, "data.known_intents=0.3 keeps 1 of 3 classes"),
    ({"data.known_intents": 1.5}, "data.known_intents"),
    ({"ood.score": "knn", "ood.k": 100000}, "ood.k=100000: the knn score needs at least k training examples"),
    ({"ood.score": "cosine"}, "ood.score"),
])
def test_bad_oos_settings_fail_in_one_line_before_any_work(tiny_bert, tiny_data, tmp_path, capsys, setting, message):
    out = tmp_path / "run"
    assert main(["train", *tiny_overrides(tiny_bert, tiny_data, **setting), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_predict_cli_uses_the_runs_threshold_unless_given_one(tiny_bert, oos_data, tmp_path, capsys):
    out = tmp_path / "run"
    lorafit.train(lorafit.load_config(None, tiny_overrides(tiny_bert, oos_data, **{"data.oos_label": "oos"})), out)
    capsys.readouterr()
    threshold = json.loads((out / "ood.json").read_text())["threshold"]
    texts = list(pd.read_csv(oos_data / "test.csv")["text"][:20])

    def flags(*extra):
        assert main(["predict", str(out), *texts, "--json", "--top-k", "1", *extra]) == 0
        lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        return [r["out_of_scope"] for r in lines], [r["predictions"][0]["probability"] for r in lines]

    default, top = flags()
    assert default == [p < threshold for p in top] and any(default) != all(default)  # some in, some out
    assert all(flags("--threshold", "1.0")[0]) and not any(flags("--threshold", "0")[0])
    assert main(["predict", str(out), "x", "--threshold", "1.5"]) == 2


def test_exports_carry_the_calibration(tiny_bert, oos_data, tmp_path):
    from lorafit.export import export

    out = tmp_path / "run"
    lorafit.train(lorafit.load_config(None, tiny_overrides(tiny_bert, oos_data, **{"data.oos_label": "oos"})), out)
    record = json.loads((out / "ood.json").read_text())
    texts = ["pizza please", "my golf trip", "the card"]
    want = lorafit.load(out).predict(texts, top_k=2)
    for fmt in ("merged", "adapter"):
        folder = tmp_path / fmt
        export(out, fmt, folder)
        loaded = lorafit.load(folder)
        assert loaded.temperature == record["temperature"] and loaded.threshold == record["threshold"]
        got = loaded.predict(texts, top_k=2)
        assert [[label for label, _ in row] for row in got] == [[label for label, _ in row] for row in want]
        np.testing.assert_allclose([[p for _, p in row] for row in got], [[p for _, p in row] for row in want], atol=1e-5)


@pytest.mark.parametrize("score", ["knn", "hybrid"])
def test_predict_serve_and_exports_decide_by_the_runs_own_score(tiny_bert, oos_data, tmp_path, capsys, score):
    """A run whose ood.score is not msp: `lorafit.load`, `lorafit predict`, `lorafit serve` (adapter on a shared
    base) and the merged export compute that score for new texts from the run's files (ood.json +
    ood.safetensors) and decide by its validation threshold: the scores they give the test texts reproduce
    eval.json's OOS row (AUROC, OOS recall) computed at training. An ONNX export computes logits only: a score
    reading the fine-tuned sentence vectors (knn) leaves it without a threshold, saying why; hybrid (energy and
    the pre-trained encoder's vectors) works there too."""
    from fastapi.testclient import TestClient
    from sklearn.metrics import roc_auc_score

    from lorafit.export import export
    from lorafit.serve import create_app

    out = tmp_path / "run"
    result = lorafit.train(lorafit.load_config(None, tiny_overrides(tiny_bert, oos_data, **{"data.oos_label": "oos", "ood.score": score})), out)
    record, row = json.loads((out / "ood.json").read_text()), result.eval["ood"]["scores"][score]
    assert (out / "ood.safetensors").is_file() and record["score"] == score
    test = pd.read_csv(oos_data / "test.csv")
    texts, is_oos = list(test["text"]), np.array(test["label"] == "oos")

    classifier = lorafit.load(out)
    assert record["threshold"] == row["threshold"]
    assert (classifier.oos.score, classifier.threshold) == (score, record["threshold"])
    _, scores, outside = classifier.classify(texts)
    assert roc_auc_score(is_oos, -scores) == pytest.approx(row["auroc"], abs=1e-6)
    assert outside[is_oos].mean() == pytest.approx(row["oos_recall"]) and list(outside) == list(scores < row["threshold"])
    assert 0 < outside.sum() < len(texts)

    assert main(["predict", str(out), *texts, "--json", "--top-k", "1"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["out_of_scope"] for r in lines] == list(outside)
    np.testing.assert_allclose([r["in_scope_score"] for r in lines], scores, atol=1e-5)

    with TestClient(create_app([("run", str(out), None)])) as client:
        listed = client.get("/v1/adapters").json()["adapters"][0]
        assert listed["shared_base"] and (listed["ood_score"], listed["threshold"]) == (score, record["threshold"])
        served = client.post("/v1/predict", json={"texts": texts, "top_k": 1}).json()["predictions"]
        # knn's fine-tuned vectors come from the logits' own pass; hybrid's pre-trained ones take a second
        encoder = next(iter(client.app.state.registry.bases.values())).model.base_model.model
        calls, features = [], encoder.features
        encoder.features = lambda *args: calls.append(1) or features(*args)
        client.post("/v1/predict", json={"texts": texts[:4], "top_k": 1})
        assert len(calls) == (2 if score == "hybrid" else 1)
    assert [p["out_of_scope"] for p in served] == list(outside)
    np.testing.assert_allclose([p["in_scope_score"] for p in served], scores, atol=1e-4)  # unmerged adapter: float rounding

    export(out, "merged", tmp_path / "merged")
    merged = lorafit.load(tmp_path / "merged")
    assert (merged.oos.score, merged.threshold) == (score, record["threshold"])
    np.testing.assert_allclose(merged.classify(texts)[1], scores, atol=1e-4)
    assert merged.classify(texts[0])[2].tolist() == outside[:1].tolist()  # one text, as predict takes it
    if score == "hybrid":  # over HTTP, an export may not make the server load a pre-trained encoder from anywhere
        import shutil

        import yaml

        elsewhere = shutil.copytree(tiny_bert, tmp_path.parent / f"{tmp_path.name}-elsewhere")  # outside the adapter root
        config = yaml.safe_load((tmp_path / "merged" / "config.yaml").read_text())
        config["model"]["name"] = str(elsewhere)
        (tmp_path / "merged" / "config.yaml").write_text(yaml.safe_dump(config))
        key = "k3y"
        with TestClient(create_app([("run", str(out), None)], api_key=key, adapter_root=tmp_path)) as client:
            r = client.post("/v1/admin/adapters", json={"name": "m", "path": "merged"}, headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 422 and f"base model {str(elsewhere)!r} is not allowed" in r.json()["error"], r.text

    export(out, "onnx", tmp_path / "onnx")
    onnx = lorafit.load(tmp_path / "onnx")
    if score == "knn":
        assert onnx.threshold is None and "ONNX export gives logits only" in onnx.threshold_source
    else:
        assert (onnx.oos.score, onnx.threshold) == (score, record["threshold"])
        np.testing.assert_allclose(onnx.classify(texts)[1], scores, atol=1e-3)


def test_a_run_without_its_fitted_arrays_says_to_refit(tiny_bert, oos_data, tmp_path):
    """A knn run whose ood.safetensors is missing (trained by a lorafit that did not save it) predicts with no
    threshold and says what to do; `lorafit eval RUN --refit` writes the arrays and the run decides again."""
    out = tmp_path / "run"
    lorafit.train(lorafit.load_config(None, tiny_overrides(tiny_bert, oos_data, **{"data.oos_label": "oos", "ood.score": "knn"})), out)
    (out / "ood.safetensors").unlink()
    old = lorafit.load(out)
    assert old.threshold is None and "lorafit eval RUN --refit" in old.threshold_source
    assert not old.classify(["pizza please"])[2].any()
    assert main(["eval", str(out), "--refit"]) == 0
    record = json.loads((out / "ood.json").read_text())
    assert lorafit.load(out).threshold == record["threshold"]
    # arrays that are not the ones ood.json was fitted with (a crash between the two writes) count as missing
    (out / "ood.json").write_text(json.dumps({**record, "arrays_sha256": "0" * 64}))
    assert lorafit.load(out).threshold is None


def test_an_msp_run_saves_no_arrays_and_a_refit_to_msp_removes_stale_ones(tiny_bert, oos_data, tmp_path):
    out = tmp_path / "run"
    lorafit.train(lorafit.load_config(None, tiny_overrides(tiny_bert, oos_data, **{"data.oos_label": "oos"})), out)
    assert not (out / "ood.safetensors").exists()
    assert main(["eval", str(out), "--refit", "--ood", "score=knn"]) == 0
    assert (out / "ood.safetensors").is_file() and lorafit.load(out).oos.score == "knn"
    assert main(["eval", str(out), "--refit", "--ood", "score=msp"]) == 0
    assert not (out / "ood.safetensors").exists() and lorafit.load(out).oos.score == "msp"
