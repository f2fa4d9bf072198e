"""Knowledge distillation (distill.teacher; Hinton et al. 2015): the student learns from a trained
teacher's predictions on its training texts as well as from their labels.

The teacher (a finished lorafit run or an export of one: any architecture, tokenizer or method) is run
once, before the first step, over every training text; its logits, in this run's label order, are kept
in the run folder (TEACHER_FILE) and read back by a resume, which needs neither the teacher's folder nor
its time again. The loss (lorafit.train._example_losses) is, per example,
(1 - alpha) * its training loss + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)).

A teacher must not have trained on this run's validation or test examples (they would reach the student
through the teacher's knowledge and flatter the figures that pick the best epoch or report the run):
where the teacher's run folder (for an export, the run it came from) says which rows it trained on and
this run carves validation or test from the same training file (a seed's carve-out, a few-shot draw), an
overlap is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from . import atomic
from .config import DistillConfig
from .data import Dataset
from .distributed import World
from .errors import UserError
from .rundir import RunDir

__all__ = ["TEACHER_FILE", "teacher_logits", "save", "record", "distillation_losses"]

log = logging.getLogger("lorafit")

#: The teacher's logits on the run's training texts (N, C) float32, in the run folder.
TEACHER_FILE = "teacher_logits.safetensors"


def teacher_logits(cfg: DistillConfig, dataset: Dataset, run: RunDir, mode: str, world: World,
                   device: torch.device) -> np.ndarray | None:
    """The teacher's logits (N, C) on `dataset`'s training texts, columns in dataset.label_names' order;
    None without distill.teacher or with mode "skip" (a finished run's post-hoc refit trains nothing).
    mode "compute" runs the teacher (a new run; every process gets rank 0's numbers), "load" reads the
    ones the run's start saved (a resume)."""
    if mode not in ("compute", "load", "skip"):
        raise ValueError(f"teacher mode {mode!r}: compute, load or skip")
    if cfg.teacher is None or mode == "skip":
        return None
    if mode == "load":
        return _saved(run, len(dataset.splits["train"]), len(dataset.label_names))
    from .inference import load, plan_load  # inference imports the training-side modules

    try:
        plan = plan_load(cfg.teacher)
    except UserError as e:
        raise UserError(f"distill.teacher: {e}") from None
    missing, extra = sorted(set(dataset.label_names) - set(plan.labels)), sorted(set(plan.labels) - set(dataset.label_names))
    if missing or extra:
        parts = ([f"lacks {_names(missing)}"] if missing else []) + ([f"has {_names(extra)} too"] if extra else [])
        raise UserError(f"distill.teacher {plan.folder}: its labels are not this data's: it {' and '.join(parts)}; "
                        "give a teacher trained on this data (the same data.known_intents, data.oos_label)")
    _check_no_leak(plan.folder, dataset)
    logits = None
    if world.is_main:
        start = time.perf_counter()
        log.info("distillation: the teacher %s (%s) reads the %s training texts", plan.folder, plan.kind,
                 f"{len(dataset.splits['train']):,}")
        teacher = load(plan, device=str(device), out_of_scope=False)
        order = [teacher.labels.index(name) for name in dataset.label_names]
        logits = np.ascontiguousarray(teacher.logits(dataset.splits["train"].texts)[:, order], dtype=np.float32)  # (N, C)
        del teacher
        if device.type == "cuda":  # the run's peak memory is its training's, not the teacher's
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        log.info("distillation: teacher logits in %.0f s", time.perf_counter() - start)
    return world.gather_objects(logits)[0]


def _saved(run: RunDir, n: int, classes: int) -> np.ndarray:
    """The logits a run's start saved, checked against the fingerprint its config.yaml recorded."""
    path = run.path / TEACHER_FILE
    if not path.is_file():
        raise UserError(f"{run.path} has no {TEACHER_FILE}: the teacher's logits this run trained on are gone, so it "
                        "cannot be resumed exactly; start the run again")
    try:
        logits = load_file(str(path))["logits"]
    except Exception as e:  # a truncated or foreign file: safetensors' own errors, or no "logits" tensor
        raise UserError(f"{path} is unreadable ({type(e).__name__}); restore it or start the run again") from None
    recorded = run.derived().get("distill") or {}
    if recorded.get("logits_sha256") != _sha256(logits):
        raise UserError(f"{path} is not the file this run saved (its fingerprint in config.yaml differs); the run folder "
                        "was edited: restore the file or start the run again")
    if logits.shape != (n, classes):
        raise UserError(f"the data changed since {run.path} started ({logits.shape[0]} training examples then, {n} now); "
                        "cannot resume it exactly: restore the data or start a new run")
    return logits


def _names(labels: list[str]) -> str:
    return ", ".join(repr(x) for x in labels[:5]) + (f" and {len(labels) - 5} more" if len(labels) > 5 else "")


def _check_no_leak(teacher: Path, dataset: Dataset) -> None:
    """Refuse a teacher that trained on rows of the training file this run holds out (validation or test
    carved from it: by the seed, or a few-shot draw). An export is checked through the run it came from
    (export.json's source_run); a teacher whose rows cannot be known is taken on trust, with a warning."""
    sources = [teacher]
    if (teacher / "export.json").is_file() and not (teacher / "splits.json").is_file():
        meta = json.loads((teacher / "export.json").read_text(encoding="utf-8"))
        sources = [Path(r) for r in (meta.get("soup") or {}).get("runs") or [meta.get("source_run") or teacher]]  # a soup: every run
    mine = dataset.splits_record()
    trained: set[int] = set()  # rows of the training file any of them trained on (augmented rows are not listed)
    for source in sources:
        if not (source / "splits.json").is_file():
            log.warning("distill.teacher %s: %s does not record the rows it trained on: make sure it never saw this "
                        "run's validation or test examples", teacher, source)
            continue
        run = RunDir(source)
        if run.config().data.train_on_validation:
            raise UserError(f"distill.teacher {teacher}: {source} trained on its validation rows (lorafit train --final), "
                            "which may be this run's validation examples; distil from the run it was made from")
        theirs = run.splits().to_json()
        if theirs.get("source") != mine["source"]:
            log.warning("distill.teacher %s: %s trained on %s, this run on %s: lorafit cannot check that it never saw "
                        "this run's validation or test examples", teacher, source, theirs.get("source"), mine["source"])
            continue
        trained |= set(theirs.get("train", []))
    for split in ("validation", "test"):
        if mine["provenance"].get(split, "file") == "file":  # its own file: its rows are not training-file rows
            continue
        overlap = trained & set(mine[split])
        if overlap:
            raise UserError(f"distill.teacher {teacher} trained on {len(overlap)} of this run's {len(mine[split])} {split} "
                            "examples (it was trained with another seed or draw, which held out other rows): train the "
                            "teacher with this run's seed (and few-shot draw), or give data with fixed validation and test files")


def _sha256(logits: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(logits).tobytes()).hexdigest()


def save(run: RunDir, logits: np.ndarray) -> None:
    with atomic.file(run.path / TEACHER_FILE) as tmp:
        save_file({"logits": logits}, str(tmp))


def record(cfg: DistillConfig, logits: np.ndarray) -> dict:
    """config.yaml's derived.distill: which teacher, and a fingerprint of the logits the student learns from."""
    return {"teacher": str(Path(cfg.teacher).resolve()), "file": TEACHER_FILE, "logits_sha256": _sha256(logits)}


def distillation_losses(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Each example's T^2 * KL(softmax(teacher / T) || softmax(student / T)), from logits (b, C) -> (b,);
    T^2 keeps its gradient's scale as T changes (Hinton et al. 2015)."""
    log_q = torch.log_softmax(teacher.float() / temperature, dim=-1)
    log_p = torch.log_softmax(student / temperature, dim=-1)
    return temperature ** 2 * (log_q.exp() * (log_q - log_p)).sum(-1)
