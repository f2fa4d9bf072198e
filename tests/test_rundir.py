"""The run-folder records: each run file read into its record and written back is the same bytes, and
run folders of older versions (fewer keys, other keys) still load and still make reports and cards."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

import lorafit
from lorafit.compare import collect, compare
from lorafit.errors import UserError
from lorafit.modelcard import render
from lorafit.rundir import ClassScores, Compute, Confusion, Eval, Predictions, RunDir, Splits, Summary

from conftest import tiny_overrides, write_dataset
from test_golden import VOLATILE

HERE = Path(__file__).parent
RECORDS = {Summary: "summary", Eval: "eval", Predictions: "predictions", Splits: "splits", Compute: "compute"}
#: summary.json keys that a run folder of an earlier version may lack.
NEWER = ("compute", "skipped_steps", "cpu_fast_paths", "processes", "versions", "autocast", "steps", "device", "allocator")


@pytest.fixture(scope="module")
def run(tiny_bert, tmp_path_factory) -> Path:
    """An AdaLoRA run: its summary.json carries the method's own figures after the common ones."""
    root = tmp_path_factory.mktemp("rundir")
    overrides = tiny_overrides(tiny_bert, write_dataset(root / "data"), **{"method.name": "adalora", "method.rank": 2,
                                                                         "method.init_rank": 4, "method.delta_t": 2})
    lorafit.train(lorafit.load_config(None, overrides), root / "run")
    return root / "run"


@pytest.mark.parametrize("record", list(RECORDS), ids=lambda r: r.__name__)
def test_a_record_read_and_written_back_is_the_same_bytes(run, tmp_path, record):
    read = getattr(RunDir(run), RECORDS[record])()
    assert isinstance(read, record) and read.absent == frozenset()
    copy = RunDir(tmp_path)
    copy.write_record(read)
    assert (tmp_path / record.FILE).read_bytes() == (run / record.FILE).read_bytes()


def test_records_hold_the_files_facts_as_typed_fields(run):
    folder = RunDir(run)
    summary, ev, predictions = folder.summary(), folder.eval(), folder.predictions()
    written = json.loads((run / "summary.json").read_text())
    # The fields are what train writes, in its order; AdaLoRA's own figures follow, kept in `extra`.
    fields = [f.name for f in dataclasses.fields(Summary) if f.name not in ("extra", "absent")]
    assert list(written)[: len(fields)] == fields
    assert list(summary.extra) == list(written)[len(fields):] and "final_ranks" in summary.extra
    assert summary.extra["final_ranks"] == written["final_ranks"]
    assert summary.test_accuracy == ev.accuracy == written["test_accuracy"]
    assert isinstance(summary.compute, Compute) and summary.compute == folder.compute()
    assert all(isinstance(v, ClassScores) for v in ev.per_class.values())
    assert all(isinstance(c, Confusion) for c in ev.top_confusions)
    assert ev.examples == len(predictions.target) == len(predictions.predicted) == len(predictions.probability)
    splits = folder.splits()
    assert set(splits.rows) == {"train", "validation", "test"} and splits.extra == {}
    assert len(splits.rows["test"]) == ev.examples


def test_the_golden_runs_summary_keys_are_the_records_fields():
    """The golden run pins summary.json without its volatile keys: those read as absent, the rest as fields."""
    golden = json.loads((HERE / "golden" / "tiny_run.json").read_text(encoding="utf-8"))
    for runs in golden.values():
        for name, outputs in runs.items():
            summary = Summary.from_json(outputs["summary"])
            assert summary.extra == {}, name  # LoRA and full fine-tuning add no figures of their own
            assert summary.absent == VOLATILE, name  # every other key pinned there is a field
            assert summary.to_json() == outputs["summary"]


@pytest.mark.filterwarnings("ignore::scipy.stats.ConstantInputWarning")  # one run: per-class F1 against counts is undefined
def test_an_older_summary_missing_newer_keys_still_loads_and_reports(run, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(run, old)
    written = json.loads((old / "summary.json").read_text())
    older = {k: v for k, v in written.items() if k not in NEWER} | {"from_a_later_version": 1}
    (old / "summary.json").write_text(json.dumps(older, indent=2) + "\n")
    (old / "compute.json").unlink()

    summary = RunDir(old).summary()
    assert summary.absent == frozenset(NEWER)
    assert summary.compute is None and summary.steps is None and summary.versions is None
    assert summary.extra["from_a_later_version"] == 1 and "final_ranks" in summary.extra
    assert summary.to_json() == older and list(summary.to_json()) == list(older)  # absent keys are not written back
    # Its readers still work on it.
    text = render(old)
    assert "? optimiser steps" in text and "## Efficiency" in text
    result = compare(collect([old]))
    assert result["rows"][0]["accuracy"] == summary.test_accuracy
    pytest.importorskip("matplotlib")
    from lorafit.report import report

    _, markdown = report([old], tmp_path / "report")
    assert "| device |  |" in markdown.read_text()  # an unknown device is left blank, as before


def test_old_splits_and_eval_files_load():
    splits = Splits.from_json({"train": [3, 1], "test": [2]})  # before source, provenance, seed and hashes
    assert splits.rows == {"train": [3, 1], "test": [2]} and splits.seed is None and splits.provenance is None
    assert splits.to_json() == {"train": [3, 1], "test": [2]}
    ev = Eval.from_json({"split": "test", "accuracy": 0.5})
    assert ev.per_class is None and ev.top_confusions is None and ev.to_json() == {"split": "test", "accuracy": 0.5}


def test_the_writer_names_every_field():
    """The training loop builds a Summary by keyword: a forgotten figure is an error, not a missing key."""
    with pytest.raises(TypeError, match="missing"):
        Summary(method="lora", model="bert")
    predictions = Predictions(split="test", target=[0, 1], predicted=[0, 0], probability=[0.9, 0.6])
    assert predictions.to_json() == {"split": "test", "target": [0, 1], "predicted": [0, 0], "probability": [0.9, 0.6]}
    with pytest.raises(ValueError, match="repeats the field"):
        Predictions(split="test", target=[], predicted=[], probability=[], extra={"split": "validation"})
    splits = Splits(source="s", provenance={}, dropped_rows={}, rows={"train": [0], "test": [1]}, seed=0, content_sha256={})
    assert list(splits.to_json()) == ["source", "provenance", "dropped_rows", "train", "test", "seed", "content_sha256"]


def test_a_run_file_that_is_not_an_object_is_one_clear_error(run, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    (broken / "summary.json").write_text("[1, 2]\n")
    with pytest.raises(UserError, match="summary.json is corrupt: it holds a list"):
        RunDir(broken).summary()


def test_the_derived_section_is_read_as_training_wrote_it_and_a_broken_one_is_one_clear_error(run, tmp_path):
    derived = RunDir(run).derived()
    assert derived["total_steps"] == derived["steps_per_epoch"] * RunDir(run).config().train.epochs
    assert derived["adapted_modules"] > 0
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    text = (broken / "config.yaml").read_text()
    (broken / "config.yaml").write_text(text[:text.index("derived:")] + "derived: [1, 2]\n")
    with pytest.raises(UserError, match="its derived section is not a mapping"):
        RunDir(broken).derived()
    (broken / "config.yaml").write_text(text[:text.index("derived:")])  # an older run that recorded none
    assert RunDir(broken).derived() == {}
