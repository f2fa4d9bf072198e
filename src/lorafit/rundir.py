"""What a run folder holds, and the reading and writing of every artifact in it.

A run folder is the hand-off between stages: `eval`, `predict`, `report`, `compare`, `export`,
`serve` and `push` take only its path. The file list below is the schema; each JSON file has a
record here that its writer builds (`RunDir.write_record`) and its readers get back
(`RunDir.summary()`, `.eval()`, `.predictions()`, `.splits()`, `.compute()`):

    config.yaml       the resolved config (plus the derived schedule)          RunDir.config()
    labels.json       the label space, in class-index order                     RunDir.labels()
    splits.json       which source rows went into train / validation / test     Splits
    compute.json      how the run computes (device, threads, token budget,
                      CPU kernels, the base model's hub id); reused on resume   Compute
    metrics.jsonl     one JSON object per logged step and per epoch             RunDir.metrics()
    eval.json         test metrics of the best checkpoint                       Eval (ClassScores, Confusion)
    predictions.json  per test example: target, predicted class index,
                      top-1 probability                                         Predictions
    ood.json          the temperature fitted on validation, and every out-of-scope
                      score's threshold with the rule that chose it (lorafit.posthoc)
    ood.safetensors   the fitted arrays the deciding out-of-scope score reads
                      (knn: training sentence vectors), when it reads any       lorafit.fitted
    teacher_logits.safetensors  distill.teacher's logits on the training texts, read by a resume   lorafit.distill
    summary.json      efficiency figures, best epoch, device, versions, and
                      the method's own figures (AdaLoRA's ranks)                Summary
    README.md         the model card (lorafit.modelcard)
    adapter/          peft-format adapter (adapter methods) -- or --
    model/            the fine-tuned encoder + head (full fine-tuning)
    checkpoints/      resume state while training (lorafit.checkpoint); removed when the run ends
    track.json        the experiment trackers' run ids, when track.sinks is set (lorafit.track)

Records are frozen dataclasses. `to_json()` gives the file's object exactly as written (same keys,
same order), so writing a record read from a file gives the same bytes. `from_json()` reads run
folders of older versions too: a key the file lacks reads as None and is remembered in `absent`
(so it is left out again on writing), and a key this version does not know is kept in `extra`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import Field, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml

from . import atomic
from .config import Config, dump, validate
from .errors import UserError

__all__ = ["RunDir", "Record", "Summary", "Compute", "Eval", "ClassScores", "Confusion", "Predictions", "Splits",
           "folder_bytes", "make_folder", "safe_name"]

# A name must stay one path component: no separator (either OS's), no NUL or control characters,
# and ':' is out because on Windows "C:x" is a drive-relative path.
_NOT_IN_NAMES = {"/": "a '/'", "\\": "a '\\'", ":": "a ':'", "\x00": "a NUL byte"}


def safe_name(name: str, what: str) -> str:
    """`name` unchanged if it is a plain file name that stays inside its folder; else a UserError.

    For every place that takes a NAME (an adapter name, an artifact) rather than a path: `..`,
    absolute paths and separators would let it escape the folder it is joined to.
    """
    if not isinstance(name, str) or not name.strip():
        raise UserError(f"{what} must be a non-empty name, got {name!r}")
    shown = repr(name) if len(name) <= 60 else repr(name[:57]) + "..."
    if name in (".", ".."):
        raise UserError(f"{what} {shown} is not allowed: it names a folder, not an entry in it")
    for char, described in _NOT_IN_NAMES.items():
        if char in name:
            raise UserError(f"{what} {shown} must be a plain name, not a path: it contains {described}")
    if not name.isprintable():
        raise UserError(f"{what} {shown} contains control characters; use letters, digits, '-', '_' or '.'")
    if len(name.encode("utf-8", "surrogatepass")) > 255:
        raise UserError(f"{what} {shown} is longer than 255 bytes, the file-name limit")
    return name


def make_folder(path: Path) -> Path:
    """An output folder (and its parents), or one line saying why it cannot be made."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserError(f"{path} exists and is not a folder; choose another --out") from None
    except OSError as e:
        raise UserError(f"cannot create folder {path}: {e.strerror or e}") from None
    return path


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# -- records: what the JSON files hold ------------------------------------------------------------

R = TypeVar("R", bound="Record")

_BOOKKEEPING = ("extra", "absent")


def _nested(record: type[Record], shape: str = "one") -> Any:
    """A field whose JSON value holds records: one, a list of them ("list"), or a dict of them ("dict")."""
    return field(metadata={"record": record, "shape": shape})


def _records(f: Field, value: Any) -> Any:
    """A field's JSON value with the records that `_nested` says it holds made into record objects."""
    record, shape = f.metadata.get("record"), f.metadata.get("shape")
    if record is not None and shape == "one" and isinstance(value, dict):
        return record.from_json(value)
    if record is not None and shape == "list" and isinstance(value, list):
        return [record.from_json(v) if isinstance(v, dict) else v for v in value]
    if record is not None and shape == "dict" and isinstance(value, dict):
        return {k: record.from_json(v) if isinstance(v, dict) else v for k, v in value.items()}
    return value


def _plain(value: Any) -> Any:
    """A record (or records in lists and dicts) as JSON values."""
    if isinstance(value, Record):
        return value.to_json()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


@dataclass(frozen=True, kw_only=True)
class Record:
    """One JSON object of the run folder. Fields in the file's key order; see the module docstring."""

    #: The run file this record is (None for records nested in another).
    FILE: ClassVar[str | None] = None

    extra: dict[str, Any] = field(default_factory=dict)
    """Keys after the fields: a method's own figures (summary.json) and keys this version does not know."""
    absent: frozenset[str] = field(default=frozenset(), repr=False, compare=False)
    """Fields the file did not have (an older run folder): they read as None and are not written back."""

    def __post_init__(self) -> None:
        shadowed = set(self.extra) & set(self._names())
        if shadowed:  # a programming error: the key has its own field
            raise ValueError(f"{type(self).__name__}.extra repeats the field(s) {sorted(shadowed)}")

    @classmethod
    def _names(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.name not in _BOOKKEEPING]

    def to_json(self) -> dict[str, Any]:
        """The file's object: the fields in order (those the file lacked left out), then `extra`."""
        out = {name: _plain(getattr(self, name)) for name in self._names() if name not in self.absent}
        return out | self.extra

    @classmethod
    def from_json(cls: type[R], data: dict[str, Any]) -> R:
        """The record of a file's object, of this version or an older one (module docstring)."""
        names = cls._names()
        values = {f.name: _records(f, data[f.name]) if f.name in data else None for f in fields(cls) if f.name in names}
        return cls(**values, extra={k: v for k, v in data.items() if k not in names},
                   absent=frozenset(name for name in names if name not in data))


@dataclass(frozen=True, kw_only=True)
class Compute(Record):
    """compute.json (and summary.json's `compute`): how the run computes, decided once at its start and
    reused by `--resume`, so a continuation computes as the start did."""

    FILE: ClassVar[str] = "compute.json"

    device: str
    threads: int
    processes: int
    max_batch_tokens: int | None  # padded tokens per forward pass; None: no budget
    autocast: str | None  # "bfloat16", "float16" or None (float32)
    cpu_kernels: dict[str, Any]  # the CPU fast-path decision and the CPU it was made on (hardware.cpu_info)
    base_model: dict[str, Any]  # {"name", "hub_id", "on_hub"}: the base as other machines know it
    batch_order: str | None  # training batches' order (batching.BATCH_ORDER); absent in older runs


@dataclass(frozen=True, kw_only=True)
class Summary(Record):
    """summary.json: what the finished run cost and achieved. `extra` holds the method's own figures
    (`Method.summary()`: AdaLoRA's initial, target, final and saved ranks), after the fields."""

    FILE: ClassVar[str] = "summary.json"

    method: str
    model: str
    trainable_params: int
    total_params: int
    trainable_percent: float
    adapter_bytes: int  # the artifact folder (adapter/ or model/) on disk
    train_seconds: float
    seconds_per_epoch: float
    train_examples_per_second: float
    peak_memory_mb: float  # rank 0's, under data parallelism
    allocator: str  # the malloc the process trained on: jemalloc, tcmalloc or system (lorafit/allocator.py)
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    best_validation: dict[str, float]  # {train.metric: its value at the best epoch}
    test_accuracy: float
    test_macro_f1: float
    train_label_counts: dict[str, int]
    steps: int  # optimiser steps
    device: str
    autocast: str | None
    threads: int
    processes: int  # data-parallel processes; examples/s counts them all
    cpu_fast_paths: dict[str, int]  # layers switched to each CPU fast path
    compute: Compute = _nested(Compute)
    skipped_steps: int  # fp16 steps the loss scaler skipped
    versions: dict[str, str]


@dataclass(frozen=True, kw_only=True)
class ClassScores(Record):
    """One class's test scores (eval.json's `per_class`)."""

    precision: float
    recall: float
    f1: float
    support: int


@dataclass(frozen=True, kw_only=True)
class Confusion(Record):
    """A (true, predicted) mistake and how often it was made (eval.json's `top_confusions`)."""

    true: str
    predicted: str
    count: int


@dataclass(frozen=True, kw_only=True)
class Eval(Record):
    """eval.json: the best epoch's metrics on a split (evaluate.classification_metrics plus the split's name)."""

    FILE: ClassVar[str] = "eval.json"

    split: str
    accuracy: float
    macro_f1: float
    weighted_f1: float
    loss: float
    examples: int
    per_class: dict[str, ClassScores] = _nested(ClassScores, "dict")
    labels: list[str]
    confusion: list[list[int]]  # [true][predicted] counts
    top_confusions: list[Confusion] = _nested(Confusion, "list")
    calibration: dict[str, Any] | None  # calibration.calibration_record on the split: ECE/NLL before and after T
    ood: dict[str, Any] | None  # {"score": the deciding one, "scores": {score: ood.oos_metrics}}: with OOS examples only


@dataclass(frozen=True, kw_only=True)
class Predictions(Record):
    """predictions.json: per example of the split, in split order; what paired tests between runs need."""

    FILE: ClassVar[str] = "predictions.json"

    split: str
    target: list[int]
    predicted: list[int]  # class index of the highest logit
    probability: list[float]  # its softmax probability, rounded to 6 decimals


@dataclass(frozen=True, kw_only=True)
class Splits(Record):
    """splits.json: where the data came from and the source rows of every split, so each can be rebuilt
    exactly and a resume can tell that the data changed. In the file the splits are top-level keys
    between `dropped_rows` and `seed`: every key that is not a field names a split, so `extra` stays empty."""

    FILE: ClassVar[str] = "splits.json"

    source: str
    provenance: dict[str, str]  # per split: "file" or how it was carved
    dropped_rows: dict[str, int]  # per split: rows dropped in cleaning
    rows: dict[str, Any]  # per split: its source row numbers
    seed: int
    content_sha256: dict[str, str]  # per split: a sha256 of its texts and labels

    def __post_init__(self) -> None:
        super().__post_init__()
        shadowed = set(self.rows) & {*self._names(), *_BOOKKEEPING}
        if shadowed:
            raise ValueError(f"Splits.rows has split names that are fields: {sorted(shadowed)}")

    def to_json(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in ("source", "provenance", "dropped_rows") if k not in self.absent}
        out |= self.rows
        out |= {k: getattr(self, k) for k in ("seed", "content_sha256") if k not in self.absent}
        return out | self.extra

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Splits:
        names = [n for n in cls._names() if n != "rows"]
        rows = {k: v for k, v in data.items() if k not in names}
        return super().from_json({k: v for k, v in data.items() if k in names} | {"rows": rows})


class RunDir:
    """Typed access to one run folder."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.path.exists()
        except OSError as e:  # a name too long for the file system, say: every later call would fail
            raise UserError(f"run folder {str(self.path)[:80]!r}: {e.strerror or e}") from None

    # -- creating -----------------------------------------------------------------------------
    def check_new(self, overwrite: bool) -> None:
        """Fail early (before any work) if the folder exists and overwriting was not asked for."""
        if self.path.exists() and not self.path.is_dir():  # first: iterdir() on a file raises
            raise UserError(f"{self.path} exists and is not a folder")
        if self.path.exists() and not overwrite and any(self.path.iterdir()):
            raise UserError(f"run folder {self.path} already exists; choose another --out or pass --overwrite")

    def create(self, overwrite: bool) -> None:
        self.check_new(overwrite)
        if self.path.exists():
            shutil.rmtree(self.path)
        try:
            self.path.mkdir(parents=True)
        except OSError as e:
            raise UserError(f"cannot create run folder {self.path}: {e.strerror}") from None

    # -- files --------------------------------------------------------------------------------
    def write_json(self, name: str, data: Any) -> None:
        atomic.write_text(self.path / name, json.dumps(data, indent=2, ensure_ascii=False) + "\n")

    def read_json(self, name: str) -> Any:
        path = self.path / safe_name(name, "run file")
        if not path.is_file():
            raise UserError(f"{self.path} is not a complete run folder: {name} is missing")
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise UserError(f"{path} is corrupt ({e}); the run folder was edited or only partly copied") from None

    # -- records ------------------------------------------------------------------------------
    def summary(self) -> Summary:
        return self._read(Summary)

    def eval(self) -> Eval:
        return self._read(Eval)

    def predictions(self) -> Predictions:
        return self._read(Predictions)

    def splits(self) -> Splits:
        return self._read(Splits)

    def compute(self) -> Compute:
        return self._read(Compute)

    def _read(self, record: type[R]) -> R:
        data = self.read_json(record.FILE)
        if not isinstance(data, dict):
            raise UserError(f"{self.path / record.FILE} is corrupt: it holds a {type(data).__name__}, not an object")
        return record.from_json(data)

    def write_record(self, record: Record) -> None:
        """Write a Summary, Eval, Predictions, Splits or Compute to its file (atomically)."""
        self.write_json(record.FILE, record.to_json())

    def append_metrics(self, record: dict) -> None:
        with open(self.path / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def metrics(self) -> list[dict]:
        path = self.path / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []

    def write_config(self, cfg: Config, derived: dict | None = None) -> None:
        text = dump(cfg)
        if derived:
            text += yaml.safe_dump({"derived": derived}, sort_keys=False)
        atomic.write_text(self.path / "config.yaml", text)

    def _raw_config(self) -> dict:
        path = self.path / "config.yaml"
        if not self.path.is_dir():
            raise UserError(f"run folder not found: {self.path}")
        if not path.is_file():
            raise UserError(f"{self.path} is not a run folder (no config.yaml)")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError, ValueError, RecursionError) as e:
            raise UserError(f"{path} is corrupt ({' '.join(str(e).split())[:200]}); the run folder was edited") from None
        if not isinstance(raw, dict):
            raise UserError(f"{path} is corrupt: it holds a {type(raw).__name__}, not a config mapping")
        return raw

    def config(self) -> Config:
        raw = self._raw_config()
        raw.pop("derived", None)
        return validate(raw)

    def derived(self) -> dict:
        """config.yaml's `derived` section: what training worked out from the config (the schedule, the
        teacher's fingerprint, ...); empty for a run that recorded none."""
        derived = self._raw_config().get("derived") or {}
        if not isinstance(derived, dict):
            raise UserError(f"{self.path / 'config.yaml'} is corrupt: its derived section is not a mapping")
        return derived

    def labels(self) -> list[str]:
        return self.read_json("labels.json")

    def artifact(self, name: str) -> Path:
        path = self.path / safe_name(name, "artifact name")
        if not path.is_dir():
            raise UserError(f"{self.path} has no {name}/ folder: the run did not finish (see metrics.jsonl)")
        return path
