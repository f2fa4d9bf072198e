"""sources, batching and data stay separate rooms; hub datasets are cached as whole Parquet files.

The download tests (local HTTP server, sha256, mirror, package) are in test_data.py; here: the
`hf:` path with a stand-in `datasets` module (no network), and the import direction of the modules.
"""

from __future__ import annotations

import ast
import sys
import types
from pathlib import Path

import pandas as pd
import pytest

from lorafit import batching, data, sources
from lorafit.config import DataConfig
from lorafit.errors import UserError

from conftest import synthetic_frame

NAMES = ["travel", "food", "sport"]  # the hub's class order, not alphabetical


class _HubSplit:
    """What `datasets.load_dataset(...)[split]` offers lorafit: to_pandas() and features."""

    def __init__(self, frame: pd.DataFrame, fail: bool = False):
        self.frame, self.fail = frame, fail
        self.features = {"label": types.SimpleNamespace(names=NAMES)}

    def to_pandas(self) -> pd.DataFrame:
        if self.fail:
            raise RuntimeError("connection lost while reading the split")
        return self.frame.assign(label=[NAMES.index(label) for label in self.frame["label"]])


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A stand-in `datasets` module whose load_dataset serves train/valid/unsupervised splits."""
    calls: list[str] = []
    frames = {"train": synthetic_frame(48, seed=40), "valid": synthetic_frame(12, seed=41),
              "unsupervised": synthetic_frame(5, seed=42)}
    failing: set[str] = set()

    def load_dataset(hub_id: str):
        calls.append(hub_id)
        if hub_id == "org/missing":
            raise FileNotFoundError("Dataset 'org/missing' doesn't exist on the Hub\nmore detail")
        return {name: _HubSplit(frame, fail=name in failing) for name, frame in frames.items()}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.setenv("LORAFIT_CACHE_DIR", str(tmp_path / "cache"))
    return types.SimpleNamespace(calls=calls, frames=frames, failing=failing, cache=tmp_path / "cache")


def _files(folder):
    return sorted(p.name for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def test_hub_dataset_is_cached_as_parquet_with_class_names(hub):
    dataset, _ = data.load(DataConfig(name="hf:org/tiny"), seed=0)

    folder = hub.cache / "hub" / "org__tiny"
    assert sources.hub_folder("org/tiny", "label") == folder
    assert _files(hub.cache) == ["train.parquet", "validation.parquet"]  # "valid" renamed, "unsupervised" skipped
    assert pd.read_parquet(folder / "validation.parquet")["label"].tolist() == hub.frames["valid"]["label"].tolist()
    assert dataset.source == "hf:org/tiny"
    assert dataset.provenance["validation"] == "file"
    assert dataset.splits["validation"].labels == hub.frames["valid"]["label"].tolist()  # names, not 0/1/2
    assert len(dataset.splits["train"]) + len(dataset.splits["test"]) == 48  # test carved from train

    again, _ = data.load(DataConfig(name="hf:org/tiny"), seed=0)
    assert hub.calls == ["org/tiny"]  # the second load reads the cache
    assert again.splits_record() == dataset.splits_record()


def test_unknown_hub_dataset_is_one_line_and_caches_nothing(hub):
    with pytest.raises(UserError) as info:
        data.load(DataConfig(name="hf:org/missing"), seed=0)
    assert str(info.value) == "cannot load hub dataset 'org/missing': Dataset 'org/missing' doesn't exist on the Hub"
    assert not hub.cache.exists()


def test_failed_hub_split_leaves_no_train_file_so_the_next_load_starts_over(hub):
    hub.failing.add("valid")
    with pytest.raises(RuntimeError, match="connection lost"):
        data.load(DataConfig(name="hf:org/tiny"), seed=0)
    assert _files(hub.cache) == []  # train is written last: without it the folder is not taken as done

    hub.failing.clear()
    dataset, _ = data.load(DataConfig(name="hf:org/tiny"), seed=0)
    assert hub.calls == ["org/tiny", "org/tiny"]
    assert dataset.provenance["validation"] == "file"


def test_read_split_is_the_public_reader_of_one_file(tmp_path):
    path = tmp_path / "eval.csv"
    synthetic_frame(10, seed=3).assign(text=lambda f: f["text"].where(f.index != 4, "  ")).to_csv(path, index=False)
    split, dropped = data.read_split(path, "text", "label")
    assert dropped == 1 and len(split) == 9 and 4 not in split.rows


@pytest.mark.parametrize("module, allowed", [
    (sources, {"atomic", "errors"}),
    (batching, set()),
])
def test_sources_and_batching_do_not_import_the_data_layer(module, allowed):
    """data imports sources and batching, never the reverse (`import lorafit` loads everything, so
    this reads the modules' own import lines)."""
    tree = ast.parse(Path(module.__file__).read_text(encoding="utf-8"))
    relative = [node for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 1]
    # "from .errors import X" names the module errors; "from . import atomic" names atomic
    imported = {name for node in relative for name in ([node.module] if node.module else [a.name for a in node.names])}
    assert imported <= allowed
