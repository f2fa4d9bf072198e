"""The final model of a finished run (`lorafit train --final RUN`): the same recipe on train + validation for the
run's best epoch count, with the temperature and threshold its held-out validation chose."""

from __future__ import annotations

import json

import pytest
import yaml

import lorafit
from lorafit import data
from lorafit.config import DataConfig, load_config
from lorafit.errors import UserError
from lorafit.rundir import RunDir
from lorafit.train import train, train_final

from conftest import tiny_overrides, train_fails_cleanly, write_dataset


def test_train_on_validation_appends_the_validation_rows(tiny_data):
    held, _ = data.load(DataConfig(name=str(tiny_data)), seed=3)
    joined, _ = data.load(DataConfig(name=str(tiny_data), train_on_validation=True), seed=3)
    train, validation = held.splits["train"], held.splits["validation"]
    assert joined.splits["train"].rows == train.rows + validation.rows
    assert joined.splits["train"].texts == train.texts + validation.texts
    assert joined.splits["train"].labels == train.labels + validation.labels
    assert joined.splits["validation"].rows == validation.rows and joined.splits["test"].rows == held.splits["test"].rows
    assert f"the {len(validation)} validation rows appended" in joined.provenance["train"]


@pytest.mark.parametrize(("extra", "says"), [
    ({}, "set train.keep=last"),
    ({"train.keep": "last", "ood.threshold": 0.5}, "set ood.temperature"),
    ({"train.keep": "last", "ood.temperature": 1.2}, "set ood.threshold"),
    ({"train.keep": "last", "ood.temperature": 1.2, "ood.threshold": 0.5, "data.oos_label": "oos"}, "data.oos_label"),
])
def test_train_on_validation_refuses_choices_on_trained_rows(extra, says):
    overrides = ["data.train_on_validation=true", *(f"{k}={v}" for k, v in extra.items())]
    with pytest.raises(UserError, match=says):
        load_config(None, overrides)


def test_train_on_validation_without_calibration_needs_no_temperature():
    cfg = load_config(None, ["data.train_on_validation=true", "train.keep=last", "ood.calibrate=false", "ood.threshold=0.5"])
    assert cfg.data.train_on_validation and cfg.ood.temperature is None


@pytest.fixture(scope="module")
def source_run(tiny_bert, tmp_path_factory):
    """A finished LoRA run whose best epoch is not its last one is likely; 3 epochs on the tiny model."""
    root = tmp_path_factory.mktemp("final")
    folder = write_dataset(root / "data", n_train=160)
    out = root / "source"
    train(load_config(None, tiny_overrides(tiny_bert, folder, **{"train.epochs": 3})), out)
    return out


def test_final_trains_the_source_recipe_on_train_and_validation(source_run, tmp_path, capsys):
    from lorafit.cli import main

    out = tmp_path / "final"
    assert main(["train", "--final", str(source_run), "--out", str(out), "--quiet"]) == 0
    source, final = RunDir(source_run), RunDir(out)
    src_cfg, cfg = source.config(), final.config()
    src_ood, ood = source.read_json("ood.json"), final.read_json("ood.json")
    best = source.summary().best_epoch
    # The recipe is the source's; what validation chose is carried over; nothing is chosen again.
    assert cfg.train.epochs == best and cfg.train.keep == "last" and cfg.train.patience is None
    assert cfg.data.train_on_validation and not src_cfg.data.train_on_validation
    assert (cfg.train.lr, cfg.method.rank, cfg.seed) == (src_cfg.train.lr, src_cfg.method.rank, src_cfg.seed)
    assert cfg.ood.temperature == src_ood["temperature"] and ood["temperature"] == src_ood["temperature"]
    assert cfg.ood.threshold == src_ood["threshold"] and ood["threshold"] == src_ood["threshold"]
    assert ood["source"] == "fixed (ood.threshold)" and ood["fitted_on"] == "ood.temperature (fixed)"
    derived = yaml.safe_load((out / "config.yaml").read_text())["derived"]["final_of"]
    assert derived["run"] == str(source_run.resolve()) and derived["best_epoch"] == best
    assert derived["threshold_source"] == src_ood["source"]
    # It trained on every training and validation row, for `best` epochs, and kept the last.
    src_splits, splits = source.read_json("splits.json"), final.read_json("splits.json")
    assert splits["train"] == src_splits["train"] + src_splits["validation"]
    assert splits["test"] == src_splits["test"]
    summary = final.summary()
    assert sum(summary.train_label_counts.values()) == len(src_splits["train"]) + len(src_splits["validation"])
    assert summary.epochs_run == best and summary.best_epoch == best
    epochs = [r for r in final.metrics() if r["type"] == "epoch"]
    assert len(epochs) == best
    card = (out / "README.md").read_text()
    assert "`lorafit train --final`" in card and "Best validation" not in card and "Validation of the last epoch" not in card
    assert "Best validation" in (source_run / "README.md").read_text()
    # Prediction uses the carried temperature and threshold, and says where the threshold came from.
    clf = lorafit.load(out)
    assert clf.oos.threshold == pytest.approx(src_ood["threshold"]) and clf.oos.temperature == pytest.approx(src_ood["temperature"])
    assert clf.oos.source == "fixed (ood.threshold)"


def test_final_of_an_unfinished_or_final_run_is_refused(source_run, tiny_bert, tiny_data, tmp_path, capsys):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text((source_run / "config.yaml").read_text())
    line = train_fails_cleanly(capsys, tmp_path / "a", ["--final", str(unfinished)])
    assert "has not finished training" in line
    line = train_fails_cleanly(capsys, tmp_path / "b", ["--final", str(source_run), "train.lr=1e-3"])
    assert "--final takes the finished run and --out" in line
    final = tmp_path / "final"
    train_final(source_run, final, progress=False)
    line = train_fails_cleanly(capsys, tmp_path / "c", ["--final", str(final)])
    assert "already trained on its validation rows" in line


def test_final_of_a_run_with_out_of_scope_examples_is_refused(tiny_bert, tmp_path, capsys):
    folder = write_dataset(tmp_path / "data", n_train=160)
    src = tmp_path / "src"
    train(load_config(None, tiny_overrides(tiny_bert, folder, **{"train.epochs": 1, "data.known_intents": 0.75})), src)
    line = train_fails_cleanly(capsys, tmp_path / "final", ["--final", str(src)])
    assert "out-of-scope examples" in line
    assert json.loads((src / "summary.json").read_text())["best_epoch"] == 1  # the source run itself is untouched


def test_a_final_run_resumes_bit_for_bit(tiny_bert, tiny_data, tmp_path, monkeypatch):
    """Killed mid-epoch 2 and resumed, a run on train + validation ends as the uninterrupted one (the joined
    split is rebuilt the same, and the resume's data check accepts it)."""
    from conftest import assert_same_adapter_run, crash_after_step

    from lorafit.train import resume

    extra = {"train.epochs": 3, "train.checkpoint_every": 3, "train.keep_checkpoints": 2, "method.dropout": 0.1,
             "data.train_on_validation": "true", "train.keep": "last", "ood.temperature": 1.3, "ood.threshold": 0.4}
    overrides = tiny_overrides(tiny_bert, tiny_data, **extra)
    reference = train(load_config(None, overrides), tmp_path / "reference")
    assert reference.summary["steps"] == 3 * 15  # 108 training + 12 validation rows, batches of 8
    crash_after_step(overrides, tmp_path / "killed", monkeypatch, step=20)
    resume(tmp_path / "killed")
    assert_same_adapter_run(reference.path, tmp_path / "killed")
    assert json.loads((tmp_path / "killed" / "ood.json").read_text())["temperature"] == 1.3


def test_compare_takes_final_runs_as_one_configuration_that_cannot_be_the_reference(source_run, tiny_bert, tmp_path):
    """Final runs of different seeds train their own runs' best epoch counts (a validation choice, like a best
    epoch): one configuration. Their validation rows were trained on, so they never pick the reference,
    however high their validation figures."""
    import shutil

    from lorafit.compare import collect, compare, to_markdown

    other = tmp_path / "source-s1"
    cfg = RunDir(source_run).config()
    train(cfg.model_copy(update={"seed": 1}), other)
    summary = json.loads((other / "summary.json").read_text())
    summary["best_epoch"] = 1 if RunDir(source_run).summary().best_epoch != 1 else 2  # as if its validation chose otherwise
    (other / "summary.json").write_text(json.dumps(summary))
    sources = [tmp_path / "source-s0", other]
    shutil.copytree(source_run, sources[0])
    finals = [train_final(src, tmp_path / f"final-{i}", progress=False) for i, src in enumerate(sources)]
    assert finals[0].summary["epochs_run"] != finals[1].summary["epochs_run"]
    for final in finals:  # validation figures on trained-on rows: higher than any held-out configuration's
        (final.path / "summary.json").write_text(json.dumps(
            {**json.loads((final.path / "summary.json").read_text()), "best_validation": {"accuracy": 1.0}}))
    result = compare(collect([*sources, *(f.path for f in finals)]))
    assert len(result["rows"]) == 2
    final_row = next(r for r in result["rows"] if not r["validation_held_out"])
    assert final_row["seeds"] == [0, 1] and not final_row["best"] and final_row["validation"] == 1.0
    assert "(trained on)" in to_markdown(result)
    with pytest.raises(UserError, match="every configuration trained on its validation rows"):
        compare(collect([f.path for f in finals]))


def test_final_runs_feed_no_choice_made_downstream(source_run, tmp_path, capsys):
    """A final run's validation rows were trained on: its export checks parity on test, a soup of final runs
    is left uncalibrated, a final run is refused as a distillation teacher, and feature scores are refused."""
    from lorafit.export import export
    from lorafit.soup import soup

    final = train_final(source_run, tmp_path / "final", progress=False).path
    meta = export(final, "merged", tmp_path / "merged")
    assert meta["parity"]["split"] == "test"
    meta = soup([final, final], tmp_path / "soup")
    assert not (tmp_path / "soup" / "ood.json").exists()
    assert meta["calibration"].startswith("none: a run trained on its validation rows (lorafit train --final)")
    cfg = RunDir(source_run).config()
    overrides = [f"model.name={cfg.model.name}", f"data.name={cfg.data.name}", "train.epochs=1", "train.progress=false",
                 "method.rank=4", "method.alpha=8", "train.threads=1", f"distill.teacher={final}"]
    line = train_fails_cleanly(capsys, tmp_path / "student", overrides)
    assert "trained on its validation rows (lorafit train --final)" in line
    with pytest.raises(UserError, match="ood.score=knn is fitted on validation"):
        load_config(None, ["data.train_on_validation=true", "train.keep=last", "ood.temperature=1.0", "ood.threshold=0.5",
                           "ood.score=knn"])
    with pytest.raises(UserError, match="ood.calibrate=false turns off"):
        load_config(None, ["ood.temperature=1.5", "ood.calibrate=false"])
    line = train_fails_cleanly(capsys, tmp_path / "x", ["--final-epochs", "recipe", str(source_run / "config.yaml")])
    assert "--final-epochs goes with --final RUN" in line


def test_refit_of_a_final_run_keeps_its_threshold_with_its_score(source_run, tmp_path):
    from lorafit.posthoc import refit

    final = train_final(source_run, tmp_path / "final", progress=False).path
    with pytest.raises(UserError, match="fixed threshold for msp"):
        refit(final, {"score": "energy"})
    assert json.loads((final / "ood.json").read_text())["score"] == "msp"
    refit(final)  # the same score: its fixed temperature and threshold again
    assert json.loads((final / "ood.json").read_text())["source"] == "fixed (ood.threshold)"
