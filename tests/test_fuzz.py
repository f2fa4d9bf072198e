"""Fuzzing where user input enters lorafit: data files (CSV, TSV, JSONL, Parquet) and config overrides.

Whatever the input, there are two acceptable outcomes: a dataset that makes sense (every text a
non-empty string, labels consistent, and -- where the file is well-formed -- exactly the rows the
file holds), or a `UserError` whose message is one line. Never another exception, a hang, or
silently wrong rows.

`LORAFIT_FUZZ_EXAMPLES` sets the examples per test (default 200); `LORAFIT_FUZZ_DEADLINE_MS` the
deadline per example (default 10000: examples take milliseconds, but a process at low priority on a
busy machine can wait seconds for a CPU). A hang is caught by CPU time, which waiting does not
use: an example that burns 30 CPU seconds fails. A long run:

    LORAFIT_FUZZ_EXAMPLES=3000 python -m pytest -q tests/test_fuzz.py --hypothesis-show-statistics
"""

from __future__ import annotations

import csv
import datetime as dt
import decimal
import io
import json
import logging
import math
import os
import signal
import tempfile
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

from lorafit import data
from lorafit.cli import main
from lorafit.config import Config, DataConfig, dump, load_config, validate
from lorafit.errors import UserError

EXAMPLES = int(os.environ.get("LORAFIT_FUZZ_EXAMPLES", "200"))
DEADLINE_MS = int(os.environ.get("LORAFIT_FUZZ_DEADLINE_MS", "10000"))
HANG_CPU_SECONDS = 30

fuzz = settings(
    max_examples=EXAMPLES,
    deadline=DEADLINE_MS,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture,
                           HealthCheck.large_base_example],
)


# -- the two acceptable outcomes ----------------------------------------------------------------

class Hang(BaseException):
    """Raised by the timer; a BaseException, so no `except Exception` in lorafit can swallow it."""


@contextmanager
def no_hang(cpu_seconds: float = HANG_CPU_SECONDS):
    """Fail an example that spins: a profiling timer counts this process's CPU time, not the wall
    clock, so waiting for a CPU on a busy machine does not count."""
    def alarm(signum, frame):
        raise Hang(f"no result after {cpu_seconds} CPU seconds")

    previous = signal.signal(signal.SIGPROF, alarm)
    signal.setitimer(signal.ITIMER_PROF, cpu_seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, previous)


def assert_one_line(error: UserError) -> str:
    message = str(error)
    assert message and message.splitlines() == [message], f"not one line: {message!r}"
    return message


def load_or_refuse(path: Path, **cfg) -> data.Dataset | None:
    """`data.load` on a file or folder: a sound dataset, or None after a one-line UserError."""
    with no_hang():
        try:
            dataset, _ = data.load(DataConfig(name=str(path), **cfg), seed=0)
        except UserError as e:
            note(f"UserError: {assert_one_line(e)}")
            event("refused with a UserError")
            return None
    check_dataset(dataset)
    event("loaded")
    return dataset


def check_dataset(dataset: data.Dataset) -> None:
    names = dataset.label_names
    assert list(dataset.splits) == ["train", "validation", "test"]
    assert len(names) >= 2 and len(set(names)) == len(names)
    assert set(dataset.splits["train"].labels) == set(names)
    index = {name: i for i, name in enumerate(names)}
    for split_name, split in dataset.splits.items():
        assert len(split) > 0
        assert len(split.texts) == len(split.labels) == len(split.rows)
        for text in split.texts:
            assert isinstance(text, str) and text.strip(), repr(text)
            text.encode("utf-8")  # the tokenizer and the JSON writers need valid Unicode
        for label in split.labels:
            assert isinstance(label, str) and label and label == label.strip(), repr(label)
            label.encode("utf-8")
            assert label in index
        assert split.rows == sorted(set(split.rows))
        assert dataset.label_ids(split_name) == [index[label] for label in split.labels]


def check_rows(dataset: data.Dataset | None, expected: dict[int, tuple[str, str]]) -> None:
    """For a well-formed single file: the splits partition exactly its usable rows, unchanged."""
    labels = Counter(label for _, label in expected.values())
    if dataset is None:
        # Refusing is right only when the usable rows cannot make three non-empty splits.
        assert len(labels) < 2 or max(labels.values()) < 3, f"a well-formed file was refused: {len(expected)} usable rows"
        return
    seen: dict[int, tuple[str, str]] = {}
    for split in dataset.splits.values():
        for text, label, row in zip(split.texts, split.labels, split.rows):
            assert row not in seen, f"row {row} is in two splits"
            seen[row] = (text, label)
    assert seen == expected


@contextmanager
def scratch():
    with tempfile.TemporaryDirectory(prefix="lorafit-fuzz-") as folder:
        yield Path(folder)


# -- what the contract says a value becomes -----------------------------------------------------

def expected_text(value) -> str | None:
    if isinstance(value, str) and value.strip() and _encodable(value):
        return value
    return None


def expected_label(value) -> str | None:
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(value):
            return None
        return str(int(value)) if float(value).is_integer() else repr(float(value))
    if isinstance(value, str) and _encodable(value):
        return value.strip() or None
    return None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def usable(rows: list[tuple[object, object]]) -> dict[int, tuple[str, str]]:
    out = {}
    for i, (text, label) in enumerate(rows):
        t, lab = expected_text(text), expected_label(label)
        if t is not None and lab is not None:
            out[i] = (t, lab)
    return out


# -- strategies ---------------------------------------------------------------------------------

# Characters that break naive parsers: separators, quotes, line breaks of every kind, NUL, BOM.
NASTY = [",", "\t", '"', "'", "\n", "\r", "\x00", " ", "\u2028", "\u0085", "\ufeff", "\\", "{", "}", "é", "猫", "🙂"]
cell_text = st.text(alphabet=st.one_of(st.sampled_from(NASTY), st.characters(codec="utf-8")), max_size=12)
# Texts: as often plain words as anything at all.
text_value = st.one_of(cell_text, st.text(alphabet="abc xyz", min_size=1, max_size=10))
# Labels mostly come from a small pool, so classes repeat and many files load; a few are anything.
LABEL_POOL = ["a", "b", "a", "b", "c", " a ", "1", "01", "-1", "", "  ", "true", "1.0", "B"]
label_text = st.one_of(st.sampled_from(LABEL_POOL), st.sampled_from(LABEL_POOL), st.sampled_from(LABEL_POOL), cell_text)


@st.composite
def table_rows(draw, label_values=label_text, text_values=text_value, min_rows=0, max_rows=40):
    # Few rows sometimes (too few to split is a case too), more rows mostly.
    few, many = st.integers(min_rows, min(5, max_rows)), st.integers(max(min_rows, max_rows // 3), max_rows)
    n = draw(st.one_of(few, many, many, many))
    return [(draw(text_values), draw(cycling(i, label_values))) for i in range(n)]


def cycling(i: int, label_values=label_text) -> st.SearchStrategy:
    """Mostly "a", "b", "c" in turn (Hypothesis likes to repeat one value, which makes one class),
    else any label."""
    return st.one_of(st.just("abc"[i % 3]), label_values)


def one_in(n: int) -> st.SearchStrategy[bool]:
    """True about once in n draws (Hypothesis favours small integers, so `integers(0, n-1) == 0` would
    come up far more often)."""
    return st.sampled_from([False] * (n - 1) + [True])


ENCODINGS = ["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "latin-1", "cp1252"]


def encode_maybe_corrupt(draw, text: str) -> tuple[bytes, str, bool]:
    """`text` in a drawn encoding (mostly UTF-8), its bytes corrupted one time in ten."""
    encoding = draw(st.sampled_from(["utf-8"] * 8 + ENCODINGS))
    raw = text.encode(encoding, errors="replace")
    damaged_bytes = draw(one_in(10))
    return (corrupt(draw, raw) if damaged_bytes else raw), encoding, damaged_bytes


def corrupt(draw, raw: bytes) -> bytes:
    """Flip, insert (NULs among them) or delete bytes, or cut the file short."""
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, len(raw)))
        kind = draw(st.sampled_from(["flip", "insert", "nul", "delete", "truncate"]))
        if kind == "flip" and pos < len(raw):
            raw = raw[:pos] + bytes([raw[pos] ^ draw(st.integers(1, 255))]) + raw[pos + 1:]
        elif kind == "insert":
            raw = raw[:pos] + draw(st.binary(min_size=1, max_size=8)) + raw[pos:]
        elif kind == "nul":
            raw = raw[:pos] + b"\x00" + raw[pos:]
        elif kind == "delete":
            raw = raw[:pos] + raw[pos + draw(st.integers(1, 8)):]
        else:
            raw = raw[:pos]
    return raw


# -- any bytes at all ---------------------------------------------------------------------------

@fuzz
@given(raw=st.binary(max_size=2000), suffix=st.sampled_from([".csv", ".tsv", ".jsonl", ".json", ".parquet"]))
def test_random_bytes_are_loaded_or_refused(raw, suffix):
    with scratch() as folder:
        path = folder / f"train{suffix}"
        path.write_bytes(raw)
        load_or_refuse(path)


# -- CSV and TSV --------------------------------------------------------------------------------

@fuzz
@given(st.data())
def test_csv_and_tsv(draw_data):
    draw = draw_data.draw
    sep = draw(st.sampled_from([",", "\t"]))
    rows = draw(table_rows())
    # Columns: text and label somewhere among others; or a header that lacks or repeats one.
    header_kind = draw(st.sampled_from(["normal"] * 10 + ["no text", "no label", "two labels", "no header", "empty file"]))
    extra = draw(st.lists(st.text(alphabet="xyz_ ", min_size=1, max_size=4), max_size=2))
    columns = draw(st.permutations(["text", "label", *extra]))
    renamed = {"no text": {"text": "sentence"}, "no label": {"label": "intent"}}.get(header_kind, {})
    header = [renamed.get(c, c) for c in columns] + (["label"] if header_kind == "two labels" else [])
    body = []
    for text, label in rows:
        values = {"text": text, "label": label} | {name: draw(cell_text) for name in extra}
        body.append([values[c] for c in columns] + ([draw(cell_text)] if header_kind == "two labels" else []))
    # Damage: rows too long or too short, a field past the CSV reader's limit (131,072), or a large one.
    damage = draw(st.sampled_from(["none"] * 5 + ["long row", "short row", "huge field", "large field"]))
    if body and damage in ("long row", "short row"):
        i = draw(st.integers(0, len(body) - 1))
        body[i] = body[i] + ["surplus"] if damage == "long row" else body[i][:-1]
    if body and damage in ("huge field", "large field"):
        i, j = draw(st.integers(0, len(body) - 1)), draw(st.integers(0, len(header) - 1))
        body[i][j] = "x" * (140_000 if damage == "huge field" else 100_000)
    out = io.StringIO()
    quoting = draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL]))
    writer = csv.writer(out, delimiter=sep, lineterminator="\r\n" if quoting == csv.QUOTE_MINIMAL else draw(st.sampled_from(["\n", "\r\n"])), quoting=quoting)
    if header_kind != "no header":
        writer.writerow(header)
    writer.writerows(body)
    text = "" if header_kind == "empty file" else out.getvalue()
    raw, encoding, damaged_bytes = encode_maybe_corrupt(draw, text)
    note(f"header {header_kind}, damage {damage}, encoding {encoding}, corrupt bytes {damaged_bytes}")

    with scratch() as folder:
        path = folder / ("train.csv" if sep == "," else "train.tsv")
        path.write_bytes(raw)
        dataset = load_or_refuse(path)

    if damage == "long row" or damage == "huge field":
        assert dataset is None, "a row longer than the header, or a field past the limit, must be refused"
    well_formed = (header_kind in ("normal", "two labels") and damage in ("none", "short row", "large field")
                   and encoding in ("utf-8", "utf-8-sig") and not damaged_bytes)
    event(f"well-formed: {well_formed}")
    if well_formed and header_kind == "normal":
        pos = {c: header.index(c) for c in ("text", "label")}
        padded = [row + [""] * (len(header) - len(row)) for row in body]
        check_rows(dataset, usable([(row[pos["text"]], row[pos["label"]]) for row in padded]))
    if well_formed and header_kind == "two labels":
        assert dataset is None, "two columns named 'label' must be refused"


# -- JSON Lines ---------------------------------------------------------------------------------

json_scalar = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True), cell_text, label_text,
)
json_value = st.recursive(json_scalar, lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(cell_text, inner, max_size=3)), max_leaves=6)
# Tokens no Python value dumps to: numbers past every limit, lone surrogates, deep nesting.
RAW_TOKENS = ["1e400", "-1e400", "NaN", "Infinity", "-Infinity", "-0", "1.0", "1.5", "9" * 5000, "18446744073709551616",
              "[" * 3000 + "]" * 3000, '"\\ud800"', '"x\\udc80"', '"\\ud83d\\ude42"', "true", "null", '{"a": 1}', '"\\u0000"']


@st.composite
def jsonl_lines(draw):
    """A JSON Lines text: records of odd values, and in some files raw tokens, lines that are not
    objects or are cut short, blank lines, records without a label."""
    lines = []
    odd_lines = draw(one_in(3))
    kinds = ["record"] * 8 + (["raw", "not an object", "broken", "blank", "missing key"] if odd_lines else ["blank"])
    for i in range(draw(st.one_of(st.integers(0, 5), *[st.integers(10, 40)] * 3))):
        kind = draw(st.sampled_from(kinds))
        if kind in ("record", "missing key"):
            record = {}
            for key in draw(st.permutations(["text", "label", "extra"])):
                if kind == "missing key" and key == "label":
                    continue
                if key == "extra" and draw(st.booleans()):
                    continue
                odd = draw(one_in(4))
                value = draw(json_value if key == "extra" or odd else text_value if key == "text" else cycling(i))
                record[key] = value
            lines.append(json.dumps(record, ensure_ascii=draw(st.booleans())))
        elif kind == "raw":
            lines.append('{"text": %s, "label": %s}' % (draw(st.sampled_from(RAW_TOKENS + ['"hello"'])), draw(st.sampled_from(RAW_TOKENS + ['"a"', '"b"', "1", "2"]))))
        elif kind == "not an object":
            lines.append(json.dumps(draw(st.one_of(json_scalar, st.lists(json_scalar, max_size=3)))))
        elif kind == "broken":
            line = json.dumps({"text": draw(cell_text), "label": draw(label_text)})
            lines.append(line[: draw(st.integers(0, len(line) - 1))])
        else:
            lines.append(draw(st.sampled_from(["", " ", "\t", "\r"])))
    return "\n".join(lines) + draw(st.sampled_from(["", "\n", "\r\n"]))


def jsonl_expected(text: str) -> dict[int, tuple[str, str]] | None:
    """The usable rows of a JSON Lines text (Python's json as the reference parser); None when the
    file must be refused: a line that is not a JSON object, or a key that no record has."""
    records = []
    for line in text.split("\n"):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            return None
        if not isinstance(record, dict):
            return None
        records.append(record)
    # A key missing from some records is a missing value there; a key in none is no column.
    if not any("text" in r for r in records) or not any("label" in r for r in records):
        return None
    return usable([(r.get("text"), r.get("label")) for r in records])


@fuzz
@given(st.data())
def test_jsonl(draw_data):
    draw = draw_data.draw
    text = draw(jsonl_lines())
    raw, encoding, damaged_bytes = encode_maybe_corrupt(draw, text)
    note(f"encoding {encoding}, corrupt bytes {damaged_bytes}")
    with scratch() as folder:
        path = folder / draw(st.sampled_from(["train.jsonl", "train.json"]))
        path.write_bytes(raw)
        dataset = load_or_refuse(path)
    event(f"valid UTF-8, not corrupted: {encoding in ('utf-8', 'utf-8-sig') and not damaged_bytes}")
    if encoding in ("utf-8", "utf-8-sig") and not damaged_bytes:
        expected = jsonl_expected(text)
        if expected is None:
            assert dataset is None, "a line that is not a JSON object must be refused"
        else:
            check_rows(dataset, expected)


# -- Parquet ------------------------------------------------------------------------------------

def _arrow_columns():
    """(arrow type, strategy for one Python value of it) -- the odd ones included."""
    small_int = st.integers(-3, 3)
    return [
        (pa.string(), label_text), (pa.large_string(), cell_text), (pa.binary(), st.binary(max_size=4)),
        (pa.int8(), small_int), (pa.int64(), st.one_of(small_int, st.integers(-(2**63), 2**63 - 1))),
        (pa.uint64(), st.integers(0, 2**64 - 1)), (pa.float32(), st.floats(width=32)),
        (pa.float64(), st.one_of(st.floats(), st.sampled_from([0.0, 1.0, 2.0, 2.5]))), (pa.bool_(), st.booleans()),
        (pa.date32(), st.dates()), (pa.timestamp("ms"), st.datetimes(min_value=dt.datetime(1970, 1, 2))),
        (pa.duration("s"), st.timedeltas(min_value=dt.timedelta(0), max_value=dt.timedelta(days=9))),
        (pa.decimal128(9, 2), st.decimals(min_value=-1000, max_value=1000, places=2, allow_nan=False)),
        (pa.list_(pa.int64()), st.lists(small_int, max_size=2)),
        (pa.struct([("a", pa.int64())]), st.builds(lambda a: {"a": a}, small_int)),
        (pa.null(), st.none()),
    ]


ARROW = _arrow_columns()


# Mostly types and values a real text or label column has, so that many files load.
COMMON = {
    "text": [(pa.string(), text_value)],
    "label": [(pa.string(), st.sampled_from(LABEL_POOL)), (pa.int64(), st.integers(-1, 2)), (pa.bool_(), st.booleans()),
              (pa.float64(), st.sampled_from([0.0, 1.0, 2.5, float("nan"), float("inf")]))],
}


@st.composite
def arrow_column(draw, n: int, role: str = "text"):
    if not draw(one_in(4)):
        arrow_type, values_of = draw(st.sampled_from(COMMON[role]))
    else:
        kind = draw(st.integers(0, len(ARROW)))
        if kind == len(ARROW):  # dictionary-encoded strings, as pandas writes a category column
            values = [draw(st.one_of(st.none(), st.sampled_from(["a", "b", "c", " "]))) for _ in range(n)]
            return pa.array(values, pa.string()).dictionary_encode(), values
        arrow_type, values_of = ARROW[kind]
    values = [draw(st.one_of(st.none(), values_of)) if draw(one_in(6)) else draw(values_of) for _ in range(n)]
    return pa.array(values, arrow_type), values


@fuzz
@given(st.data())
def test_parquet(draw_data):
    draw = draw_data.draw
    n = draw(st.integers(0, 40))
    texts, text_values = draw(arrow_column(n, "text"))
    labels, label_values = draw(arrow_column(n, "label"))
    layout = draw(st.sampled_from(["normal"] * 5 + ["no label", "two texts", "extra column", "corrupt", "pandas"]))
    names, arrays = ["text", "label"], [texts, labels]
    if layout == "no label":
        names = ["text", "intent"]
    elif layout == "two texts":
        names, arrays = ["text", "label", "text"], [texts, labels, texts]
    elif layout == "extra column":
        names, arrays = ["label", "text", "notes"], [labels, texts, draw(arrow_column(n))[0]]
    note(f"layout {layout}; text {texts.type}; label {labels.type}")
    with scratch() as folder:
        path = folder / "train.parquet"
        table = pa.table(arrays, names=names)
        if layout == "pandas":
            # Through pandas: its index and metadata travel along (to_pandas keeps the values).
            frame = table.to_pandas(ignore_metadata=True)
            frame.index = [f"row{i}" for i in range(n)]  # saved as a column, __index_level_0__
            try:
                frame.to_parquet(path)
            except (pa.ArrowException, ValueError, TypeError, NotImplementedError):
                return  # pandas cannot write this column type back; nothing to read
            with no_hang():
                assert "__index_level_0__" not in data.read_table(path).columns
        else:
            pq.write_table(table, path)
        if layout == "corrupt":
            path.write_bytes(corrupt(draw, path.read_bytes()))
        dataset = load_or_refuse(path)
    if layout in ("normal", "extra column"):
        check_rows(dataset, usable(list(zip(text_values, label_values))))
    if layout in ("no label", "two texts"):
        assert dataset is None


# -- a folder of split files --------------------------------------------------------------------

@fuzz
@given(train=table_rows(label_values=st.sampled_from(["a", "b", "c", ""]), max_rows=30),
       test=table_rows(label_values=st.sampled_from(["a", "b", "c"] * 5 + ["d", ""]), min_rows=1, max_rows=8),
       validation=st.one_of(st.none(), table_rows(label_values=st.sampled_from(["a", "b"] * 5 + ["e"]), min_rows=1, max_rows=6)),
       suffixes=st.lists(st.sampled_from([".csv", ".tsv", ".jsonl", ".parquet"]), min_size=3, max_size=3),
       train_limit=st.one_of(st.none(), st.integers(1, 25)))
def test_folder_of_splits(train, test, validation, suffixes, train_limit):
    """train, test and (sometimes) dev files of different formats: a test file is used as it is."""
    with scratch() as folder:
        for (name, rows), suffix in zip([("train", train), ("test", test), ("dev", validation)], suffixes):
            if rows is None:
                continue
            frame = pd.DataFrame({"text": [t for t, _ in rows], "label": [lab for _, lab in rows]}, dtype=object)
            # "\r\n": with "\n" alone, Python's csv writer leaves a lone "\r" in a field unquoted.
            if suffix == ".csv":
                frame.to_csv(folder / f"{name}.csv", index=False, lineterminator="\r\n")
            elif suffix == ".tsv":
                frame.to_csv(folder / f"{name}.tsv", index=False, sep="\t", lineterminator="\r\n")
            elif suffix == ".jsonl":
                frame.to_json(folder / f"{name}.jsonl", orient="records", lines=True, force_ascii=False)
            else:
                frame.to_parquet(folder / f"{name}.parquet")
        dataset = load_or_refuse(folder, train_limit=train_limit)
    if dataset is not None:
        assert len(dataset.splits["train"]) <= (train_limit or len(train))
        test_usable = usable(test)
        assert dataset.splits["test"].rows == sorted(test_usable), "a test file is used as it is"
        assert set(dataset.splits["test"].labels) <= set(dataset.label_names)


# -- config: dotted overrides, YAML files, and `lorafit config show` ----------------------------

KNOWN_KEYS = [
    "seed", "data.name", "data.text_column", "data.label_column", "data.train_limit", "data.validation_fraction",
    "data.max_length", "model.name", "model.pooling", "model.head_dropout", "model.trust_pickle", "method.name",
    "method.rank", "method.alpha", "method.dropout", "method.targets", "method.layers", "train.epochs",
    "train.batch_size", "train.eval_batch_size", "train.lr", "train.head_lr", "train.warmup", "train.schedule",
    "train.weight_decay", "train.grad_accum", "train.max_grad_norm", "train.patience", "train.metric",
    "train.device", "train.precision", "train.threads", "train.checkpoint_every", "train.keep_checkpoints",
    "train.log_every", "train.progress", "train", "data", "method", "model",
]
YAML_JUNK = [
    "", " ", "~", "null", "yes", "on", "off", "[", "]", "{", "}", "{a: [", "[1, 2", "&a [*a]", "*undefined",
    "!!python/object/apply:os.system [ls]", "!!binary aGk=", "? x", "|\n  x", "---", "...", "%YAML 1.1", "- a",
    "2001-01-01", "0x1F", "0o17", "0b101", "1_000", "1e3", "1.0e+3", ".inf", "-.inf", ".nan", "nan", "inf", "1e400",
    "-0", "'quoted'", '"dq\\n"', "[attention, ffn]", "[all-linear]", "[re:.*query]", "[0, 1]", "[-1]", "{rank: 4}",
    "lora", "full", "cosine", "accuracy", "cpu", "bf16", "[" * 200 + "]" * 200, "[" * 1200, "9" * 5000,
    "0b" + "1" * 15000, "[&a [x, x], &b [*a, *a], &c [*b, *b], &d [*c, *c], &e [*d, *d], &f [*e, *e]]", "\x00", "\t",
]
override_value = st.one_of(
    st.sampled_from(YAML_JUNK), st.integers().map(str), st.integers(-(10**30), 10**30).map(str),
    st.floats().map(repr), st.text(max_size=20), st.text(alphabet="ab/.~", min_size=200, max_size=600), st.lists(st.sampled_from(["a", "1", "attention", ""]), max_size=3).map(lambda v: "[" + ", ".join(v) + "]"),
)
override_key = st.one_of(
    st.sampled_from(KNOWN_KEYS), st.sampled_from(KNOWN_KEYS).map(lambda k: k + "." + "x"),
    st.from_regex(r"[a-z_]{1,8}(\.[a-z_]{1,8}){0,3}", fullmatch=True), st.text(max_size=12),
)
override = st.one_of(st.tuples(override_key, override_value).map(lambda kv: f"{kv[0]}={kv[1]}"), st.text(max_size=15),
                     st.text(alphabet="ab/.~", min_size=200, max_size=600))  # without "=": a config file name
overrides = st.lists(override, max_size=6)


def check_config(cfg: Config) -> None:
    """A config that validated holds only finite numbers and round-trips through YAML."""
    def floats(tree):
        if isinstance(tree, dict):
            return [f for v in tree.values() for f in floats(v)]
        if isinstance(tree, list):
            return [f for v in tree for f in floats(v)]
        return [tree] if isinstance(tree, float) else []

    assert all(math.isfinite(f) for f in floats(cfg.model_dump()))
    assert validate(yaml.safe_load(dump(cfg))) == cfg


def config_or_refusal(load) -> None:
    """`load()` gives a config that survives the checks, or refuses with one UserError line."""
    with no_hang():
        try:
            cfg = load()
        except UserError as e:
            assert_one_line(e)
            event("refused with a UserError")
            return
    event("valid config")
    check_config(cfg)


@fuzz
@given(items=overrides)
def test_overrides_load_or_refuse(items):
    config_or_refusal(lambda: load_config(None, [i for i in items if "=" in i]))


@fuzz
@given(text=st.one_of(
    st.text(max_size=300),
    st.lists(st.tuples(st.sampled_from(KNOWN_KEYS), override_value), max_size=6).map(
        lambda kvs: "".join(f"{k.split('.')[0]}:\n  {k.split('.')[-1]}: {v}\n" if "." in k else f"{k}: {v}\n" for k, v in kvs)),
), encoding=st.sampled_from(["utf-8"] * 4 + ["utf-16", "latin-1"]))
def test_yaml_config_files_load_or_refuse(text, encoding):
    with scratch() as folder:
        path = folder / "config.yaml"
        path.write_bytes(text.encode(encoding, errors="replace"))
        config_or_refusal(lambda: load_config(path))


@fuzz
@given(items=overrides.map(lambda items: [i for i in items if not i.startswith("-")]))
def test_config_show_prints_a_config_or_one_error_line(items, capsys):
    """`lorafit config show [CONFIG] key=value ...` in-process: exit 0 and YAML, or exit 2 and one line."""
    capsys.readouterr()
    with no_hang():
        status = main(["config", "show", *items])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    event(f"exit status {status}")
    if status == 0:
        assert captured.err == ""
        check_config(validate(yaml.safe_load(captured.out)))
    else:
        assert status == 2
        assert captured.out == ""
        lines = captured.err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("lorafit: error: "), captured.err


@pytest.mark.parametrize("value", ["1e400", ".inf", "-.inf"])
@pytest.mark.parametrize("key", ["train.lr", "train.warmup", "method.alpha", "train.max_grad_norm"])
def test_infinite_numbers_are_refused(key, value):
    with pytest.raises(UserError, match=rf"finite number: {key} \(got -?inf\)|{key}.*(greater|finite)"):
        load_config(None, [f"{key}={value}"])


@pytest.mark.parametrize("override", ["train.checkpoint_every=0b" + "1" * 15000, "method.layers=[0, " + str(2**70) + "]",
                                      "train.epochs=" + str(2**64)])
def test_integers_past_64_bits_are_refused(override, capsys):
    """pydantic takes them; the YAML dump (int() of over 4300 digits) and torch would not."""
    with pytest.raises(UserError, match=r"too large \(the limit is 2\*\*63-1\)"):
        load_config(None, [override])
    assert main(["config", "show", override]) == 2


def test_seed_and_threads_have_bounds_torch_accepts():
    for bad in ("seed=-1", f"seed={2**32}", "train.threads=0", "train.threads=100000"):
        with pytest.raises(UserError, match=bad.split("=")[0]):
            load_config(None, [bad])
    assert load_config(None, [f"seed={2**32 - 1}", "train.threads=1024"]).seed == 2**32 - 1


def test_a_long_digit_label_sorts_without_int_conversion(tmp_path):
    """int() refuses strings of more than 4300 digits: label order must not need it."""
    path = tmp_path / "train.csv"
    rows = [f"t{i},{i % 2}" for i in range(30)] + [f"q{i},{'9' * 5000}" for i in range(3)]
    path.write_text("text,label\n" + "\n".join(rows) + "\n")
    dataset, _ = data.load(DataConfig(name=str(path)), seed=0)
    assert dataset.label_names == ["0", "1", "9" * 5000]


def test_header_one_field_short_is_refused_not_read_as_an_index(tmp_path):
    """pandas would silently take the first field of such a row as an index."""
    path = tmp_path / "train.csv"
    path.write_text("text,label\nfirst,a,extra\n" + "".join(f"t{i},{'ab'[i % 2]}\n" for i in range(20)))
    with pytest.raises(UserError, match=r"line 2 has 3 fields but the header has 2"):
        data.read_table(path)


def test_unterminated_quote_is_refused_with_its_line(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text('text,label\nok,a\n"never closed,b\nmore,a\n')
    with pytest.raises(UserError, match=r"cannot read as csv \(line \d\)"):
        data.read_table(path)


def test_wrong_encoding_names_the_line(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes("text,label\nok,a\ncafé,b\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"not valid UTF-8 \(line 3, byte 19\); re-save"):
        data.read_table(path)
    path.write_bytes("text,label\nok,a\n".encode("utf-16"))
    with pytest.raises(UserError, match=r"looks like UTF-16"):
        data.read_table(path)


def test_large_integer_labels_with_nulls_keep_every_digit(tmp_path):
    """pandas turns an int column with a null into floats, which round above 2**53."""
    big = 2**53 + 1
    texts = [f"t{i}" for i in range(20)]
    labels = [big, 2, None] * 6 + [big, 2]
    pq.write_table(pa.table({"text": texts, "label": pa.array(labels, pa.int64())}), tmp_path / "train.parquet")
    pd.DataFrame({"text": texts, "label": labels}, dtype=object).to_json(tmp_path / "train.jsonl", orient="records", lines=True)
    for name in ("train.parquet", "train.jsonl"):
        dataset, _ = data.load(DataConfig(name=str(tmp_path / name)), seed=0)
        assert dataset.label_names == ["2", str(big)]


def test_unsupported_value_types_are_named(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("lorafit"), "propagate", True)  # the CLI tests turn it off
    texts = [f"t{i}" for i in range(20)]
    pq.write_table(pa.table({"text": texts, "label": [dt.date(2020, 1, 1 + i % 2) for i in range(20)]}), tmp_path / "train.parquet")
    with pytest.raises(UserError, match=r"no usable rows \(20 rows: 20 with a label of type date\); texts must be strings"):
        data.load(DataConfig(name=str(tmp_path / "train.parquet")), seed=0)
    lines = [json.dumps({"text": t, "label": [1] if i == 0 else "ab"[i % 2]}) for i, t in enumerate(texts)]
    (tmp_path / "train.jsonl").write_text("\n".join(lines))
    data.load(DataConfig(name=str(tmp_path / "train.jsonl")), seed=0)
    assert "dropped 1 rows (1 with a label of type list)" in caplog.text


@pytest.mark.parametrize("name", ["~no-such-user-xyz/train.csv", "nul\x00byte.csv", "line\nbreak.csv", "\udcff.csv", "x" * 5000])
def test_odd_data_names_are_user_errors(name):
    with pytest.raises(UserError) as caught:
        data.load(DataConfig(name=name), seed=0)
    assert_one_line(caught.value)


@pytest.mark.parametrize("argv", [
    ["config", "show", "x" * 5000 + ".yaml"], ["train", "data.name=" + "d" * 5000, "--out", "/nonexistent/run"],
    ["config", "show", "model.name=" + "m" * 300], ["config", "show", "model.name=~no-such-user-xyz/m"],
    ["train", "--resume", "z" * 5000], ["predict", "r" * 5000, "hello"], ["eval", "e" * 5000],
])
def test_names_the_file_system_cannot_take_are_user_errors(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lorafit: error: ")
    assert "File name too long" in err or "longer than 255 bytes" in err or "names no user" in err


def test_user_error_messages_are_one_line():
    assert str(UserError("a\nb\r\nc\u2028d")) == "a\\nb\\r\\nc\\u2028d"


def test_decimal_labels_are_not_guessed():
    assert data._as_label(decimal.Decimal("1.5")) is None
