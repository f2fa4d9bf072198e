"""Knowledge distillation (distill.teacher; Hinton et al. 2015): the student learns from a trained
teacher's predictions on its training texts as well as from their labels.

The teacher (a finished lorafit run or an export of one: any architecture, tokenizer or method) is run
once, before the first step, over every training text; its logits, in this run's label order, are kept
in the run folder (TEACHER_FILE) and read back by a resume, which needs neither the teacher's folder nor
its time again. The loss (lorafit.train._example_losses) is, per example,
(1 - alpha) * its training loss + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)).

A teacher must not have trained on this run's validation examples (they would reach the student through
the teacher's knowledge and flatter its validation, which picks the best epoch): where the teacher's
run folder says which rows it trained on and this run carves validation from the same training file, an
overlap is refused. Test is never trained on by a lorafit run.
"""

from __future__ import annotations

import hashlib
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


def teacher_logits(cfg: DistillConfig, dataset: Dataset, run: RunDir, resuming: bool, world: World,
                   device: torch.device) -> np.ndarray | None:
    """The teacher's logits (N, C) on `dataset`'s training texts, columns in dataset.label_names' order;
    None without distill.teacher. A resumed run reads the ones its start saved. Every process gets rank
    0's numbers."""
    if cfg.teacher is None:
        return None
    n, classes = len(dataset.splits["train"]), len(dataset.label_names)
    if resuming:
        path = run.path / TEACHER_FILE
        if not path.is_file():
            raise UserError(f"{run.path} has no {TEACHER_FILE}: the teacher's logits this run trained on are gone; "
                            "start the run again")
        logits = load_file(str(path))["logits"]
        if logits.shape != (n, classes):
            raise UserError(f"{path} holds logits of shape {logits.shape}, not ({n}, {classes}): it belongs to other data")
        return logits
    from .inference import load, plan_load  # inference imports the training-side modules

    plan = plan_load(cfg.teacher)
    missing, extra = sorted(set(dataset.label_names) - set(plan.labels)), sorted(set(plan.labels) - set(dataset.label_names))
    if missing or extra:
        parts = ([f"lacks {_names(missing)}"] if missing else []) + ([f"has {_names(extra)} too"] if extra else [])
        raise UserError(f"distill.teacher {plan.folder}: its labels are not this data's: it {' and '.join(parts)}")
    _check_no_leak(plan.folder, dataset)
    texts = dataset.splits["train"].texts
    logits = None
    if world.is_main:
        start = time.perf_counter()
        log.info("distillation: the teacher %s (%s) reads the %s training texts", plan.folder, plan.kind, f"{n:,}")
        teacher = load(plan, device=str(device), out_of_scope=False)
        order = [teacher.labels.index(name) for name in dataset.label_names]
        logits = np.ascontiguousarray(teacher.logits(texts)[:, order], dtype=np.float32)  # (N, C)
        del teacher
        log.info("distillation: teacher logits in %.0f s", time.perf_counter() - start)
    return world.gather_objects(logits)[0]


def _names(labels: list[str]) -> str:
    return ", ".join(repr(x) for x in labels[:5]) + (f" and {len(labels) - 5} more" if len(labels) > 5 else "")


def _check_no_leak(teacher: Path, dataset: Dataset) -> None:
    """Refuse a teacher trained on this run's validation rows (validation carved from the training file
    both read); a teacher whose rows cannot be known (an export) is taken on trust, with a warning."""
    path = teacher / "splits.json"
    if not path.is_file():
        log.warning("distill.teacher %s does not record the rows it trained on: make sure it never saw this run's "
                    "validation or test examples", teacher)
        return
    theirs = RunDir(teacher).splits().to_json()
    mine = dataset.splits_record()
    if theirs.get("source") != mine["source"]:
        log.warning("distill.teacher %s trained on %s, this run on %s: lorafit cannot check that it never saw this "
                    "run's validation or test examples", teacher, theirs.get("source"), mine["source"])
        return
    carved = str(mine["provenance"].get("validation", "")).startswith("carved from train")
    overlap = set(theirs.get("train", [])) & set(mine["validation"]) if carved else set()
    if overlap:
        raise UserError(f"distill.teacher {teacher} trained on {len(overlap)} of this run's {len(mine['validation'])} "
                        f"validation examples (its seed {theirs.get('seed')} carved another validation split): train "
                        "the teacher with this run's seed, or give data with a fixed validation split")


def save(run: RunDir, logits: np.ndarray) -> None:
    with atomic.file(run.path / TEACHER_FILE) as tmp:
        save_file({"logits": logits}, str(tmp))


def record(cfg: DistillConfig, logits: np.ndarray) -> dict:
    """config.yaml's derived.distill: which teacher, and a fingerprint of the logits the student learns from."""
    return {"teacher": str(Path(cfg.teacher).resolve()), "file": TEACHER_FILE,
            "logits_sha256": hashlib.sha256(np.ascontiguousarray(logits).tobytes()).hexdigest()}


def distillation_losses(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Each example's T^2 * KL(softmax(teacher / T) || softmax(student / T)), from logits (b, C) -> (b,);
    T^2 keeps its gradient's scale as T changes (Hinton et al. 2015)."""
    log_q = torch.log_softmax(teacher.float() / temperature, dim=-1)
    log_p = torch.log_softmax(student / temperature, dim=-1)
    return temperature ** 2 * (log_q.exp() * (log_q - log_p)).sum(-1)
