"""The data layer: reading files, cleaning, seeded splits, batching, and fetching built-in data.

The download tests run against a real HTTP server on 127.0.0.1 serving a temp folder; urllib is
not mocked.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import json
import random
import re
import shutil
import socket
import threading
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import torch

from lorafit import batching, data, sources
from lorafit.config import DataConfig
from lorafit.data import Split
from lorafit.sources import BuiltinDataset, RemoteFile
from lorafit.errors import UserError

from conftest import synthetic_frame, tiny_overrides


def write_frame(frame: pd.DataFrame, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix
    if suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix == ".tsv":
        frame.to_csv(path, index=False, sep="\t")
    elif suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True, force_ascii=False)
    elif suffix == ".parquet":
        frame.to_parquet(path, index=False)
    else:
        raise ValueError(suffix)
    return path


def load(name, seed: int = 0, **cfg):
    return data.load(DataConfig(name=str(name), **cfg), seed=seed)


# -- reading files and folders ------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet", ".tsv"])
def test_folder_with_three_split_files_is_read_as_is(tmp_path, suffix):
    frames = {"train": synthetic_frame(30, seed=1), "validation": synthetic_frame(9, seed=2), "test": synthetic_frame(12, seed=3)}
    for split, frame in frames.items():
        write_frame(frame, tmp_path / f"{split}{suffix}")

    dataset, resolved = load(tmp_path)

    assert dataset.provenance == {"train": "file", "validation": "file", "test": "file"}
    for split, frame in frames.items():
        assert dataset.splits[split].texts == frame["text"].tolist()
        assert dataset.splits[split].labels == frame["label"].tolist()
        assert dataset.splits[split].rows == list(range(len(frame)))
    assert dataset.label_names == ["food", "sport", "travel"]
    assert dataset.source == str(tmp_path.resolve())
    assert dataset.dropped == {"train": 0, "validation": 0, "test": 0}
    assert (resolved.text_column, resolved.label_column) == ("text", "label")


def test_dev_file_is_the_validation_split(tmp_path):
    write_frame(synthetic_frame(30, seed=1), tmp_path / "train.csv")
    write_frame(synthetic_frame(6, seed=2), tmp_path / "dev.csv")
    write_frame(synthetic_frame(6, seed=3), tmp_path / "test.csv")
    dataset, _ = load(tmp_path)
    assert dataset.provenance["validation"] == "file"
    assert dataset.splits["validation"].texts == synthetic_frame(6, seed=2)["text"].tolist()


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_single_file_is_train_and_the_rest_is_carved(tmp_path, suffix):
    frame = synthetic_frame(60, seed=4)
    path = write_frame(frame, tmp_path / f"all{suffix}")

    dataset, _ = load(path, validation_fraction=0.2)

    sizes = {name: len(split) for name, split in dataset.splits.items()}
    # 20 per class; test takes round(0.2 * 20) = 4 per class, validation round(0.2 * 16) = 3.
    assert sizes == {"train": 39, "validation": 9, "test": 12}
    assert dataset.provenance["train"] == "file"
    assert dataset.provenance["validation"].startswith("carved from train")
    assert dataset.provenance["test"].startswith("carved from train")
    for split in dataset.splits.values():
        assert split.texts == frame["text"].iloc[split.rows].tolist()
        assert split.labels == frame["label"].iloc[split.rows].tolist()


def test_text_and_label_columns_are_configurable(tmp_path):
    frame = synthetic_frame(30, seed=5).rename(columns={"text": "utterance", "label": "intent"})
    frame["noise"] = "x"
    write_frame(frame, tmp_path / "train.csv")
    write_frame(frame.iloc[:9], tmp_path / "test.csv")

    dataset, resolved = load(tmp_path, text_column="utterance", label_column="intent")

    assert (resolved.text_column, resolved.label_column) == ("utterance", "intent")
    assert sorted(dataset.splits["test"].texts) == sorted(frame["utterance"].iloc[:9])
    assert dataset.label_names == ["food", "sport", "travel"]


def test_missing_column_names_the_existing_columns(tmp_path):
    frame = synthetic_frame(12).rename(columns={"text": "sentence"})
    path = write_frame(frame, tmp_path / "train.csv")
    with pytest.raises(UserError) as info:
        load(path)
    message = str(info.value)
    assert "'text'" in message and "sentence, label" in message and "data.text_column" in message

    with pytest.raises(UserError, match=r"no label column 'category'.*columns are: sentence, label"):
        load(path, text_column="sentence", label_column="category")


def test_integer_labels_are_strings_in_numeric_order(tmp_path):
    frame = pd.DataFrame({"text": [f"text number {i}" for i in range(48)], "label": [i % 12 for i in range(48)]})
    write_frame(frame, tmp_path / "train.jsonl")
    write_frame(frame, tmp_path / "test.jsonl")
    dataset, _ = load(tmp_path, validation_fraction=0.25)
    assert dataset.label_names == [str(i) for i in range(12)]  # 2 before 10, not "10" before "2"
    assert dataset.splits["test"].labels == [str(i % 12) for i in range(48)]


def test_missing_file_and_folder_without_train_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not an existing file or folder"):
        load(tmp_path / "missing.csv")
    write_frame(synthetic_frame(9), tmp_path / "empty_folder" / "test.csv")
    with pytest.raises(UserError, match="no train file"):
        load(tmp_path / "empty_folder")


def test_unsupported_and_malformed_files_are_user_errors(tmp_path):
    (tmp_path / "train.txt").write_text("hello\n")
    with pytest.raises(UserError, match="unsupported file type '.txt'"):
        data.read_table(tmp_path / "train.txt")
    (tmp_path / "bad.csv").write_bytes(b"text,label\n\xff\xfe broken,a\n")
    with pytest.raises(UserError, match="not valid UTF-8"):
        data.read_table(tmp_path / "bad.csv")


# -- cleaning -----------------------------------------------------------------------------------

def test_empty_and_whitespace_texts_are_dropped_and_counted(tmp_path):
    frame = synthetic_frame(30, seed=6)
    blank_rows = [3, 7, 8, 20]
    for row, blank in zip(blank_rows, ["", "   ", "\t", " \t  "]):
        frame.loc[row, "text"] = blank
    frame.loc[11, "label"] = ""  # an empty label drops the row too
    write_frame(frame, tmp_path / "train.csv")
    test = synthetic_frame(9, seed=7)
    test.loc[0, "text"] = "  "
    write_frame(test, tmp_path / "test.csv")

    dataset, _ = load(tmp_path)

    assert dataset.dropped == {"train": 5, "test": 1}
    assert dataset.splits_record()["dropped_rows"] == {"train": 5, "test": 1}
    kept = set(dataset.splits["train"].rows) | set(dataset.splits["validation"].rows)
    assert kept == set(range(30)) - {*blank_rows, 11}
    assert dataset.splits["test"].rows == list(range(1, 9))
    assert all(text.strip() for split in dataset.splits.values() for text in split.texts)


def test_jsonl_null_texts_are_dropped(tmp_path):
    rows = [{"text": "hello hotel", "label": "travel"}, {"text": None, "label": "food"},
            {"text": "pizza now", "label": "food"}, {"text": "golf please", "label": None}]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    split, dropped = data.read_split(tmp_path / "train.jsonl", "text", "label")
    assert dropped == 2
    assert (split.texts, split.labels, split.rows) == (["hello hotel", "pizza now"], ["travel", "food"], [0, 2])


def test_all_empty_texts_is_a_user_error(tmp_path):
    frame = pd.DataFrame({"text": ["", "  ", "\t", ""], "label": ["a", "b", "a", "b"]})
    path = write_frame(frame, tmp_path / "train.csv")
    with pytest.raises(UserError, match=r"no usable rows \(4 rows"):
        load(path)


# -- seeded, stratified splits ------------------------------------------------------------------

def _split_of(frame: pd.DataFrame) -> Split:
    return Split(frame["text"].tolist(), frame["label"].tolist(), list(range(len(frame))))


def test_carve_is_stratified_seeded_and_disjoint():
    labels = ["a"] * 50 + ["b"] * 30 + ["c"] * 10 + ["d"] * 3
    rng = random.Random(0)
    rng.shuffle(labels)
    split = Split([f"t{i}" for i in range(len(labels))], labels, [100 + i for i in range(len(labels))])

    rest, carved = data.carve(split, 0.2, seed=7)

    assert Counter(carved.labels) == {"a": 10, "b": 6, "c": 2, "d": 1}  # round(0.2 * n), at least 1
    assert Counter(rest.labels) == {"a": 40, "b": 24, "c": 8, "d": 2}
    assert set(rest.rows).isdisjoint(carved.rows)
    assert sorted(rest.rows + carved.rows) == split.rows
    for part in (rest, carved):  # texts, labels and rows stay aligned
        assert all(split.texts[r - 100] == t and split.labels[r - 100] == lab for t, lab, r in zip(part.texts, part.labels, part.rows))

    again_rest, again_carved = data.carve(split, 0.2, seed=7)
    assert (again_rest.rows, again_carved.rows) == (rest.rows, carved.rows)
    _, other = data.carve(split, 0.2, seed=8)
    assert other.rows != carved.rows
    assert Counter(other.labels) == Counter(carved.labels)


def test_carve_leaves_a_singleton_class_in_train():
    split = Split(["x", "y", "z", "w", "v"], ["a", "a", "a", "a", "solo"], [0, 1, 2, 3, 4])
    rest, carved = data.carve(split, 0.5, seed=0)
    assert "solo" in rest.labels and "solo" not in carved.labels


def test_load_carves_validation_with_every_class_and_records_rows(tmp_path):
    frame = synthetic_frame(90, seed=8)
    write_frame(frame, tmp_path / "train.csv")
    write_frame(synthetic_frame(15, seed=9), tmp_path / "test.csv")

    first, _ = load(tmp_path, seed=3, validation_fraction=0.2)
    second, _ = load(tmp_path, seed=3, validation_fraction=0.2)
    other, _ = load(tmp_path, seed=4, validation_fraction=0.2)

    train, validation = first.splits["train"], first.splits["validation"]
    assert Counter(validation.labels) == {"food": 6, "sport": 6, "travel": 6}
    assert set(train.rows).isdisjoint(validation.rows)
    assert sorted(train.rows + validation.rows) == list(range(90))
    assert validation.texts == frame["text"].iloc[validation.rows].tolist()
    assert second.splits["validation"].rows == validation.rows
    assert other.splits["validation"].rows != validation.rows
    assert first.provenance["validation"] == "carved from train (stratified, fraction 0.2, seed 3)"
    assert first.provenance["test"] == "file"

    record = first.splits_record()
    assert record["source"] == str(tmp_path.resolve())
    assert record["provenance"] == first.provenance
    for name in ("train", "validation", "test"):
        assert record[name] == first.splits[name].rows
    assert json.loads(json.dumps(record)) == record  # what splits.json holds is plain JSON


def test_recorded_provenance_rebuilds_the_carved_splits(tmp_path):
    frame = synthetic_frame(90, seed=15)
    path = write_frame(frame, tmp_path / "all.csv")
    dataset, _ = load(path, seed=3, validation_fraction=0.2)

    def recorded_seed(name: str) -> int:
        match = re.fullmatch(r"carved from train \(stratified, fraction 0\.2, seed (\d+)\)", dataset.provenance[name])
        assert match, dataset.provenance[name]
        return int(match.group(1))

    # Test is carved first from the whole file, then validation from what is left.
    rest, test = data.carve(_split_of(frame), 0.2, recorded_seed("test"))
    train, validation = data.carve(rest, 0.2, recorded_seed("validation"))
    assert test.rows == dataset.splits["test"].rows
    assert validation.rows == dataset.splits["validation"].rows
    assert train.rows == dataset.splits["train"].rows
    assert set(test.rows).isdisjoint(validation.rows)


def test_train_limit_takes_the_first_rows_of_a_seeded_shuffle(tmp_path):
    frame = synthetic_frame(200, seed=10)
    write_frame(frame, tmp_path / "train.csv")
    write_frame(synthetic_frame(30, seed=11), tmp_path / "test.csv")
    write_frame(synthetic_frame(30, seed=12), tmp_path / "validation.csv")

    dataset, _ = load(tmp_path, seed=5, train_limit=40)
    again, _ = load(tmp_path, seed=5, train_limit=40)
    other, _ = load(tmp_path, seed=6, train_limit=40)

    order = list(range(200))
    random.Random(5).shuffle(order)
    rows = dataset.splits["train"].rows
    assert rows == sorted(order[:40])
    assert rows != list(range(40))
    assert again.splits["train"].rows == rows
    assert other.splits["train"].rows != rows
    assert dataset.splits["train"].texts == frame["text"].iloc[rows].tolist()
    assert dataset.provenance["train"] == "first 40 rows of a shuffle with seed 5"
    assert len(dataset.splits["test"]) == 30 and len(dataset.splits["validation"]) == 30

    unlimited, _ = load(tmp_path, seed=5, train_limit=500)
    assert unlimited.splits["train"].rows == list(range(200))
    assert unlimited.provenance["train"] == "file"


def test_validation_is_carved_from_the_limited_train(tmp_path):
    write_frame(synthetic_frame(300, seed=13), tmp_path / "train.csv")
    write_frame(synthetic_frame(30, seed=14), tmp_path / "test.csv")
    dataset, _ = load(tmp_path, seed=0, train_limit=60, validation_fraction=0.25)
    order = list(range(300))
    random.Random(0).shuffle(order)
    limited = set(order[:60])
    assert len(dataset.splits["train"]) + len(dataset.splits["validation"]) == 60
    assert set(dataset.splits["train"].rows) | set(dataset.splits["validation"].rows) == limited


def test_one_class_and_unseen_test_labels_are_user_errors(tmp_path):
    one = tmp_path / "one"
    write_frame(pd.DataFrame({"text": [f"t {i}" for i in range(10)], "label": ["only"] * 10}), one / "train.csv")
    with pytest.raises(UserError, match="1 class.*need at least 2"):
        load(one)

    unseen = tmp_path / "unseen"
    write_frame(synthetic_frame(30), unseen / "train.csv")
    test = synthetic_frame(9)
    test.loc[[0, 4], "label"] = ["music", "chess"]
    write_frame(test, unseen / "test.csv")
    with pytest.raises(UserError, match="test split has labels never seen in training: chess, music$"):
        load(unseen)


# -- batching -----------------------------------------------------------------------------------

def _varied_lengths(n: int = 3000, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(3, 12) if rng.random() < 0.7 else rng.randint(13, 256) for _ in range(n)]


def _padding_ratio(lengths: list[int], batches: list[list[int]]) -> float:
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    return padded / sum(lengths)


def test_length_grouped_batches_cover_every_index_once_with_little_padding():
    lengths = _varied_lengths()
    batches = batching.length_grouped_batches(lengths, 16, random.Random(0))

    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    assert len(batches) == len(lengths) // 16 + (len(lengths) % 16 > 0)
    assert all(1 <= len(b) <= 16 for b in batches)
    assert _padding_ratio(lengths, batches) < 1.08  # ~1.055 on these lengths
    # Against the same batch size in random order, which pads several-fold on these lengths.
    order = list(range(len(lengths)))
    random.Random(0).shuffle(order)
    assert _padding_ratio(lengths, [order[i : i + 16] for i in range(0, len(order), 16)]) > 3


def test_length_grouped_batches_run_in_growing_length_inside_megabatches_in_random_order():
    """transformers' LengthGroupedSampler order: consecutive batches mostly share a length (a kernel built for a
    shape is reused), each megabatch's batches shortest first, the megabatches themselves in random order."""
    lengths = _varied_lengths(n=800, seed=1)
    first = batching.length_grouped_batches(lengths, 8, random.Random(3), group=10)
    assert sorted(i for b in first for i in b) == list(range(800)) and len(first) == 100
    batch_max = [max(lengths[i] for i in b) for b in first]
    megabatches = [batch_max[k : k + 10] for k in range(0, 100, 10)]
    assert all(m == sorted(m) for m in megabatches)  # growing length inside each megabatch...
    assert batch_max != sorted(batch_max)  # ...not over the epoch
    starts = [max(lengths[i] for i in first[k]) for k in range(0, 100, 10)]
    other = batching.length_grouped_batches(lengths, 8, random.Random(4), group=10)
    assert starts != [max(lengths[i] for i in other[k]) for k in range(0, 100, 10)]
    # Fewer than 4 x group batches: smaller megabatches, at least 4 of them, so the batches still change
    # from epoch to epoch (one megabatch sorted by length would give nearly the same batches every epoch).
    few = _varied_lengths(n=200, seed=2)
    epochs = [batching.length_grouped_batches(few, 8, random.Random(seed)) for seed in (0, 1)]
    for batches in epochs:
        maxima = [max(few[i] for i in b) for b in batches]
        assert sum(b < a for a, b in zip(maxima, maxima[1:])) >= 3  # at least 4 runs of growing length
    assert {tuple(sorted(b)) for b in epochs[0]} != {tuple(sorted(b)) for b in epochs[1]}


def test_the_shuffled_batch_order_of_older_runs_is_unchanged():
    """Runs begun before the length-run order resume with these very batches (compute.json without batch_order)."""
    rng = random.Random(0)
    lengths = [rng.randint(3, 12) if rng.random() < 0.7 else rng.randint(13, 256) for _ in range(30)]
    assert batching.shuffled_length_grouped_batches(lengths, 4, random.Random(5), group=3) == [
        [15, 18, 14, 27], [19, 22], [1, 20, 21, 0], [7, 5, 16, 3], [2, 26, 4, 29], [12, 28, 6, 24], [23, 11, 8, 25],
        [17, 9, 13, 10]]  # what lorafit's length_grouped_batches returned before


def test_length_grouped_batches_are_seeded_and_shuffled():
    lengths = _varied_lengths(n=800, seed=1)
    first = batching.length_grouped_batches(lengths, 8, random.Random(3), group=10)
    assert first == batching.length_grouped_batches(lengths, 8, random.Random(3), group=10)
    assert first != batching.length_grouped_batches(lengths, 8, random.Random(4), group=10)
    batch_max = [max(lengths[i] for i in b) for b in first]
    assert batch_max != sorted(batch_max)  # batch order is shuffled, not longest-last
    assert sorted(i for b in first for i in b) == list(range(800))


def test_sorted_batches_are_in_length_order():
    lengths = _varied_lengths(n=101, seed=2)
    batches = batching.sorted_batches(lengths, 10)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(101))
    assert [len(b) for b in batches] == [10] * 10 + [1]
    assert [lengths[i] for i in flat] == sorted(lengths)


def test_collate_pads_to_the_longest_and_masks_the_padding():
    sequences = [[5, 6, 7], [8], [9, 10, 11, 12, 13]]
    input_ids, attention_mask = batching.collate(sequences, pad_id=0)
    assert input_ids.shape == attention_mask.shape == (3, 5)
    assert input_ids.dtype == attention_mask.dtype == torch.long
    assert input_ids.tolist() == [[5, 6, 7, 0, 0], [8, 0, 0, 0, 0], [9, 10, 11, 12, 13]]
    assert attention_mask.tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]

    ids, mask = batching.collate([[4, 4], [4]], pad_id=99)
    assert ids.tolist() == [[4, 4], [4, 99]] and mask.sum().item() == 3


def test_iterate_yields_the_batches_in_order():
    tokens = [[1, 2], [3], [4, 5, 6], [7]]
    out = list(batching.iterate(tokens, [[2, 0], [3, 1]], pad_id=0))
    assert [b for b, _, _ in out] == [[2, 0], [3, 1]]
    assert out[0][1].tolist() == [[4, 5, 6], [1, 2, 0]]
    assert out[1][2].tolist() == [[1], [1]]


# -- built-in datasets: mirror, cache, download -------------------------------------------------

class _Server:
    """A real HTTP server on 127.0.0.1 serving `root`, counting the requests per path."""

    def __init__(self, root: Path):
        self.requests: list[str] = []
        requests = self.requests

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(root), **kwargs)

            def do_GET(self):
                requests.append(self.path)
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served(tmp_path, monkeypatch):
    """Split files behind a local HTTP server; an empty cache; no mirror and no proxy."""
    root = tmp_path / "www"
    root.mkdir()
    train = synthetic_frame(60, seed=20).rename(columns={"text": "utterance", "label": "intent"})
    test = synthetic_frame(15, seed=21).rename(columns={"text": "utterance", "label": "intent"})
    train.to_csv(root / "train.csv", index=False)
    test.to_csv(root / "test.csv", index=False)
    cache = tmp_path / "cache"
    monkeypatch.setenv("LORAFIT_CACHE_DIR", str(cache))
    monkeypatch.delenv("LORAFIT_DATA_DIR", raising=False)
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    server = _Server(root)
    yield server, root, cache
    server.close()


def _spec(server: _Server, root: Path, name: str = "tinyremote", **sha: str) -> BuiltinDataset:
    files = {split: RemoteFile(server.url(f"{split}.csv"), sha.get(split, _sha256(root / f"{split}.csv"))) for split in ("train", "test")}
    return BuiltinDataset(name=name, text_column="utterance", label_column="intent", files=files)


def _all_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def test_fetch_builtin_downloads_into_the_cache_and_checks_sha256(served):
    server, root, cache = served
    spec = _spec(server, root)

    found = sources.fetch_builtin(spec)

    folder = cache / "datasets" / "tinyremote"
    assert {split: file.path for split, file in found.items()} == {"train": folder / "train.csv", "test": folder / "test.csv"}
    assert _all_files(cache) == ["datasets/tinyremote/test.csv", "datasets/tinyremote/train.csv"]  # no .part left
    for split in ("train", "test"):
        assert (folder / f"{split}.csv").read_bytes() == (root / f"{split}.csv").read_bytes()
        assert sources.sha256_of(folder / f"{split}.csv") == spec.files[split].sha256
    assert sorted(server.requests) == ["/test.csv", "/train.csv"]

    # A second call uses the cache; a damaged cached file is fetched again.
    assert sources.fetch_builtin(spec) == found
    assert len(server.requests) == 2
    (folder / "train.csv").write_text("text,label\ntampered,x\n")
    sources.fetch_builtin(spec)
    assert server.requests[2:] == ["/train.csv"]
    assert _sha256(folder / "train.csv") == spec.files["train"].sha256


def test_wrong_sha256_is_corrupt_and_leaves_nothing_in_the_cache(served):
    server, root, cache = served
    spec = _spec(server, root, train="0" * 64)

    with pytest.raises(UserError) as info:
        sources.fetch_builtin(spec)

    message = str(info.value)
    assert "corrupt" in message and server.url("train.csv") in message and "0" * 64 in message
    assert _sha256(root / "train.csv") in message
    assert server.requests == ["/train.csv"]
    assert _all_files(cache) == []


def test_unreachable_source_tells_how_to_use_a_local_mirror(served):
    _, root, cache = served
    url = f"http://127.0.0.1:{_closed_port()}/train.csv"
    spec = BuiltinDataset(name="offline", text_column="utterance", label_column="intent",
                          files={"train": RemoteFile(url, _sha256(root / "train.csv"))})

    with pytest.raises(UserError) as info:
        sources.fetch_builtin(spec)

    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"cannot download {url}")
    assert "LORAFIT_DATA_DIR" in message and "offline" in message
    assert _all_files(cache) == []


def test_missing_remote_file_is_a_user_error(served):
    server, root, cache = served
    spec = BuiltinDataset(name="gone", text_column="t", label_column="l",
                          files={"train": RemoteFile(server.url("nothing-here.csv"), "0" * 64)})
    with pytest.raises(UserError, match="cannot download .*nothing-here.csv.*LORAFIT_DATA_DIR"):
        sources.fetch_builtin(spec)
    assert server.requests == ["/nothing-here.csv"]
    assert _all_files(cache) == []


def test_local_mirror_wins_over_download(served, tmp_path, monkeypatch):
    server, root, cache = served
    mirror = _mirror_copy(tmp_path, root)
    monkeypatch.setenv("LORAFIT_DATA_DIR", str(mirror))
    spec = _spec(server, root)

    assert {split: file.path for split, file in sources.fetch_builtin(spec).items()} == {
        "train": mirror / "tinyremote" / "train.csv", "test": mirror / "tinyremote" / "test.csv"}
    assert server.requests == []
    assert _all_files(cache) == []

    monkeypatch.setitem(sources.BUILTINS, "tinyremote", spec)
    dataset, _ = data.load(DataConfig(name="tinyremote"), seed=0)
    assert dataset.splits["test"].texts == pd.read_csv(root / "test.csv")["utterance"].tolist()
    assert server.requests == []

    # A mirror folder without this dataset is ignored: the download path is taken.
    monkeypatch.setenv("LORAFIT_DATA_DIR", str(tmp_path / "elsewhere"))
    assert sources.fetch_builtin(spec)["train"].path == cache / "datasets" / "tinyremote" / "train.csv"
    assert sorted(server.requests) == ["/test.csv", "/train.csv"]


def test_mirror_only_dataset_without_a_mirror_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.delenv("LORAFIT_DATA_DIR", raising=False)
    monkeypatch.setenv("LORAFIT_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(UserError) as info:
        data.load(DataConfig(name="trec6"), seed=0)
    assert str(info.value) == ("the built-in dataset 'trec6' has no public download; put its files (train.csv, test.csv) "
                               "in $LORAFIT_DATA_DIR/trec6/ and set LORAFIT_DATA_DIR")
    assert not (tmp_path / "cache").exists()


def test_load_builtin_downloads_and_uses_the_spec_columns(served, monkeypatch):
    server, root, cache = served
    spec = _spec(server, root)
    monkeypatch.setitem(sources.BUILTINS, "tinyremote", spec)

    dataset, resolved = data.load(DataConfig(name="tinyremote"), seed=0)

    assert (resolved.text_column, resolved.label_column) == ("utterance", "intent")
    assert dataset.source == "builtin:tinyremote"
    assert dataset.provenance["test"] == "file"
    assert dataset.provenance["validation"].startswith("carved from train")
    served_test = pd.read_csv(root / "test.csv")
    assert dataset.splits["test"].texts == served_test["utterance"].tolist()
    assert len(dataset.splits["train"]) + len(dataset.splits["validation"]) == 60
    assert _all_files(cache) == ["datasets/tinyremote/test.csv", "datasets/tinyremote/train.csv"]


# -- every source checked against the registry's sha256 ----------------------------------------

def _mirror_copy(tmp_path: Path, root: Path, name: str = "tinyremote") -> Path:
    """A local mirror ($LORAFIT_DATA_DIR) holding exact copies of the served split files."""
    folder = tmp_path / "mirror" / name
    folder.mkdir(parents=True)
    for split in ("train", "test"):
        shutil.copyfile(root / f"{split}.csv", folder / f"{split}.csv")
    return folder.parent


def _append_row(path: Path) -> None:
    path.write_text(path.read_text(encoding="utf-8") + "one more pizza please,food\n", encoding="utf-8")


def test_tampered_mirror_file_is_one_clear_error(served, tmp_path, monkeypatch):
    server, root, cache = served
    mirror = _mirror_copy(tmp_path, root)
    monkeypatch.setenv("LORAFIT_DATA_DIR", str(mirror))
    monkeypatch.setitem(sources.BUILTINS, "tinyremote", _spec(server, root))
    dataset, _ = data.load(DataConfig(name="tinyremote"), seed=0)  # exact copies: read from the mirror
    assert len(dataset.splits["test"]) == 15
    assert server.requests == [] and _all_files(cache) == []

    train = mirror / "tinyremote" / "train.csv"
    _append_row(train)
    with pytest.raises(UserError) as info:
        data.load(DataConfig(name="tinyremote"), seed=0)
    message = str(info.value)
    assert "\n" not in message
    assert str(train) in message and "sha256" in message
    assert _sha256(train) in message and _sha256(root / "train.csv") in message
    assert "LORAFIT_DATA_DIR" in message
    assert server.requests == [] and _all_files(cache) == []  # no silent fall-back to a download

    # A mirror that lacks one of the registry's split files is refused too (not carved from train).
    shutil.copyfile(root / "train.csv", train)
    (mirror / "tinyremote" / "test.csv").unlink()
    with pytest.raises(UserError, match=r"has no test file \(test\.csv\) for the built-in dataset 'tinyremote'"):
        data.load(DataConfig(name="tinyremote"), seed=0)


def test_tampered_mirror_stops_lorafit_train_with_exit_2(served, tmp_path, monkeypatch, tiny_bert, capsys):
    from lorafit.cli import main

    server, root, _ = served
    mirror = _mirror_copy(tmp_path, root)
    _append_row(mirror / "tinyremote" / "test.csv")
    monkeypatch.setenv("LORAFIT_DATA_DIR", str(mirror))
    monkeypatch.setitem(sources.BUILTINS, "tinyremote", _spec(server, root))
    out = tmp_path / "run"

    assert main(["train", *tiny_overrides(tiny_bert, "tinyremote"), "--out", str(out)]) == 2

    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("lorafit: error: ")
    assert f"{mirror / 'tinyremote' / 'test.csv'} does not match the sha256" in err
    assert not out.exists()


def _hub_like(root: Path, seed: int) -> tuple[dict[str, pd.DataFrame], list[str]]:
    """Parquet split files with integer labels, as hub datasets store them (class i = names[i])."""
    frames = {"train": synthetic_frame(48, seed=seed), "test": synthetic_frame(12, seed=seed + 1)}
    names = ["travel", "food", "sport"]  # not alphabetical: the file's own class order
    for split, frame in frames.items():
        coded = frame.assign(label=[names.index(label) for label in frame["label"]])
        write_frame(coded, root / "split" / f"{split}-00000-of-00001.parquet")
    return frames, names


def test_hub_files_with_integer_labels_are_pinned_checked_and_named(served, monkeypatch):
    server, root, cache = served
    frames, names = _hub_like(root, seed=30)
    files = {split: RemoteFile(server.url(f"split/{split}-00000-of-00001.parquet"),
                               _sha256(root / "split" / f"{split}-00000-of-00001.parquet"),
                               name=f"{split}.parquet", label_names=tuple(names))
             for split in ("train", "test")}
    monkeypatch.setitem(sources.BUILTINS, "tinyhub", BuiltinDataset(name="tinyhub", text_column="text", label_column="label", files=files))

    dataset, _ = data.load(DataConfig(name="tinyhub"), seed=0)

    assert dataset.splits["test"].labels == frames["test"]["label"].tolist()  # names, not 0/1/2
    assert dataset.label_names == ["food", "sport", "travel"]
    assert _all_files(cache) == ["datasets/tinyhub/test.parquet", "datasets/tinyhub/train.parquet"]
    assert len(server.requests) == 2

    # The cache is checked on every load: a damaged cached file is fetched again, then matches.
    cached = cache / "datasets" / "tinyhub" / "train.parquet"
    write_frame(pd.DataFrame({"text": ["x"] * 3, "label": [0, 1, 2]}), cached)
    again, _ = data.load(DataConfig(name="tinyhub"), seed=0)
    assert server.requests[2:] == ["/split/train-00000-of-00001.parquet"]
    assert _sha256(cached) == files["train"].sha256
    assert again.splits["train"].texts == dataset.splits["train"].texts


def test_damaged_cache_offline_is_one_clear_error(served, monkeypatch):
    server, root, cache = served
    spec = _spec(server, root)
    monkeypatch.setitem(sources.BUILTINS, "tinyremote", spec)
    data.load(DataConfig(name="tinyremote"), seed=0)
    cached = cache / "datasets" / "tinyremote" / "test.csv"
    _append_row(cached)
    server.close()  # offline from now on

    with pytest.raises(UserError) as info:
        data.load(DataConfig(name="tinyremote"), seed=0)
    message = str(info.value)
    assert "\n" not in message
    assert f"{cached} does not match the sha256" in message and "cannot download" in message


def test_builtins_are_pinned_by_sha256_and_emotion_by_hub_revision():
    for spec in sources.BUILTINS.values():
        assert spec.files, spec.name
        for split, remote in spec.files.items():
            assert re.fullmatch(r"[0-9a-f]{64}", remote.sha256), (spec.name, split)
            assert remote.url is None or not re.search(r"/(main|master)/", remote.url), remote.url
    emotion = sources.BUILTINS["emotion"]
    assert set(emotion.files) == {"train", "validation", "test"}
    for split, remote in emotion.files.items():
        assert remote.url == ("https://huggingface.co/datasets/dair-ai/emotion/resolve/"
                              f"cab853a1dbdf4c42c2b3ef2173804746df8825fe/split/{split}-00000-of-00001.parquet")
        assert remote.label_names == ("sadness", "joy", "love", "anger", "fear", "surprise")
    # The CSV export of the same splits (label names, not numbers) is accepted in a mirror, by its own sha256.
    assert {split: f.file_name(split) for split, f in emotion.mirror_files.items()} == {
        "train": "train.csv", "validation": "validation.csv", "test": "test.csv"}
    assert not sources.BUILTINS["emotion"].packaged  # license unclear: never shipped


# -- Banking77 inside the package: the built-in name works offline -----------------------------

def _no_network_for(monkeypatch, tmp_path: Path, name: str) -> None:
    """No mirror, an empty cache, the hub offline and the dataset's download address a closed port."""
    monkeypatch.delenv("LORAFIT_DATA_DIR", raising=False)
    monkeypatch.setenv("LORAFIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = sources.BUILTINS[name]
    closed = f"http://127.0.0.1:{_closed_port()}"
    files = {split: dataclasses.replace(remote, url=f"{closed}/{split}.csv") for split, remote in spec.files.items()}
    monkeypatch.setitem(sources.BUILTINS, name, dataclasses.replace(spec, files=files))


def test_banking77_loads_offline_from_the_package(monkeypatch, tmp_path):
    _no_network_for(monkeypatch, tmp_path, "banking77")

    dataset, resolved = data.load(DataConfig(name="banking77"), seed=0)

    assert (resolved.text_column, resolved.label_column) == ("text", "category")
    assert len(dataset.label_names) == 77
    assert len(dataset.splits["test"]) == 3080
    assert len(dataset.splits["train"]) + len(dataset.splits["validation"]) == 10003
    assert dataset.source == "builtin:banking77"
    assert not (tmp_path / "cache").exists()  # nothing downloaded, nothing cached
    shipped = sources.PACKAGE_DATA / "banking77"
    assert {"LICENSE", "README.md", "train.csv", "test.csv"} <= {p.name for p in shipped.iterdir()}
    assert "CC-BY-4.0" in (shipped / "README.md").read_text() or "CC BY 4.0" in (shipped / "README.md").read_text()


def test_damaged_package_data_is_one_clear_error(monkeypatch, tmp_path):
    _no_network_for(monkeypatch, tmp_path, "banking77")
    packaged = tmp_path / "package"
    shutil.copytree(sources.PACKAGE_DATA / "banking77", packaged / "banking77")
    _append_row(packaged / "banking77" / "train.csv")
    monkeypatch.setattr(sources, "PACKAGE_DATA", packaged)

    with pytest.raises(UserError) as info:
        data.load(DataConfig(name="banking77"), seed=0)

    message = str(info.value)
    assert "\n" not in message
    assert f"{packaged / 'banking77' / 'train.csv'} does not match the sha256" in message
    assert "reinstall lorafit" in message
    assert not (tmp_path / "cache").exists()
