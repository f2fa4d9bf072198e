"""Datasets as lorafit reads them: files parsed and cleaned, the label space, the splits.
(Over 400 lines: every step that shapes rows into splits -- parsing, cleaning, carving, the
out-of-scope settings -- stays in one place, in the order `load` runs them.)

`load` turns `data.name` (a built-in name, a file or folder, or `hf:<hub id>`) into a `Dataset`:
`sources` says where the files are (and checks them); here they are parsed with a line number for
every malformed line, rows without a usable text or label are dropped (and counted), labels are
ordered into the class list, and missing validation/test splits are carved from train, stratified
and seeded, with the source rows of every split recorded. Turning texts into batches is `batching`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import random
import re
from collections import Counter
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import numpy as np
import pandas as pd

from . import sources
from .config import DataConfig
from .errors import UserError
from .sources import SPLITS

__all__ = ["Split", "Dataset", "load", "read_split", "read_table", "carve", "draw_shots", "label_counts", "OUT_OF_SCOPE"]

#: The label out-of-scope test examples get under the open-intent protocol (data.known_intents).
OUT_OF_SCOPE = "out_of_scope"

log = logging.getLogger(__name__)

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".tsv": "tsv"}


@dataclass
class Split:
    texts: list[str]
    labels: list[str]
    #: Row numbers in the source file, so every split can be rebuilt exactly.
    rows: list[int]

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, index: list[int]) -> Split:
        """The examples at `index`, in that order."""
        return Split([self.texts[i] for i in index], [self.labels[i] for i in index], [self.rows[i] for i in index])


@dataclass
class Dataset:
    splits: dict[str, Split]
    label_names: list[str]
    #: How each split was made: "file" or "carved from train" (with the seed).
    provenance: dict[str, str]
    source: str
    dropped: dict[str, int]
    #: The label of out-of-scope examples in validation/test (data.oos_label, or OUT_OF_SCOPE for the
    #: open-intent protocol's unknown classes); None: every example is in scope.
    oos_label: str | None = None
    #: The open-intent protocol's draw: the known classes, and the unknown ones whose test examples are OOS.
    open_intent: dict | None = None
    #: data.augment's record (lorafit.augment): the augmented examples follow the original ones in train,
    #: `source_rows` gives each one's source row. None: no augmentation.
    augmentation: dict | None = None

    def label_ids(self, split: str) -> list[int]:
        """Class index of every example of `split`; -1 for an out-of-scope one."""
        index = {name: i for i, name in enumerate(self.label_names)}
        return [-1 if label == self.oos_label else index[label] for label in self.splits[split].labels]

    def splits_record(self) -> dict:
        """What splits.json holds: the source rows of every split (and the OOS setting and the augmentation, when there are)."""
        record = {
            "source": self.source,
            "provenance": self.provenance,
            "dropped_rows": self.dropped,
            **{name: split.rows for name, split in self.splits.items()},
        }
        if self.oos_label is not None:
            record["oos"] = {"label": self.oos_label, "examples": {n: s.labels.count(self.oos_label) for n, s in self.splits.items()}}
        if self.open_intent is not None:
            record["open_intent"] = self.open_intent
        if self.augmentation is not None:  # train's own rows stay the source file's; the augmented ones are listed apart
            train = self.splits["train"].rows
            record["train"] = train[:len(train) - len(self.augmentation["source_rows"])]
            record["augmented"] = self.augmentation
        return record


# -- reading tables -----------------------------------------------------------------------------

def read_table(path: Path) -> pd.DataFrame:
    """A CSV/TSV/JSONL/Parquet file -> a DataFrame; anything unreadable is a one-line UserError.

    CSV, TSV and JSONL are parsed here rather than by pandas, so every malformed line is reported
    with its line number instead of being guessed around (pandas takes a header one field short
    as an index column, and silently drops lone surrogates from JSON).
    """
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise UserError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(sorted(FORMATS))}")
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    if kind == "parquet":
        frame = _read_parquet(path)
    else:
        text = _read_utf8(path)
        frame = _parse_jsonl(path, text) if kind == "jsonl" else _parse_delimited(path, text, "," if kind == "csv" else "\t")
    frame.columns = [str(c) for c in frame.columns]
    return frame


def _read_parquet(path: Path) -> pd.DataFrame:
    """Every value as pyarrow gives it in Python: no int column with a null turned float (which
    would round labels above 2**53), no pandas metadata needed. pandas' saved index is dropped."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
        columns = [column.to_pylist() for column in table.columns]
    except Exception as e:  # noqa: BLE001 - pyarrow raises many kinds for a malformed file
        raise UserError(f"{path}: cannot read as parquet: {_brief(e)}") from None
    keep = [i for i, name in enumerate(table.column_names) if not re.fullmatch(r"__index_level_\d+__", name)]
    frame = pd.DataFrame({i: columns[i] for i in keep}, dtype=object)
    frame.columns = [table.column_names[i] for i in keep]
    return frame


def _brief(error: Exception) -> str:
    return " ".join(str(error).split())[:200] or type(error).__name__


def _read_utf8(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        start = e.start + (3 if raw.startswith(b"\xef\xbb\xbf") else 0)
        line = raw.count(b"\n", 0, start) + 1
        utf16 = "; it looks like UTF-16" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise UserError(f"{path}: not valid UTF-8 (line {line}, byte {start}){utf16}; re-save the file as UTF-8") from None


def _parse_delimited(path: Path, text: str, sep: str) -> pd.DataFrame:
    """The first line names the columns; a row with more fields is an error, one with fewer is padded."""
    kind = "csv" if sep == "," else "tsv"
    # strict: a quote left open (which would swallow the rest of the file) is an error, not a field.
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=sep, strict=True)
    rows: list[list[str]] = []
    try:
        header = next((row for row in reader if row), None)  # blank lines before the header are skipped
        if header is None:
            raise UserError(f"{path}: the file is empty; the first line must name the columns (e.g. text{sep}label)")
        for row in reader:
            if not row:  # a blank line
                continue
            if len(row) > len(header):
                raise UserError(
                    f"{path}: line {reader.line_num} has {len(row)} fields but the header has {len(header)}; "
                    f"quote fields that contain {sep!r}"
                )
            rows.append(row + [""] * (len(header) - len(row)))
    except csv.Error as e:
        raise UserError(f"{path}: cannot read as {kind} (line {reader.line_num}): {_brief(e)}") from None
    return pd.DataFrame(rows, columns=header, dtype=object)


def _parse_jsonl(path: Path, text: str) -> pd.DataFrame:
    """One JSON object per line; blank lines are skipped."""
    records = []
    # Split at "\n" only: JSON strings may hold U+2028 and friends, which str.splitlines breaks at.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError) as e:  # JSONDecodeError, or an integer too long to convert
            raise UserError(f"{path}: line {number} is not valid JSON: {_brief(e)}") from None
        if not isinstance(record, dict):
            raise UserError(
                f"{path}: line {number} is a JSON {type(record).__name__}, not an object; "
                "write one object per line, e.g. {\"text\": \"...\", \"label\": \"...\"}"
            )
        records.append(record)
    # dtype=object keeps every value as parsed: no int column turned float by a missing value.
    return pd.DataFrame(records, dtype=object) if records else pd.DataFrame()


def _column(frame: pd.DataFrame, column: str, what: str, path: str) -> list:
    columns = list(frame.columns)
    if column not in columns:
        raise UserError(
            f"{path}: no {what} column {_show(column)!r}; columns are: {_show_list(columns) or '(none)'} "
            f"(set data.{what}_column)"
        )
    if columns.count(column) > 1:
        raise UserError(f"{path}: {columns.count(column)} columns are named {_show(column)!r}; rename all but one")
    return frame[column].tolist()


def _show(value: str, limit: int = 60) -> str:
    """A user value, cut short enough to quote in a one-line message."""
    return value if len(value) <= limit else value[: limit - 1] + "\u2026"


def _show_list(values: list[str], limit: int = 20) -> str:
    shown = ", ".join(_show(v) for v in values[:limit])
    return shown + (f" and {len(values) - limit} more" if len(values) > limit else "")


# -- cleaning: the rows a split keeps -----------------------------------------------------------

def _is_missing(value: object) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def _valid_unicode(text: str) -> bool:
    """False for lone surrogates (JSON's \\ud800), which the tokenizer and json writers reject."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _as_text(value: object) -> str | None:
    if isinstance(value, str) and value.strip() and _valid_unicode(value):
        return value
    return None


def _as_label(value: object) -> str | None:
    """Labels are strings; integers (and integral floats) become their decimal digits."""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value)).lower()
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(value):
            return None
        return str(int(value)) if float(value).is_integer() else str(float(value))
    if isinstance(value, str) and _valid_unicode(value):
        return value.strip() or None
    return None


def _drop_reason(value: object, what: str) -> str:
    """Why `_as_text`/`_as_label` refused `value`, for the warning about dropped rows."""
    if _is_missing(value) or (isinstance(value, str) and not value.strip()):
        return "with an empty text or label"
    if isinstance(value, str):
        return f"with a {what} that is not valid Unicode (a lone surrogate)"
    if isinstance(value, (float, np.floating)):
        return f"with the {what} {float(value)}"
    return f"with a {what} of type {type(value).__name__}"


def read_split(path: Path, text_column: str, label_column: str) -> tuple[Split, int]:
    """One split file, cleaned: (its usable rows, how many rows were dropped); a warning says why."""
    frame = read_table(path)
    texts = _column(frame, text_column, "text", str(path))
    labels = _column(frame, label_column, "label", str(path))
    if not texts:
        raise UserError(f"{path}: no data rows, only the column names")
    keep_texts, keep_labels, rows = [], [], []
    reasons: Counter[str] = Counter()
    for row, (text, label) in enumerate(zip(texts, labels)):
        t, lab = _as_text(text), _as_label(label)
        if t is None or lab is None:
            reasons[_drop_reason(text, "text") if t is None else _drop_reason(label, "label")] += 1
            continue
        keep_texts.append(t)
        keep_labels.append(lab)
        rows.append(row)
    dropped = len(texts) - len(rows)
    if list(reasons) == ["with an empty text or label"]:
        why = "with an empty text or label"
    else:
        why = "(" + ", ".join(f"{n} {reason}" for reason, n in reasons.most_common()) + ")"
    if dropped:
        log.warning("%s: dropped %d rows %s", path, dropped, why)
    if not rows:
        if list(reasons) == ["with an empty text or label"]:
            raise UserError(f"{path}: no usable rows ({dropped} rows all had an empty text or label)")
        raise UserError(
            f"{path}: no usable rows ({dropped} rows: {why.strip('()')}); texts must be strings, "
            "labels strings or integers"
        )
    return Split(keep_texts, keep_labels, rows), dropped


def _split_files(folder: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for split in SPLITS:
        names = [split] + (["valid", "val", "dev"] if split == "validation" else [])
        for name in names:
            for suffix in FORMATS:
                if (folder / f"{name}{suffix}").is_file():
                    found.setdefault(split, folder / f"{name}{suffix}")
    if "train" not in found:
        raise UserError(f"{folder}: no train file (train.csv, train.jsonl or train.parquet)")
    return found


# -- splits -------------------------------------------------------------------------------------

def carve(split: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """Stratified, seeded split of `split` into (rest, carved): each class gives `fraction`."""
    rng = random.Random(seed)
    by_label: dict[str, list[int]] = {}
    for i, label in enumerate(split.labels):
        by_label.setdefault(label, []).append(i)
    carved: list[int] = []
    for label in sorted(by_label):
        members = by_label[label]
        rng.shuffle(members)
        if len(members) >= 2:
            carved.extend(members[: max(1, round(fraction * len(members)))])
    carved_set = set(carved)
    rest = [i for i in range(len(split)) if i not in carved_set]
    carved.sort()
    return split.subset(rest), split.subset(carved)


# -- the label space ----------------------------------------------------------------------------

def label_counts(labels: list[str]) -> dict[str, int]:
    return dict(Counter(labels))


def _label_order(labels: list[str]) -> list[str]:
    """Integer labels in numeric order (so class i is label "i"), anything else alphabetically."""
    unique = set(labels)
    if all(re.fullmatch(r"-?[0-9]+", label) for label in unique):
        # Decimal, not int: int() refuses more than 4300 digits. The string breaks ties ("07" vs "7").
        return sorted(unique, key=lambda label: (Decimal(label), label))
    return sorted(unique)


# -- loading ------------------------------------------------------------------------------------

def load(cfg: DataConfig, seed: int) -> tuple[Dataset, DataConfig]:
    """Read, clean and split the data; returns it with the config's columns filled in."""
    spec = sources.BUILTINS.get(cfg.name)
    text_column = cfg.text_column or (spec.text_column if spec else "text")
    label_column = cfg.label_column or (spec.label_column if spec else "label")
    resolved = cfg.model_copy(update={"text_column": text_column, "label_column": label_column})

    names: dict[str, tuple[str, ...]] = {}  # split -> class names of a file that stores class numbers
    if spec is not None:
        found = sources.fetch_builtin(spec)
        files = {split: file.path for split, file in found.items()}
        names = {split: file.spec.label_names for split, file in found.items() if file.spec.label_names}
        source = f"builtin:{spec.name}"
    elif cfg.name.startswith("hf:"):
        files = _split_files(sources.hub_folder(cfg.name[3:], label_column))
        source = cfg.name
    else:
        path = _expand(cfg.name)
        try:
            is_dir, is_file = path.is_dir(), path.is_file()
        except OSError as e:  # a name too long for the file system, say
            raise UserError(f"data.name {_show(cfg.name, limit=300)!r}: {e.strerror or e}") from None
        if is_dir:
            files = _split_files(path)
        elif is_file:
            files = {"train": path}
        else:
            raise UserError(
                f"data.name {_show(cfg.name, limit=300)!r} is not a built-in dataset ({', '.join(sources.BUILTINS)}), "
                "not an existing file or folder, and not hf:<hub id>"
            )
        source = str(path.resolve())

    splits: dict[str, Split] = {}
    dropped: dict[str, int] = {}
    for name, path in files.items():
        splits[name], dropped[name] = read_split(path, text_column, label_column)
        if name in names:
            splits[name].labels = [names[name][int(label)] for label in splits[name].labels]
    provenance = {name: "file" for name in splits}

    train = splits["train"]
    if cfg.train_limit is not None and cfg.train_limit < len(train):
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        train = train.subset(sorted(order[: cfg.train_limit]))
        provenance["train"] = f"first {cfg.train_limit} rows of a shuffle with seed {seed}"
    few_shot = cfg.shots_per_class is not None
    for name in ("test", "validation"):
        if name not in splits and not (few_shot and name == "validation"):
            carve_seed = seed + (1 if name == "test" else 0)
            train, splits[name] = carve(train, cfg.validation_fraction, carve_seed)
            provenance[name] = f"carved from train (stratified, fraction {cfg.validation_fraction}, seed {carve_seed})"
    splits["train"] = train

    oos_label, open_intent = None, None
    if cfg.oos_label is not None:
        splits["train"], oos_label = _set_oos_apart(splits, cfg.oos_label), cfg.oos_label
        train = splits["train"]
    if cfg.known_intents is not None:
        open_intent = _open_intent(splits, cfg, seed if cfg.known_intents_seed is None else cfg.known_intents_seed)
        oos_label = oos_label or OUT_OF_SCOPE
        train = splits["train"]

    if few_shot:
        train = _draw_shots(splits, provenance, cfg, seed if cfg.draw_seed is None else cfg.draw_seed)
    if cfg.train_on_validation:  # config.py refuses it with OOS data, whose validation must choose a threshold
        validation = splits["validation"]
        train = splits["train"] = Split(train.texts + validation.texts, train.labels + validation.labels,
                                        train.rows + validation.rows)
        provenance["train"] = (f"{provenance.get('train', 'file')}, then the {len(validation)} validation rows appended "
                               "(data.train_on_validation; their row numbers are validation's)")

    label_names = _label_order(train.labels)
    if len(label_names) < 2:
        raise UserError(f"training data has {len(label_names)} class ({_show_list(label_names)}); need at least 2")
    known = set(label_names)
    for name in ("validation", "test"):
        unseen = sorted(set(splits[name].labels) - known - {oos_label})
        if unseen:
            raise UserError(f"{name} split has labels never seen in training: {_show_list(unseen, limit=10)}")
    for name in SPLITS:
        if len(splits[name]) == 0:
            raise UserError(f"{name} split is empty; add data or lower data.validation_fraction")
    dataset = Dataset({n: splits[n] for n in SPLITS}, label_names, provenance, source, dropped, oos_label, open_intent)
    return dataset, resolved


def _set_oos_apart(splits: dict[str, Split], oos_label: str) -> Split:
    """Check that data.oos_label names a label of the data; return train without its OOS examples."""
    if not any(oos_label in split.labels for split in splits.values()):
        labels = sorted({label for split in splits.values() for label in split.labels})
        raise UserError(f"data.oos_label {_show(oos_label)!r} names no label of the data; labels: {_show_list(labels)}")
    train = splits["train"]
    return train.subset([i for i, label in enumerate(train.labels) if label != oos_label])


def _open_intent(splits: dict[str, Split], cfg: DataConfig, seed: int) -> dict:
    """The open-intent protocol (TEXTOIR): keep a seeded share of the training classes; the others leave
    train and validation, and their test examples become OOS (labelled OUT_OF_SCOPE, or data.oos_label)."""
    classes = _label_order(splits["train"].labels)
    n_known = round(cfg.known_intents * len(classes))
    if n_known < 2 or n_known >= len(classes):
        raise UserError(f"data.known_intents={cfg.known_intents} keeps {n_known} of {len(classes)} classes; "
                        "choose a share that keeps at least 2 and leaves at least 1 unknown")
    if OUT_OF_SCOPE in classes and cfg.oos_label is None:
        raise UserError(f"the data has a class named {OUT_OF_SCOPE!r}; name it data.oos_label or rename it")
    known = sorted(random.Random(seed).sample(classes, n_known))
    keep = set(known)
    oos = cfg.oos_label or OUT_OF_SCOPE
    for name in ("train", "validation"):
        if name not in splits:  # few-shot: validation is drawn later, from what train keeps
            continue
        split = splits[name]
        splits[name] = split.subset([i for i, label in enumerate(split.labels) if label in keep or
                                     (name == "validation" and label == cfg.oos_label)])
    test = splits["test"]
    test.labels = [label if label in keep else oos for label in test.labels]
    return {"known_intents": cfg.known_intents, "seed": seed, "known": known, "unknown": sorted(set(classes) - keep)}


def draw_shots(labels: list[str], shots: int, validation_shots: int, seed: int) -> tuple[list[int], list[int]]:
    """Few-shot draw: (train, validation) indices into `labels`, `shots` then up to `validation_shots`
    per class, from one seeded shuffle of each class's members (classes in sorted order), each list in
    source order. The same labels and seed always give the same draw, on any machine."""
    rng = random.Random(seed)
    by_label: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_label.setdefault(label, []).append(i)
    train: list[int] = []
    validation: list[int] = []
    for label in sorted(by_label):
        members = by_label[label]
        rng.shuffle(members)
        train.extend(members[:shots])
        validation.extend(members[shots:shots + validation_shots])
    return sorted(train), sorted(validation)


def _draw_shots(splits: dict[str, Split], provenance: dict[str, str], cfg: DataConfig, seed: int) -> Split:
    """data.shots_per_class: replace train and validation by a few-shot draw from train."""
    shots = cfg.shots_per_class
    assert shots is not None
    validation_shots = cfg.validation_shots or shots
    counts = label_counts(splits["train"].labels)
    short = sorted((n, label) for label, n in counts.items() if n < shots)
    if short and not cfg.shots_per_class_min_ok:
        shown = ", ".join(f"{_show(label)!r} ({n})" for n, label in short[:5]) + (f" and {len(short) - 5} more" if len(short) > 5 else "")
        raise UserError(f"data.shots_per_class={shots}: {len(short)} class(es) have fewer training examples: {shown}; "
                        f"lower data.shots_per_class to {short[0][0]} or set data.shots_per_class_min_ok=true")
    train_index, validation_index = draw_shots(splits["train"].labels, shots, validation_shots, seed)
    if not validation_index:
        raise UserError(f"data.shots_per_class={shots} uses every training example; nothing is left to draw "
                        "validation from: lower data.shots_per_class")
    source = splits["train"]
    splits["train"], splits["validation"] = source.subset(train_index), source.subset(validation_index)
    provenance["train"] = f"{shots} per class drawn from train (seed {seed})"
    provenance["validation"] = f"{validation_shots} per class drawn from the rest of train (seed {seed})"
    return splits["train"]


def _expand(name: str) -> Path:
    try:
        return Path(name).expanduser()
    except RuntimeError:  # "~user/..." for a user that does not exist: take the name literally
        return Path(name)

