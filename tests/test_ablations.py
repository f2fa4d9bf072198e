"""bench/ablations.py, the script behind the README's ablation tables: the command line each variant's run gets,
and the table it prints, where a final model (`lorafit train --final`) is shown as trained on its validation rows."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from lorafit.config import load_config
from lorafit.train import train, train_final

from conftest import tiny_overrides, write_dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import ablations  # noqa: E402  (bench/ is not a package: its scripts import their neighbours by name)


def test_a_final_variant_refits_the_run_of_the_same_seed(tmp_path):
    assert ablations.train_args(tmp_path, "snips", "full+final", {}, 3) == ["--final", str(tmp_path / "snips" / "full" / "seed=3")]
    # the variant it refits is one of the table's and comes before it (runs go in table order)
    order = list(ablations.variants())
    assert order.index(ablations.FINALS["full+final"][1]) < order.index("full+final")


def test_other_variants_train_on_their_dataset_with_their_overrides(tmp_path):
    everything = ablations.variants()
    assert ablations.train_args(tmp_path, "trec6", "full", everything["full"][1], 1) == [
        "--data", "trec6", "method.name=full", "seed=1", "train.threads=1"]
    # a teacher named through {variants} and {seed}: that variant's run of the same seed
    assert ablations.train_args(tmp_path, "trec6", "distill-full", everything["distill-full"][1], 2) == [
        "--data", "trec6", f"distill.teacher={tmp_path / 'trec6' / 'full' / 'seed=2'}", "seed=2", "train.threads=1"]
    assert "method.targets=[\"query\", \"value\"]" in ablations.train_args(tmp_path, "trec6", "published", everything["published"][1], 0)


def test_the_table_shows_a_final_model_beside_its_source_never_as_the_reference(tiny_bert, tmp_path):
    data = write_dataset(tmp_path / "data", n_train=120)
    source = tmp_path / "ablations" / "tiny" / "full" / "seed=0"
    train(load_config(None, tiny_overrides(tiny_bert, data, **{"train.epochs": 2})), source)
    train_final(source, tmp_path / "ablations" / "tiny" / "full+final" / "seed=0")
    table = ablations._table(tmp_path / "ablations", "tiny", ["full", "full+final"])
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines() if line.startswith("| full")}
    assert set(rows) == {"full", "full+final"}
    assert "| reference |" in rows["full"] and "(trained on)" not in rows["full"]
    assert "(trained on)" in rows["full+final"] and "| reference |" not in rows["full+final"]
    assert (tmp_path / "ablations" / "tiny" / "compare.md").is_file()
