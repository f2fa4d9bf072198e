"""Datasets: registry and loading, the label space, splits, tokenising and batching.

Where a built-in dataset's split files come from, in order:

1. the local mirror `$LORAFIT_DATA_DIR/<name>/`, when that folder exists: the user asked for it, so
   a file there that does not match the registry's sha256 (or is missing) is an error, never skipped;
2. the package itself (`lorafit/datasets/<name>/`), for datasets whose license allows shipping them
   (Banking77, CC-BY-4.0): the built-in name works offline with no set-up; a damaged file is an error;
3. the user cache (`$LORAFIT_CACHE_DIR`, default `~/.cache/lorafit`): a cached file that does not
   match is fetched again;
4. the canonical public source at a pinned commit or hub revision, checked before it enters the cache.

Every file is checked against the registry's sha256 every time it is read, wherever it comes from.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import random
import re
import tempfile
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import torch

from .config import DataConfig
from .errors import UserError

__all__ = [
    "RemoteFile",
    "BuiltinDataset",
    "BUILTINS",
    "Split",
    "Dataset",
    "load",
    "BuiltinFile",
    "PACKAGE_DATA",
    "fetch_builtin",
    "read_table",
    "length_grouped_batches",
    "sorted_batches",
    "split_by_tokens",
    "collate",
]

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".tsv": "tsv"}


@dataclass(frozen=True)
class RemoteFile:
    """One split file of a built-in dataset, pinned by its sha256."""

    #: Its canonical public address (a pinned commit or revision); None: not downloadable, only
    #: read from a mirror or the package.
    url: str | None
    sha256: str
    #: Its name in a dataset folder (mirror, package, cache); None: "<split>.csv".
    name: str | None = None
    #: The file stores class i as the integer i: these are the class names (hub datasets do this).
    label_names: tuple[str, ...] = ()

    def file_name(self, split: str) -> str:
        return self.name or f"{split}.csv"


@dataclass(frozen=True)
class BuiltinDataset:
    name: str
    text_column: str
    label_column: str
    #: split -> its canonical file, with its checksum.
    files: dict[str, RemoteFile] = field(default_factory=dict)
    #: split -> another form of the same split accepted in a mirror, by its own checksum (emotion:
    #: the CSV export with class names, next to the hub's Parquet files with class numbers).
    mirror_files: dict[str, RemoteFile] = field(default_factory=dict)
    #: Shipped inside the package (lorafit/datasets/<name>/, with its license), so it works offline.
    packaged: bool = False
    description: str = ""


#: Data files shipped inside the package, one folder per built-in dataset (its license included).
PACKAGE_DATA = Path(__file__).parent / "datasets"

_POLYAI = "https://raw.githubusercontent.com/PolyAI-LDN/task-specific-datasets/57ec275d8078af65b7731c2a98be812d844a6d6b/banking_data"
# dair-ai/emotion's "split" configuration on the Hugging Face hub at a pinned revision (the Parquet
# files the hub serves; their checksums are those of that revision).
_EMOTION = "https://huggingface.co/datasets/dair-ai/emotion/resolve/cab853a1dbdf4c42c2b3ef2173804746df8825fe/split"
_EMOTION_CLASSES = ("sadness", "joy", "love", "anger", "fear", "surprise")


def _parquet(url: str, split: str, sha256: str, label_names: tuple[str, ...]) -> RemoteFile:
    return RemoteFile(f"{url}/{split}-00000-of-00001.parquet", sha256, f"{split}.parquet", label_names)


BUILTINS: dict[str, BuiltinDataset] = {
    "banking77": BuiltinDataset(
        name="banking77",
        text_column="text",
        label_column="category",
        files={
            "train": RemoteFile(f"{_POLYAI}/train.csv", "b06e26ac675513959a63135f11b94ea7786ed02da65db93a5650d8838cbc664b"),
            "test": RemoteFile(f"{_POLYAI}/test.csv", "d12d6e3bc4c3103966ae786dc435913c0c563dfa328f5a3646d0e62cfeeb474d"),
        },
        packaged=True,
        description="77 online-banking intents (Casanueva et al., 2020); 10,003 train / 3,080 test; CC-BY-4.0",
    ),
    "emotion": BuiltinDataset(
        name="emotion",
        text_column="text",
        label_column="label",
        files={
            "train": _parquet(_EMOTION, "train", "10817f0f2ea42358bc62f69a09dfb8bd71701727df6d5a387bea742f3ea06417", _EMOTION_CLASSES),
            "validation": _parquet(_EMOTION, "validation", "c70f0e660b5ebd1ea9a37d2a851f516f08a6d6477cdfc11be204e22a2f1102fd", _EMOTION_CLASSES),
            "test": _parquet(_EMOTION, "test", "6f8407fa1ca9c310f55781f082ed73812f6551e8dda2c61973123a121869245b", _EMOTION_CLASSES),
        },
        mirror_files={
            "train": RemoteFile(None, "ad257c9a95262698b4e6ebcd5562d6837f46e98e9c55d1f54e8e986444108428"),
            "validation": RemoteFile(None, "d8996132954cc6051bd53c2975c4c665c3a4bf67e0b5736718a1dc032dffb7a2"),
            "test": RemoteFile(None, "c2deeffa20ac778f47522d645fcacbdffb689a560e71ec73600816b10703860c"),
        },
        description="6 emotions of English tweets (Saravia et al., 2018); 16,000 / 2,000 / 2,000; "
                    "license unclear (research and education), so never shipped",
    ),
    # Mirror-only (no canonical download of these CSVs): the checksums are those of the CSV
    # conversions of the published splits, documented in each mirror folder's README.
    "snips": BuiltinDataset(
        name="snips",
        text_column="text",
        label_column="label",
        files={
            "train": RemoteFile(None, "19cabe085b195f5868d83456d62ce873a416c5a82addc449307475a16e1aa610"),
            "validation": RemoteFile(None, "e315c53769d216dde6e75b7b15581ee6a776345aeb78a5761bc3fc87ed5f910f"),
            "test": RemoteFile(None, "bf22736254d8e630145a85f40e9316b532a6d124141de75f9d6194bda7354e7b"),
        },
        description="7 voice-assistant intents (Coucke et al., 2018; split of Goo et al., 2018); 13,084 / 700 / 700; CC0-1.0",
    ),
    "trec6": BuiltinDataset(
        name="trec6",
        text_column="text",
        label_column="label",
        files={
            "train": RemoteFile(None, "d4067e99836e44937ae18cddc1a40fe7f9a1819132273a5515fe6984fe564522"),
            "test": RemoteFile(None, "a4b5bfb49557601109fb0f96d36e0aad3cb886990257d3b8683bc2d8a2697d4f"),
        },
        description="6 coarse question types (Li & Roth, 2002); 5,452 train / 500 test; research use",
    ),
}


@dataclass
class Split:
    texts: list[str]
    labels: list[str]
    #: Row numbers in the source file, so every split can be rebuilt exactly.
    rows: list[int]

    def __len__(self) -> int:
        return len(self.texts)


@dataclass
class Dataset:
    splits: dict[str, Split]
    label_names: list[str]
    #: How each split was made: "file" or "carved from train" (with the seed).
    provenance: dict[str, str]
    source: str
    dropped: dict[str, int]

    def label_ids(self, split: str) -> list[int]:
        index = {name: i for i, name in enumerate(self.label_names)}
        return [index[label] for label in self.splits[split].labels]

    def splits_record(self) -> dict:
        """What splits.json holds: the source rows of every split."""
        return {
            "source": self.source,
            "provenance": self.provenance,
            "dropped_rows": self.dropped,
            **{name: split.rows for name, split in self.splits.items()},
        }


# -- locating built-in data ---------------------------------------------------------------------

def cache_dir() -> Path:
    return Path(os.environ.get("LORAFIT_CACHE_DIR", Path.home() / ".cache" / "lorafit"))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(remote: RemoteFile, dest: Path, timeout: float = 60.0) -> Path:
    """Fetch `remote` to `dest` atomically; a checksum mismatch leaves nothing behind."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(remote.url, timeout=timeout) as response:
            for block in iter(lambda: response.read(1 << 20), b""):
                out.write(block)
        actual = sha256_of(tmp)
        if actual != remote.sha256:
            raise UserError(f"download of {remote.url} is corrupt: sha256 {actual}, expected {remote.sha256}")
        os.replace(tmp, dest)
        return dest
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise UserError(
            f"cannot download {remote.url} ({getattr(e, 'reason', e)}); offline? put the files in "
            f"$LORAFIT_DATA_DIR/<dataset>/ (train.csv, test.csv) and set LORAFIT_DATA_DIR"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)


@dataclass(frozen=True)
class BuiltinFile:
    """A split file of a built-in dataset, found and checked: where it is and what the registry says of it."""

    path: Path
    spec: RemoteFile


def fetch_builtin(spec: BuiltinDataset) -> dict[str, BuiltinFile]:
    """split -> its file, checked against the registry's sha256: mirror, else package, else cache,
    else download (see the module docstring)."""
    mirror = os.environ.get("LORAFIT_DATA_DIR")
    if mirror and (Path(mirror) / spec.name).is_dir():
        return _from_mirror(spec, Path(mirror) / spec.name)
    if spec.packaged:
        return {split: _checked(PACKAGE_DATA / spec.name / remote.file_name(split), remote,
                                "the copy shipped with lorafit is damaged; reinstall lorafit")
                for split, remote in spec.files.items()}
    if any(remote.url is None for remote in spec.files.values()):
        names = ", ".join(remote.file_name(split) for split, remote in spec.files.items())
        raise UserError(
            f"the built-in dataset {spec.name!r} has no public download; put its files ({names}) in "
            f"$LORAFIT_DATA_DIR/{spec.name}/ and set LORAFIT_DATA_DIR"
        )
    folder = cache_dir() / "datasets" / spec.name
    found: dict[str, BuiltinFile] = {}
    for split, remote in spec.files.items():
        target = folder / remote.file_name(split)
        damaged = ""
        if target.is_file():
            actual = sha256_of(target)
            if actual == remote.sha256:
                found[split] = BuiltinFile(target, remote)
                continue
            damaged = f"{target} does not match the sha256 in lorafit's registry ({actual}, expected {remote.sha256}); "
            log.warning("%sdownloading it again", damaged)
        log.info("downloading %s %s from %s", spec.name, split, remote.url)
        try:
            found[split] = BuiltinFile(download(remote, target), remote)
        except UserError as e:
            raise UserError(f"{damaged}{e}") from None
    return found


def _from_mirror(spec: BuiltinDataset, folder: Path) -> dict[str, BuiltinFile]:
    """Every split file of `spec` in the mirror folder, in its canonical or its accepted mirror form."""
    found: dict[str, BuiltinFile] = {}
    for split, remote in spec.files.items():
        forms = [remote] + ([spec.mirror_files[split]] if split in spec.mirror_files else [])
        present = [form for form in forms if (folder / form.file_name(split)).is_file()]
        if not present:
            names = " or ".join(form.file_name(split) for form in forms)
            raise UserError(
                f"$LORAFIT_DATA_DIR/{spec.name} ({folder}) has no {split} file ({names}) for the built-in "
                f"dataset {spec.name!r}; add it, or unset LORAFIT_DATA_DIR"
            )
        form = present[0]
        found[split] = _checked(folder / form.file_name(split), form,
                                "restore the original file, or unset LORAFIT_DATA_DIR to use another source")
    return found


def _checked(path: Path, remote: RemoteFile, fix: str) -> BuiltinFile:
    """`path` if its sha256 is the registry's, else one line saying what differs and `fix`."""
    try:
        actual = sha256_of(path)
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e.strerror or e}; {fix}") from None
    if actual != remote.sha256:
        raise UserError(f"{path} does not match the sha256 in lorafit's registry ({actual}, expected {remote.sha256}); {fix}")
    return BuiltinFile(path, remote)


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


def _read_split(path: Path, text_column: str, label_column: str) -> tuple[Split, int]:
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
    return _subset(split, rest), _subset(split, carved)


def _subset(split: Split, index: list[int]) -> Split:
    return Split([split.texts[i] for i in index], [split.labels[i] for i in index], [split.rows[i] for i in index])


def _label_order(labels: list[str]) -> list[str]:
    """Integer labels in numeric order (so class i is label "i"), anything else alphabetically."""
    unique = set(labels)
    if all(re.fullmatch(r"-?[0-9]+", label) for label in unique):
        # Decimal, not int: int() refuses more than 4300 digits. The string breaks ties ("07" vs "7").
        return sorted(unique, key=lambda label: (Decimal(label), label))
    return sorted(unique)


def load(cfg: DataConfig, seed: int) -> tuple[Dataset, DataConfig]:
    """Read, clean and split the data; returns it with the config's columns filled in."""
    spec = BUILTINS.get(cfg.name)
    text_column = cfg.text_column or (spec.text_column if spec else "text")
    label_column = cfg.label_column or (spec.label_column if spec else "label")
    resolved = cfg.model_copy(update={"text_column": text_column, "label_column": label_column})

    names: dict[str, tuple[str, ...]] = {}  # split -> class names of a file that stores class numbers
    if spec is not None:
        found = fetch_builtin(spec)
        files = {split: file.path for split, file in found.items()}
        names = {split: file.spec.label_names for split, file in found.items() if file.spec.label_names}
        source = f"builtin:{spec.name}"
    elif cfg.name.startswith("hf:"):
        files = _hub_files(cfg.name[3:], text_column, label_column)
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
                f"data.name {_show(cfg.name, limit=300)!r} is not a built-in dataset ({', '.join(BUILTINS)}), "
                "not an existing file or folder, and not hf:<hub id>"
            )
        source = str(path.resolve())

    splits: dict[str, Split] = {}
    dropped: dict[str, int] = {}
    for name, path in files.items():
        splits[name], dropped[name] = _read_split(path, text_column, label_column)
        if name in names:
            splits[name].labels = [names[name][int(label)] for label in splits[name].labels]
    provenance = {name: "file" for name in splits}

    train = splits["train"]
    if cfg.train_limit is not None and cfg.train_limit < len(train):
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        train = _subset(train, sorted(order[: cfg.train_limit]))
        provenance["train"] = f"first {cfg.train_limit} rows of a shuffle with seed {seed}"
    for name in ("test", "validation"):
        if name not in splits:
            carve_seed = seed + (1 if name == "test" else 0)
            train, splits[name] = carve(train, cfg.validation_fraction, carve_seed)
            provenance[name] = f"carved from train (stratified, fraction {cfg.validation_fraction}, seed {carve_seed})"
    splits["train"] = train

    label_names = _label_order(train.labels)
    if len(label_names) < 2:
        raise UserError(f"training data has {len(label_names)} class ({_show_list(label_names)}); need at least 2")
    known = set(label_names)
    for name in ("validation", "test"):
        unseen = sorted(set(splits[name].labels) - known)
        if unseen:
            raise UserError(f"{name} split has labels never seen in training: {_show_list(unseen, limit=10)}")
    for name in SPLITS:
        if len(splits[name]) == 0:
            raise UserError(f"{name} split is empty; add data or lower data.validation_fraction")
    dataset = Dataset({n: splits[n] for n in SPLITS}, label_names, provenance, source, dropped)
    return dataset, resolved


def _expand(name: str) -> Path:
    try:
        return Path(name).expanduser()
    except RuntimeError:  # "~user/..." for a user that does not exist: take the name literally
        return Path(name)


def _hub_files(hub_id: str, text_column: str, label_column: str) -> dict[str, Path]:
    """Materialise a hub dataset's splits as Parquet in the cache, then read it like a folder."""
    folder = cache_dir() / "hub" / hub_id.replace("/", "__")
    if not (folder / "train.parquet").is_file():
        try:
            import datasets

            ds = datasets.load_dataset(hub_id)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"cannot load hub dataset {hub_id!r}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        folder.mkdir(parents=True, exist_ok=True)
        aliases = {"valid": "validation", "val": "validation", "dev": "validation"}
        for split_name, split in ds.items():
            name = aliases.get(split_name, split_name)
            if name not in SPLITS:
                continue
            frame = split.to_pandas()
            feature = split.features.get(label_column)
            if feature is not None and hasattr(feature, "names"):
                frame[label_column] = [feature.names[i] for i in frame[label_column]]
            frame.to_parquet(folder / f".{name}.part", index=False)
            os.replace(folder / f".{name}.part", folder / f"{name}.parquet")
    return _split_files(folder)


# -- tokenising and batching --------------------------------------------------------------------

def tokenize(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    return tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]


def length_grouped_batches(lengths: list[int], batch_size: int, rng: random.Random, group: int = 50) -> list[list[int]]:
    """Shuffled batches of similar-length examples, so padding wastes almost nothing.

    Shuffle, cut into megabatches of `group` batches, sort each by length, cut into batches,
    shuffle the batch order: random enough for SGD, with ~1.0 padded tokens per real token.
    """
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches: list[list[int]] = []
    span = batch_size * group
    for start in range(0, len(order), span):
        chunk = sorted(order[start : start + span], key=lambda i: lengths[i])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def sorted_batches(lengths: list[int], batch_size: int, max_tokens: int | None = None) -> list[list[int]]:
    """Evaluation order: by length, so no batch pads much; at most `max_tokens` padded tokens each."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    cut = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return [piece for batch in cut for piece in split_by_tokens(batch, lengths, max_tokens)]


def split_by_tokens(batch: list[int], lengths: list[int], max_tokens: int | None) -> list[list[int]]:
    """`batch` cut, in order, into pieces of at most `max_tokens` padded tokens (rows x longest row).

    A row longer than the budget is a piece of its own; None keeps the batch whole. Activation
    memory grows with padded tokens, so this bounds it; the training loop sums the pieces'
    gradients, which is the whole batch's gradient.
    """
    if max_tokens is None:
        return [batch]
    pieces: list[list[int]] = []
    piece: list[int] = []
    longest = 0
    for i in batch:
        if piece and (len(piece) + 1) * max(longest, lengths[i]) > max_tokens:
            pieces.append(piece)
            piece, longest = [], 0
        piece.append(i)
        longest = max(longest, lengths[i])
    if piece:
        pieces.append(piece)
    return pieces


def collate(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to the longest sequence in the batch -> (input_ids, attention_mask), both (B, T)."""
    longest = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, : len(seq)] = 1
    return input_ids, attention_mask


def iterate(token_ids: list[list[int]], batches: list[list[int]], pad_id: int) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
    for batch in batches:
        input_ids, attention_mask = collate([token_ids[i] for i in batch], pad_id)
        yield batch, input_ids, attention_mask


def label_counts(labels: list[str]) -> dict[str, int]:
    return dict(Counter(labels))
