"""The one training loop. Reads top to bottom: epochs -> steps -> validation -> test.
Over 400 lines on purpose: a run's whole story (steps, signals, checkpoints, validation, test) in
reading order; what is built before the first step lives in job.py.

`train` (a new run) and `resume` (from a checkpoint) build a `Job` with `job.prepare` (data, model,
method, optimiser, scheduler, how to compute) and hand it to `_run`, which calls, in this order:
    _epochs             epoch after epoch, until the last one or early stopping
      _train_step       one micro-batch: `_forward_backward` (token-budget pieces, DDP no_sync, autocast,
                        loss weighted per step, backward), the divergence check, and on the step's last
                        micro-batch `_optimizer_step` (unscale, clip, step, `on_step_end`, zero_grad, schedule)
      _after_step       progress bar, a metrics line, a checkpoint every train.checkpoint_every steps
      _end_epoch        validation, best state and artifact, early stopping, the epoch's checkpoint
    _finish             the best epoch on test: eval.json, predictions.json, summary.json (`_summary`)
With `contrastive.epochs` the first epochs are a contrastive stage (lorafit.contrastive): the same steps
with `_contrastive_forward_backward` (a loss on sentence vectors, the head idle) and `_end_contrastive_epoch`
(no best state); `model.head_init=centroids` sets the head before the first classification step.
With `train.ema` the optimiser steps also move a moving average of the weights (lorafit.averaging), and
`_end_epoch` validates, keeps and saves the average instead of the raw weights.
A signal (SIGINT/SIGTERM, `_Signals`) stops the loop after the current step, with a checkpoint. The loop
never asks which method runs. Everything the loop knows lives in `Progress`, so a checkpoint (weights,
optimiser, scheduler, RNG states and `Progress`) lets `resume` continue bit for bit.
"""

from __future__ import annotations

import contextlib
import logging
import math
import platform
import random
import signal
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import __version__, allocator, atomic, batching, checkpoint, contrastive, data, distill, fitted, modelcard, posthoc
from .config import Config, DistillConfig, TrainConfig, validate
from .distributed import World
from .errors import UserError
from .evaluate import classification_metrics, softmax
from .inference import features_and_logits, predict_logits
from .job import Job, as_config, check_same_data, count_parameters, prepare, splits_record
from .rundir import Eval, Predictions, RunDir, Summary, folder_bytes
from .runtime import autocast, peak_memory_mb
from .track import Sinks, open_sinks

__all__ = ["train", "resume", "RunResult", "Interrupted", "count_parameters", "sum_training_loss"]

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    path: Path
    eval: dict
    summary: dict


class Interrupted(UserError):
    """SIGINT/SIGTERM: the current step finished, a checkpoint was written."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


@dataclass
class Progress:
    """Where the loop stands. Saved in every checkpoint; restoring it resumes exactly."""

    epoch: int = 1
    batch: int = 0  # next micro-batch of this epoch
    step: int = 0  # optimiser steps taken
    epoch_loss: float = 0.0
    epoch_elapsed: float = 0.0
    examples_seen: int = 0
    epoch_seconds: list[float] = field(default_factory=list)
    best_value: float | None = None
    best_epoch: int = 0
    stale: int = 0
    stopped: bool = False
    window_loss: float = 0.0
    window_steps: int = 0  # no longer counted (it was never read); kept so older checkpoints still load
    window_batches: int = 0
    window_examples: int = 0
    skipped_steps: int = 0  # fp16: steps the gradient scaler skipped because gradients overflowed
    metrics_lines: int = 0  # metrics.jsonl lines written, so a resume drops lines from after the checkpoint


def _better(metric: str, value: float, best: float | None) -> bool:
    if best is None:
        return True
    return value < best if metric == "loss" else value > best


def train(config: Config | str | Path | dict, out: str | Path, overwrite: bool = False, final_of: dict | None = None) -> RunResult:
    """Train, keep the best epoch, evaluate it on test; everything lands in the run folder `out`.
    `final_of` (train_final's record of the run whose choices this one reuses) goes into config.yaml's `derived`."""
    cfg = as_config(config)
    run = RunDir(out)
    run.check_new(overwrite)
    job = prepare(cfg, run)
    job.world.barrier()  # every process has checked the folder before rank 0 creates it
    # Everything that can fail on bad input has been checked: only now is the folder created.
    if job.world.is_main:
        teacher = job.teacher.cpu().numpy() if job.teacher is not None else None
        run.create(overwrite)
        run.write_config(job.cfg, derived=_derived(job, teacher) | ({"final_of": final_of} if final_of else {}))
        run.write_json("labels.json", job.dataset.label_names)
        run.write_record(splits_record(job))
        run.write_record(job.compute)
        if teacher is not None:
            distill.save(run, teacher)
    return _run(job, Progress())


def _derived(job: Job, teacher: np.ndarray | None) -> dict:
    """config.yaml's `derived` section: the schedule, the adapted modules, the settings resolved from auto or
    null (`resolved`), the resolved class weights, with train.cache_frozen_layers the first layer that runs every
    step (`cached_frozen_layers`) and, when distilling, the teacher's logits' fingerprint."""
    derived = asdict(job.schedule) | {"adapted_modules": len(job.adapted)}
    if job.layer_cache is not None:
        derived["cached_frozen_layers"] = job.layer_cache.first  # layers 0 .. first - 1 run once per training text
    if job.resolved:
        derived["resolved"] = job.resolved
    if job.class_weights is not None:
        derived["class_weights"] = {name: float(w) for name, w in zip(job.dataset.label_names, job.class_weights)}
    if teacher is not None:
        derived["distill"] = distill.record(job.cfg.distill, teacher)
    return derived


def train_final(run_dir: str | Path, out: str | Path, overwrite: bool = False, progress: bool | None = None,
                epochs: str = "best") -> RunResult:
    """The final model of a finished run: its recipe trained again on train + validation (`data.train_on_validation`),
    keeping the last epoch (validation, now trained on, chooses nothing), with the temperature and out-of-scope
    threshold its held-out validation chose (`ood.temperature`, `ood.threshold`). `epochs`: "best", as many as the
    run's best epoch (the usual refit after model selection), or "recipe", the run's own train.epochs (its whole
    schedule, as if it had kept its last epoch). Where validation was carved from train, that is a tenth more
    training rows. Test is read once, at the end, as in any run; config.yaml's `derived.final_of` names the run and
    what was taken from it."""
    if epochs not in ("best", "recipe"):
        raise UserError(f"epochs={epochs!r}: choose best (the run's best epoch count) or recipe (its train.epochs)")
    source = RunDir(run_dir)
    cfg = source.config()  # a missing folder or config.yaml says so first
    if not (source.path / "summary.json").is_file():
        raise UserError(f"{source.path} has not finished training (no summary.json): its best epoch is not chosen yet")
    if cfg.data.train_on_validation:
        raise UserError(f"{source.path} already trained on its validation rows; give the run that chose its epochs")
    if cfg.data.oos_label is not None or cfg.data.known_intents is not None:
        raise UserError(f"{source.path} has out-of-scope examples, whose threshold needs held-out validation rows; "
                        "a final model trained on them would have none")
    post = fitted.load(source.path)
    if post is None:
        raise UserError(f"{source.path} has no ood.json (trained by an older lorafit): run `lorafit eval {source.path} --refit` first")
    if post.score in fitted.NEEDS:
        raise UserError(f"{source.path} decides out of scope by {post.score}, a score fitted on its own sentence vectors "
                        "whose threshold would not carry over to another model; train it with ood.score=msp or energy")
    best = source.summary().best_epoch
    count = best - cfg.contrastive.epochs if epochs == "best" else cfg.train.epochs  # epochs are numbered through both stages
    if count < 1:
        raise UserError(f"{source.path}'s best epoch ({best}) is in its contrastive stage: no classification epoch to train")
    temperature = post.temperature if cfg.ood.calibrate else None
    recorded = cfg.model_dump(mode="json")
    settings = {**recorded["train"], "epochs": count, "keep": "last", "patience": None}
    if progress is not None:
        settings["progress"] = progress
    final = validate({**recorded, "data": {**recorded["data"], "train_on_validation": True}, "train": settings,
                      "ood": {**recorded["ood"], "temperature": temperature, "threshold": post.threshold}})
    record = {"run": str(source.path.resolve()), "best_epoch": best, "epochs_rule": epochs, "train_epochs": count,
              "source_train_epochs": cfg.train.epochs, "temperature": temperature,
              "threshold": post.threshold, "threshold_source": post.source, "temperature_fitted_on": post.fitted_on}
    return train(final, out, overwrite=overwrite, final_of=record)


def resume(run_dir: str | Path) -> RunResult:
    """Continue a run from its newest checkpoint; ends as the uninterrupted run would have."""
    run = RunDir(run_dir)
    cfg = run.config()
    if cfg.train.head_lr is None:  # recorded by a version in which a null head_lr meant train.lr
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"head_lr": cfg.train.lr})})
    latest = checkpoint.latest(run.path)
    if latest is None:
        if (run.path / "summary.json").is_file():
            raise UserError(f"{run.path} already finished (summary.json exists); nothing to resume")
        raise UserError(f"{run.path} has no checkpoint to resume from (train.checkpoint_every may be off)")
    recorded = run.compute() if (run.path / "compute.json").is_file() else None
    job = prepare(cfg, run, recorded, teacher="load", resumed=True)
    check_same_data(job, run)
    tensors, meta = checkpoint.load(latest)
    job.method.load_state_dict(job.model, {k[6:]: v for k, v in tensors.items() if k.startswith("model/")})
    job.method.load_checkpoint_state(job.model, {k[7:]: v for k, v in tensors.items() if k.startswith("method/")}, meta["method"])
    checkpoint.optimizer_from_flat(job.optimizer, tensors, meta["optimizer"])
    job.scheduler.load_state_dict(meta["scheduler"])
    checkpoint.restore_rng(*_my_rng(job.world, tensors, meta))
    if "scaler" in meta:
        job.scaler.load_state_dict(meta["scaler"])
    progress = Progress(**meta["progress"])
    best = {k[5:]: v for k, v in tensors.items() if k.startswith("best/")}
    if job.average is not None:
        job.average.load({k[4:]: v for k, v in tensors.items() if k.startswith("ema/")}, meta.get("ema", {}))
    job.world.barrier()  # every process has read the checkpoint before rank 0 touches the folder
    if job.world.is_main:
        lines = (run.path / "metrics.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
        (run.path / "metrics.jsonl").write_text("".join(lines[: progress.metrics_lines]), encoding="utf-8")
    log.info("resuming %s from %s (epoch %d, step %d)", run.path, latest.name, progress.epoch, progress.step)
    return _run(job, progress, best or None)


def _my_rng(world: World, tensors: dict, meta: dict) -> tuple[dict, dict]:
    """This process's RNG state from a checkpoint: each data-parallel rank saved its own (rank 0's
    under the plain keys, so single-process checkpoints read as before)."""
    if world.rank == 0:
        return tensors, meta["rng"]
    prefix = f"rank{world.rank}/"
    mine = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if not mine:
        log.warning("the checkpoint holds no random state for rank %d (saved by %d processes?): using rank 0's, "
                    "so dropout masks will not repeat the uninterrupted run's", world.rank, len(meta.get("rng_ranks", [])) + 1)
        return tensors, meta["rng"]
    return mine, meta["rng_ranks"][world.rank - 1]


def _write_checkpoint(job: Job, progress: Progress, best_state: dict | None) -> None:
    # Every process's own random state (dropout masks differ per rank), collected by rank 0, which writes.
    states = job.world.gather_objects(checkpoint.capture_rng())
    if not job.world.is_main:
        return
    if job.sinks is not None:
        job.sinks.flush()
    tensors = {f"model/{k}": v for k, v in job.method.state_dict(job.model).items()}
    if best_state is not None:
        tensors |= {f"best/{k}": v for k, v in best_state.items()}
    method_tensors, method_meta = job.method.checkpoint_state(job.model)
    tensors |= {f"method/{k}": v for k, v in method_tensors.items()}
    if job.average is not None:
        average_tensors, average_meta = job.average.state()
        tensors |= {f"ema/{k}": v for k, v in average_tensors.items()}
    opt_tensors, opt_meta = checkpoint.optimizer_to_flat(job.optimizer)
    rng_tensors, rng_meta = states[0]
    for rank, (rank_tensors, _) in enumerate(states[1:], start=1):
        rng_tensors |= {f"rank{rank}/{k}": v for k, v in rank_tensors.items()}
    meta = {
        "progress": asdict(progress), "optimizer": opt_meta, "scheduler": job.scheduler.state_dict(),
        "rng": rng_meta, "method": method_meta,
    }
    if job.average is not None:
        meta["ema"] = average_meta
    if len(states) > 1:
        meta["rng_ranks"] = [rank_meta for _, rank_meta in states[1:]]
    if job.scaler.is_enabled():
        meta["scaler"] = job.scaler.state_dict()
    checkpoint.save(job.run.path, progress.step, tensors | opt_tensors | rng_tensors, meta, job.cfg.train.keep_checkpoints)


def _run(job: Job, p: Progress, best_state: dict | None = None) -> RunResult:
    job.sinks = open_sinks(job.cfg, job.run.path, resume_step=p.step or None) if job.world.is_main else Sinks([], {})
    finished = together = False
    try:
        result = _train_and_finish(job, p, best_state)
        finished = True
        return result
    except Interrupted:
        together = True  # a stop every process agreed on (signals.agreed): all of them come here, after the checkpoint
        raise
    finally:
        job.sinks.close(finished)
        job.world.leave(finished or together)


def _train_and_finish(job: Job, p: Progress, best_state: dict | None) -> RunResult:
    try:
        with _catch_signals() as signals:
            best_state = _epochs(job, p, best_state, signals)
    except OSError as e:
        latest = checkpoint.latest(job.run.path)
        kept = f"the last checkpoint ({latest.name}) is intact" if latest else "no checkpoint was written yet"
        raise UserError(
            f"cannot write to {job.run.path}: {e.strerror or e}; {kept}; free space or fix permissions, "
            f"then resume with: lorafit train --resume {job.run.path}"
        ) from None
    return _finish(job, p, best_state)


@dataclass
class _Epoch:
    """One pass over the train batches: what its steps share besides `Progress`. Not checkpointed: a
    resumed epoch draws the same batches again and restarts its clocks."""

    batches: list[list[int]]  # micro-batches of train example indices, length-grouped (`_batches`)
    bar: tqdm
    started: float  # perf_counter at the epoch's start, moved back by the time it ran before a resume
    window_start: float  # perf_counter when the current logging window opened


def _epochs(job: Job, p: Progress, best_state: dict | None, signals: _Signals) -> dict | None:
    """Epochs from where `p` stands to the last one (or early stopping); returns the best epoch's state."""
    cfg = job.cfg
    _log_start(job)
    lengths = [len(t) for t in job.tokens["train"]]
    if job.layer_cache is not None and not job.layer_cache.built:
        job.layer_cache.build(job.tokens["train"], job.pad_id, job.device, job.amp, job.max_tokens,
                              cfg.train.progress and job.world.is_main)
    while p.epoch <= _last_epoch(cfg) and not p.stopped:
        if p.batch == 0 and p.epoch == cfg.contrastive.epochs + 1 and cfg.model.head_init == "centroids":
            _centroid_head(job)  # before the first classification step (a resume from here redoes it identically)
        if not _contrastive(job, p) and cfg.contrastive.epochs and cfg.contrastive.then_train == "head":
            _train_head_only(job)  # every classification epoch: a resumed run starts with all flags on again
        if job.average is not None and not job.average.started and not _contrastive(job, p):
            job.average.start()  # from the weights the classification stage starts with (head set, if centroids)
        job.model.train()
        batches = _batches(job, p.epoch, lengths)
        if p.batch == 0:
            torch.manual_seed(cfg.seed * 1000 + p.epoch + 7919 * job.world.rank)  # dropout masks repeat per epoch
        with _progress_bar(job, p, len(batches)) as bar:  # closed however the epoch ends
            epoch = _Epoch(batches, bar, started=time.perf_counter() - p.epoch_elapsed, window_start=time.perf_counter())
            for i in range(p.batch, len(batches)):
                stepped, stopping = _train_step(job, p, batches, i, lengths, signals)
                if stepped:
                    _after_step(job, p, epoch, best_state, signals, stopping)
        seconds = time.perf_counter() - epoch.started
        if _contrastive(job, p):
            _end_contrastive_epoch(job, p, best_state, signals, seconds)
            continue
        weight = _weight(job, [j for batch in batches for j in batch])  # the epoch's examples, weighted
        best_state = _end_epoch(job, p, best_state, signals, seconds=seconds, weight=weight)
    return best_state


def _last_epoch(cfg: Config) -> int:
    """Epochs are numbered through both stages: contrastive.epochs contrastive ones, then train.epochs."""
    return cfg.contrastive.epochs + cfg.train.epochs


def _contrastive(job: Job, p: Progress) -> bool:
    """Whether the loop is in the contrastive stage (lorafit.contrastive)."""
    return p.epoch <= job.cfg.contrastive.epochs


def _batches(job: Job, epoch: int, lengths: list[int]) -> list[list[int]]:
    """The epoch's micro-batches (train.sampler; contrastive.examples_per_class in the contrastive stage):
    a function of the seed and the epoch alone, so a resumed epoch and every data-parallel process draw
    the same ones."""
    cfg = job.cfg
    rng = random.Random(cfg.seed * 1000 + epoch)
    if epoch <= cfg.contrastive.epochs:
        return contrastive.class_grouped_batches(lengths, job.targets["train"].tolist(),
                                                 cfg.contrastive.batch_size or cfg.train.batch_size,
                                                 cfg.contrastive.examples_per_class, rng)
    # compute.json's batch_order: runs begun before the length-run order resume with shuffled batches
    order = (batching.shuffled_length_grouped_batches if job.compute.batch_order == batching.OLD_BATCH_ORDER
             else batching.length_grouped_batches)
    if cfg.train.sampler == "class_balanced":
        return batching.class_balanced_batches(lengths, job.targets["train"].tolist(), cfg.train.batch_size, rng, order=order)
    return order(lengths, cfg.train.batch_size, rng)


def _weight(job: Job, examples: list[int], contrastive_stage: bool = False) -> float:
    """The examples' total weight in the training loss: their number, or with train.class_weights the sum
    of their classes' weights (fsum: exact, so the same whatever the order or cut of the examples). The
    contrastive stage's loss is a plain mean over anchors."""
    if job.class_weights is None or contrastive_stage:
        return len(examples)
    return math.fsum(job.class_weights[job.targets["train"][examples]])


def _train_step(job: Job, p: Progress, batches: list[list[int]], i: int, lengths: list[int],
                signals: _Signals) -> tuple[bool, bool]:
    """Micro-batch i: forward and backward; on the last micro-batch of a step, the optimiser step.

    Returns (whether the optimiser stepped, whether to stop: some process caught a signal)."""
    batch = batches[i]
    boundary = (i + 1) % job.cfg.train.grad_accum == 0 or i + 1 == len(batches)  # the step's last micro-batch
    stage = _contrastive(job, p)
    if stage:
        mine_loss, extra = _contrastive_forward_backward(job, batches, i, lengths), None
    else:
        mine_loss, extra = _forward_backward(job, batches, i, lengths, boundary)
    # The global batch's (weighted) mean loss; a signal caught by any process stops them all at this step.
    summed, votes = job.world.sum([mine_loss, signals.vote()])
    batch_weight = _weight(job, batch, stage)
    batch_loss = summed / batch_weight
    stopping = signals.agreed(votes)
    if not math.isfinite(batch_loss) or (extra is not None and not torch.isfinite(extra)):
        _diverged(job, p, batch_loss if not math.isfinite(batch_loss) else float(extra.detach()))
    p.epoch_loss += batch_loss * batch_weight
    p.window_loss += batch_loss
    p.window_batches += 1
    p.window_examples += len(batch)
    p.examples_seen += len(batch)
    p.batch = i + 1
    if boundary:
        _optimizer_step(job, p)
    return boundary, stopping


def _forward_backward(job: Job, batches: list[list[int]], i: int, lengths: list[int],
                      boundary: bool) -> tuple[float, torch.Tensor | None]:
    """Add micro-batch i's gradients to the parameters' (this process's share of it, in pieces).

    Returns (this process's summed loss, the method's extra loss or None). An optimiser step sums the
    gradients of up to grad_accum batches (fewer at the epoch's end), each example weighted
    1 / (examples in the step), or with class weights w_y / (sum of w_y over the step's examples): the
    step's (weighted) mean loss, however uneven.
    """
    cfg, device, world = job.cfg, job.device, job.world
    first = i - i % cfg.train.grad_accum  # the step's first micro-batch
    step_weight = _weight(job, [j for b in batches[first:first + cfg.train.grad_accum] for j in b])
    mine, weight = world.shard(batches[i], step_weight)  # one process: the whole batch, 1 / step_weight
    class_weights = None if job.class_weights is None else torch.as_tensor(job.class_weights, dtype=torch.float32, device=device)
    # Pieces of at most max_batch_tokens padded tokens (R-Drop stacks a piece on itself: half as many
    # examples); their gradients add up to the slice's.
    rdrop = cfg.train.rdrop
    budget = job.max_tokens if rdrop is None or job.max_tokens is None else max(1, job.max_tokens // 2)
    pieces = batching.split_by_tokens(mine, lengths, budget)
    mine_loss, extra = 0.0, None
    for k, piece in enumerate(pieces):
        input_ids, attention_mask = batching.collate([job.tokens["train"][j] for j in piece], job.pad_id)  # (b, T)
        if rdrop is not None:  # both passes in one forward: (2b, T), each row with its own dropout masks
            input_ids, attention_mask = input_ids.repeat(2, 1), attention_mask.repeat(2, 1)
        y = torch.as_tensor(job.targets["train"][piece], device=device)  # (b,)
        teacher = None if job.teacher is None else job.teacher[torch.as_tensor(piece, device=device)]  # (b, C)
        # DDP all-reduces on the step's last backward only (no_sync must cover forward and backward).
        # train.cache_frozen_layers: the forward starts above the frozen layers, from their stored states.
        cached = job.layer_cache.feeding(piece if rdrop is None else piece + piece) if job.layer_cache else contextlib.nullcontext()
        with _no_sync(job.forward, not (boundary and k == len(pieces) - 1)), cached:
            with autocast(device, job.amp):
                logits = job.forward(input_ids.to(device), attention_mask.to(device)).float()  # (b, C); R-Drop (2b, C)
                if rdrop is None:
                    loss_sum = sum_training_loss(logits, y, cfg.train, class_weights, teacher, cfg.distill)
                else:
                    loss_sum = sum_rdrop_loss(logits[:len(piece)], logits[len(piece):], y, cfg.train, class_weights,
                                              teacher, cfg.distill)
                loss = loss_sum * weight  # the step's mean, once summed over pieces, batches and processes
                if k == 0 and i == first:  # a method's penalty on the weights counts once per step
                    extra = job.method.extra_loss(job.model)
                    loss = loss if extra is None else loss + extra
            job.scaler.scale(loss).backward()  # fp16: scaled so small gradients do not underflow
        mine_loss += float(loss_sum.detach())
    return (mine_loss if weight else 0.0), extra  # weight 0: a stand-in example that adds nothing


def _contrastive_forward_backward(job: Job, batches: list[list[int]], i: int, lengths: list[int]) -> float:
    """The contrastive stage's micro-batch i: the loss compares every pair of the batch, so one backward
    covers it all; its sentence vectors are computed in token-budget pieces of similar length (the batch
    is length-ordered), which saves padding, not memory. The loss is summed over anchors and weighted
    1 / (examples in the step). Returns the summed loss. One process only (job.prepare refuses a
    contrastive stage under data parallelism)."""
    cfg, device = job.cfg, job.device
    first = i - i % cfg.train.grad_accum
    step_examples = sum(len(b) for b in batches[first:first + cfg.train.grad_accum])
    batch = batches[i]
    pieces = batching.split_by_tokens(batch, lengths, job.max_tokens)
    y = torch.as_tensor(job.targets["train"][[j for piece in pieces for j in piece]], device=device)  # (b,)
    with autocast(device, job.amp):
        features = []
        for piece in pieces:
            input_ids, attention_mask = batching.collate([job.tokens["train"][j] for j in piece], job.pad_id)  # (p, T)
            features.append(job.model.features(input_ids.to(device), attention_mask.to(device)))  # (p, H)
        loss_sum = contrastive.contrastive_loss(cfg.contrastive.loss, torch.cat(features).float(), y, cfg.contrastive.temperature)
    job.scaler.scale(loss_sum / step_examples).backward()
    return float(loss_sum.detach())


def sum_training_loss(logits: torch.Tensor, y: torch.Tensor, train: TrainConfig, class_weights: torch.Tensor | None,
                      teacher: torch.Tensor | None = None, distill_cfg: DistillConfig | None = None) -> torch.Tensor:
    """The training loss summed over a piece's examples: logits (b, C), targets y (b,).

    Plain (label-smoothed) cross-entropy by default. Otherwise each example's loss is its smoothed
    cross-entropy times the focal factor (1 - p_t)^gamma (train.loss=focal; Lin et al. 2017, eq. 5)
    and times its class's weight (the focal loss's alpha); dividing by the summed weights of the step
    (`_forward_backward`) makes it a weighted mean, which for one batch without smoothing is
    F.cross_entropy(weight=class_weights). With smoothing, an example's weight multiplies its whole
    smoothed loss (torch's weight would spread its smoothing term over the other classes' weights).
    With a teacher's logits (b, C), distillation mixes its term in (`_example_losses`).
    """
    if class_weights is None and train.loss == "ce" and teacher is None:  # kept as it was: the same floats as before class weights
        return F.cross_entropy(logits, y, label_smoothing=train.label_smoothing, reduction="sum")
    losses = _example_losses(logits, y, train, teacher, distill_cfg)
    if class_weights is not None:
        losses = losses * class_weights[y]
    return losses.sum()


def sum_rdrop_loss(first: torch.Tensor, second: torch.Tensor, y: torch.Tensor, train: TrainConfig,
                   class_weights: torch.Tensor | None, teacher: torch.Tensor | None = None,
                   distill_cfg: DistillConfig | None = None) -> torch.Tensor:
    """train.rdrop's loss summed over a piece's examples, from the logits of its two passes (b, C) each:
    per example (loss_1 + loss_2) / 2 + alpha / 4 * (KL(p_1 || p_2) + KL(p_2 || p_1)), loss_k its
    training loss in pass k (as in sum_training_loss, before its class weight), alpha = train.rdrop --
    Liang et al. 2021's loss (their eq. 3) halved -- times its class's weight."""
    log_p1, log_p2 = F.log_softmax(first, dim=-1), F.log_softmax(second, dim=-1)  # (b, C)
    # KL(p1 || p2) + KL(p2 || p1) = sum_c (p1 - p2)(log p1 - log p2), per example
    symmetric_kl = ((log_p1.exp() - log_p2.exp()) * (log_p1 - log_p2)).sum(-1)  # (b,)
    passes = _example_losses(first, y, train, teacher, distill_cfg) + _example_losses(second, y, train, teacher, distill_cfg)
    losses = passes / 2 + train.rdrop / 4 * symmetric_kl
    if class_weights is not None:
        losses = losses * class_weights[y]
    return losses.sum()


def _example_losses(logits: torch.Tensor, y: torch.Tensor, train: TrainConfig, teacher: torch.Tensor | None = None,
                    distill_cfg: DistillConfig | None = None) -> torch.Tensor:
    """Each example's training loss before its class weight (b,): smoothed cross-entropy, times the
    focal factor with train.loss=focal; with a teacher's logits (b, C), (1 - alpha) times that plus alpha
    times the distillation term (lorafit.distill.distillation_losses)."""
    losses = F.cross_entropy(logits, y, label_smoothing=train.label_smoothing, reduction="none")  # (b,)
    if train.loss == "focal":
        log_p_t = F.log_softmax(logits, dim=-1).gather(1, y[:, None]).squeeze(1)  # (b,)
        # 1 - p_t as -expm1(log p_t): exact near p_t = 1. Kept above 0: (1 - p_t)^gamma has an infinite
        # slope at 0 when gamma < 1, which would turn a perfectly fitted example's gradient into NaN.
        one_minus = (-torch.expm1(log_p_t)).clamp_min(torch.finfo(log_p_t.dtype).tiny)
        losses = one_minus.pow(train.focal_gamma) * losses
    if teacher is not None:
        alpha = distill_cfg.alpha
        losses = (1 - alpha) * losses + alpha * distill.distillation_losses(logits, teacher, distill_cfg.temperature)
    return losses


def _optimizer_step(job: Job, p: Progress) -> None:
    """The optimiser step on the accumulated gradients: clip, step, the method's hook, zero, schedule."""
    optimizer, scaler, max_norm = job.optimizer, job.scaler, job.cfg.train.max_grad_norm
    scale = scaler.get_scale() if scaler.is_enabled() else None
    if max_norm is not None:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        torch.nn.utils.clip_grad_norm_([q for g in optimizer.param_groups for q in g["params"]], max_norm)
    scaler.step(optimizer)  # skipped when fp16 gradients overflowed
    scaler.update()
    skipped = scale is not None and scaler.get_scale() < scale
    p.step += 1
    if skipped:  # no update happened: the method's hook (AdaLoRA would score the inf gradients) and the
        # schedule wait for a real step, as transformers' Trainer does
        p.skipped_steps += 1
        log.debug("step %d skipped: fp16 gradients overflowed; loss scale now %g", p.step, scaler.get_scale())
    else:
        job.method.on_step_end(job.model, p.step)
        if job.average is not None and job.average.started:  # classification steps only
            job.average.update()
    optimizer.zero_grad(set_to_none=True)
    if not skipped:
        job.scheduler.step()


def _after_step(job: Job, p: Progress, epoch: _Epoch, best_state: dict | None, signals: _Signals,
                stopping: bool) -> None:
    """After an optimiser step: the progress bar, a metrics line every log_every steps, a checkpoint every
    checkpoint_every steps; on a signal, a checkpoint and Interrupted."""
    cfg = job.cfg
    epoch.bar.update(1)
    now = time.perf_counter()
    rate = p.window_examples / max(now - epoch.window_start, 1e-9)
    window_loss = p.window_loss / max(p.window_batches, 1)
    epoch.bar.set_postfix(loss=f"{window_loss:.3f}", ex_s=f"{rate:.0f}", refresh=False)
    if p.step % cfg.train.log_every == 0:
        kind = "contrastive_step" if _contrastive(job, p) else "step"
        _append_metrics(job, p, {"type": kind, "step": p.step, "epoch": p.epoch, "loss": window_loss,
                                 "lr": job.optimizer.param_groups[0]["lr"], "examples_per_second": rate})
        p.window_loss, p.window_batches, p.window_examples, epoch.window_start = 0.0, 0, 0, now
    p.epoch_elapsed = now - epoch.started
    # Not after the epoch's last step: _end_epoch writes that checkpoint, once validation ran.
    scheduled = cfg.train.checkpoint_every and p.step % cfg.train.checkpoint_every == 0 and p.batch < len(epoch.batches)
    if stopping or scheduled:
        _write_checkpoint(job, p, best_state)
    if stopping:
        raise signals.interrupted(job.run, f"step {p.step} (epoch {p.epoch})")


def _end_epoch(job: Job, p: Progress, best_state: dict | None, signals: _Signals, seconds: float,
               weight: float) -> dict | None:
    """Validation, the epoch's metrics line, the best state (its artifact saved) or early stopping, and a
    checkpoint. `weight`: the epoch's examples' total weight (`_weight`), which the train loss is a mean
    over. Returns the best epoch's state."""
    p.epoch_seconds.append(seconds)
    with _averaged(job):  # train.ema: the epoch is judged (and its best state kept) by the averaged weights
        best_state = _validate(job, p, best_state, weight)
    _next_epoch(job, p, best_state, signals, f"epoch {p.epoch}")
    return best_state


def _averaged(job: Job) -> contextlib.AbstractContextManager:
    """The model with train.ema's averaged weights in the block; a no-op without train.ema."""
    return job.average.applied() if job.average is not None else contextlib.nullcontext()


def _validate(job: Job, p: Progress, best_state: dict | None, weight: float) -> dict | None:
    """The epoch's validation and metrics line; keeps the best state and saves its artifact, or counts towards
    early stopping. Returns the best epoch's state."""
    cfg, run, model, method = job.cfg, job.run, job.model, job.method
    val = classification_metrics(_logits(job, "validation"), job.targets["validation"], job.dataset.label_names)
    record = {
        "type": "epoch", "epoch": p.epoch, "step": p.step, "train_loss": p.epoch_loss / weight,
        "val_loss": val["loss"], "val_accuracy": val["accuracy"], "val_macro_f1": val["macro_f1"],
        "seconds": p.epoch_seconds[-1], "examples_per_second": len(job.tokens["train"]) / p.epoch_seconds[-1],
    }
    _append_metrics(job, p, record)
    value = val[cfg.train.metric]
    # train.keep=last: each epoch replaces the one before, so the run ends with the final epoch's weights.
    improved = cfg.train.keep == "last" or _better(cfg.train.metric, value, p.best_value)
    log.info("%s", _table_row(record, improved))
    if improved:
        p.best_value, p.best_epoch, p.stale = value, p.epoch, 0
        best_state = method.state_dict(model)
        if job.world.is_main:
            with atomic.folder(run.path / method.artifact) as tmp:  # the previous best survives a crash
                method.save(model, tmp)
    else:
        p.stale += 1
        if cfg.train.patience is not None and p.stale >= cfg.train.patience:
            log.info("early stop: validation %s did not improve for %d epochs", cfg.train.metric, p.stale)
            p.stopped = True
    return best_state


def _next_epoch(job: Job, p: Progress, best_state: dict | None, signals: _Signals, ended: str) -> None:
    """After an epoch's validation (of either stage): move `p` to the next epoch, write its checkpoint, and
    stop if a process was signalled meanwhile. `ended`: the epoch just ended, for the message."""
    p.epoch += 1
    p.batch, p.epoch_loss, p.epoch_elapsed = 0, 0.0, 0.0
    stopping = signals.agreed(job.world.sum([signals.vote()])[0])  # a process may have been signalled in validation
    if job.cfg.train.checkpoint_every:
        _write_checkpoint(job, p, best_state)
    if stopping:
        raise signals.interrupted(job.run, ended)


def _end_contrastive_epoch(job: Job, p: Progress, best_state: dict | None, signals: _Signals, seconds: float) -> None:
    """End of a contrastive epoch: how well nearest training centroids classify validation (the head takes
    no part), a `contrastive_epoch` metrics line, the checkpoint. No best state: the stage prepares the
    sentence vectors; epochs are chosen among the classification ones."""
    p.epoch_seconds.append(seconds)
    vectors = {split: _sentence_vectors(job, split) for split in ("train", "validation")}
    accuracy = contrastive.nearest_centroid_accuracy(
        vectors["train"], torch.as_tensor(job.targets["train"]), vectors["validation"],
        torch.as_tensor(job.targets["validation"]), len(job.dataset.label_names))
    record = {"type": "contrastive_epoch", "epoch": p.epoch, "step": p.step, "train_loss": p.epoch_loss / len(job.tokens["train"]),
              "val_centroid_accuracy": accuracy, "seconds": seconds, "examples_per_second": len(job.tokens["train"]) / seconds}
    _append_metrics(job, p, record)
    log.info("contrastive epoch %d: loss %.4f, validation nearest-centroid accuracy %.4f, %.1f s",
             p.epoch, record["train_loss"], accuracy, seconds)
    _next_epoch(job, p, best_state, signals, f"contrastive epoch {p.epoch}")


def _sentence_vectors(job: Job, split: str) -> torch.Tensor:
    """The pooled sentence vectors (N, H) of a split's in-scope examples, float32, as the head reads them:
    evaluated like `_logits` (eval mode, length-sorted batches under the token budget, autocast)."""
    vectors, _ = features_and_logits(job.model, job.tokens[split], job.pad_id, job.cfg.train.eval_batch_size,
                                     job.device, job.amp, job.max_tokens, len(job.dataset.label_names))
    return torch.from_numpy(vectors)


def _centroid_head(job: Job) -> None:
    """model.head_init=centroids: the head as a nearest-centroid classifier over the training examples'
    sentence vectors as the model now computes them (lorafit.contrastive.centroid_head)."""
    contrastive.centroid_head(job.model, _sentence_vectors(job, "train"), torch.as_tensor(job.targets["train"]),
                              job.cfg.model.head_init_scale)


def _train_head_only(job: Job) -> None:
    """contrastive.then_train=head: every trainable weight outside the head stops training (no gradient:
    AdamW and clipping skip it), so the classification stage fits the head on fixed sentence vectors."""
    head = {id(q) for q in job.model.classifier.parameters()}
    for q in job.model.parameters():
        if id(q) not in head:
            q.requires_grad_(False)


def _log_start(job: Job) -> None:
    """What trains on what, then the header of the per-epoch table."""
    cfg = job.cfg
    trainable, total = count_parameters(job.model)
    log.info(
        "%s on %s: %d train / %d validation / %d test examples, %d labels; %s trainable of %s parameters (%.2f%%) on %s",
        cfg.method.name, cfg.model.name, len(job.tokens["train"]), len(job.tokens["validation"]), len(job.tokens["test"]),
        len(job.dataset.label_names), f"{trainable:,}", f"{total:,}", 100 * trainable / total, job.device,
    )
    log.info("%s", _table_header())


def _progress_bar(job: Job, p: Progress, batches: int) -> tqdm:
    """The epoch's bar, counting optimiser steps (rank 0 only, when train.progress)."""
    cfg = job.cfg
    return tqdm(total=math.ceil(batches / cfg.train.grad_accum), initial=p.batch // cfg.train.grad_accum,
                desc=(f"contrastive epoch {p.epoch}/{cfg.contrastive.epochs}" if _contrastive(job, p) else
                      f"epoch {p.epoch - cfg.contrastive.epochs}/{cfg.train.epochs}"), disable=not (cfg.train.progress and job.world.is_main),
                leave=False, unit="step", dynamic_ncols=True)


def _append_metrics(job: Job, p: Progress, record: dict) -> None:
    """One metrics.jsonl line and the trackers (rank 0). Every process counts it: the count is in `Progress`."""
    p.metrics_lines += 1
    if job.world.is_main:
        job.run.append_metrics(record)
        job.sinks.log(record)


def _no_sync(forward: nn.Module, skip: bool):
    """DDP's no_sync between gradient-accumulation steps (the next backward adds to the local grads)."""
    return forward.no_sync() if skip and hasattr(forward, "no_sync") else contextlib.nullcontext()


@dataclass
class _Signals:
    """SIGINT/SIGTERM caught in any process, acted on by all of them together: the loop finishes its
    step, writes a checkpoint and raises Interrupted."""

    caught: list[int] = field(default_factory=list)  # signals this process received (`_catch_signals`)

    def vote(self) -> float:
        """This process's say in the stop decision, to be summed over processes (world.sum)."""
        return float(bool(self.caught))

    def agreed(self, votes: float) -> bool:
        """Stop when the summed `votes` say any process caught a signal.

        Deciding on the sum, not on `caught`, keeps every process on the same path through the
        checkpoint: a signal landing on one process after the sum waits for the next decision. A process
        that caught nothing itself stops as if sent SIGTERM."""
        if votes and not self.caught:
            self.caught.append(signal.SIGTERM)
        return bool(votes)

    def interrupted(self, run: RunDir, after: str) -> Interrupted:
        """The error to raise once the checkpoint is written; `after`: where the loop stopped."""
        signum = self.caught[0]
        return Interrupted(f"stopped by signal {signal.Signals(signum).name} after {after}; checkpoint saved; "
                           f"resume with: lorafit train --resume {run.path}", signum)


@contextmanager
def _catch_signals():
    """SIGINT/SIGTERM are recorded in the `_Signals` yielded, not raised; the loop decides when to stop."""
    signals = _Signals()
    previous = {}

    def handler(signum, frame):
        signals.caught.append(signum)

    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: leave signals alone
        previous = {}
    try:
        yield signals
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _logits(job: Job, split: str) -> np.ndarray:
    """Logits (N, C) of a split, in split order; data-parallel processes each compute a share."""
    tokens, world = job.tokens[split], job.world
    mine = world.my_examples([len(t) for t in tokens])  # one process: all of them
    part = predict_logits(job.model, [tokens[i] for i in mine], job.pad_id, job.cfg.train.eval_batch_size, job.device,
                          job.amp, job.max_tokens)
    return world.gather_rows(part, mine, len(tokens))


def _finish(job: Job, p: Progress, best_state: dict | None) -> RunResult:
    """The best epoch, on test: eval.json, predictions.json, summary.json and the model card; checkpoints
    are no longer needed."""
    run = job.run
    assert best_state is not None
    job.method.load_state_dict(job.model, best_state)
    logits = _logits(job, "test")  # (N, C)
    job.world.leave(True)  # the last collective: rank 0 writes the rest alone, nobody waits on it
    test = {"split": "test", **classification_metrics(logits, job.targets["test"], job.dataset.label_names)}
    if not job.world.is_main:
        return RunResult(run.path, test, {})
    post = posthoc.fit(job)  # temperature and OOS thresholds, on validation
    posthoc.save(run, post)  # ood.json (+ ood.safetensors: what the deciding score reads at prediction)
    test |= posthoc.evaluate_test(job, post, logits)
    run.write_record(Eval.from_json(test))
    run.write_record(_predictions(job, logits / post.temperature))
    summary = _summary(job, p, test)
    job.sinks.finish(test, summary, p.step)
    run.write_record(summary)
    modelcard.write(run.path)  # README.md, the model card, from the files just written
    checkpoint.remove_all(run.path)
    _log_test(p, test, summary)
    return RunResult(run.path, test, summary.to_json())


def _predictions(job: Job, logits: np.ndarray) -> Predictions:
    """Per-example outcomes, in test-split order: what paired tests between runs (`lorafit compare`) need.
    `logits`: already divided by the run's temperature, so `probability` is the calibrated one; the
    in-scope examples only (out-of-scope ones are scored in eval.json's `ood`)."""
    return Predictions(split="test", target=[int(t) for t in job.targets["test"]],
                       predicted=[int(i) for i in logits.argmax(-1)],
                       probability=[round(float(x), 6) for x in softmax(logits).max(-1)])


def _summary(job: Job, p: Progress, test: dict) -> Summary:
    """summary.json: the run's size, cost, best epoch and test figures, then the method's own (method.summary)."""
    cfg = job.cfg
    trainable, total = count_parameters(job.model)
    train_seconds = float(sum(p.epoch_seconds))
    return Summary(
        method=cfg.method.name,
        model=cfg.model.name,
        trainable_params=trainable,
        total_params=total,
        trainable_percent=100 * trainable / total,
        adapter_bytes=folder_bytes(job.run.path / job.method.artifact),
        train_seconds=train_seconds,
        seconds_per_epoch=train_seconds / len(p.epoch_seconds),
        train_examples_per_second=p.examples_seen / train_seconds,
        peak_memory_mb=peak_memory_mb(job.device),
        allocator=allocator.active(),
        best_epoch=p.best_epoch,
        epochs_run=len(p.epoch_seconds),
        stopped_early=len(p.epoch_seconds) < _last_epoch(cfg),
        best_validation={cfg.train.metric: p.best_value},
        test_accuracy=test["accuracy"],
        test_macro_f1=test["macro_f1"],
        train_label_counts=data.label_counts(job.dataset.splits["train"].labels),
        steps=p.step,
        device=str(job.device),
        autocast=str(job.amp).replace("torch.", "") if job.amp else None,
        threads=torch.get_num_threads(),
        processes=job.world.size,  # data-parallel; peak memory is rank 0's, examples/s all processes'
        cpu_fast_paths=job.fast_paths,
        compute=job.compute,
        skipped_steps=p.skipped_steps,
        versions=_versions(),
        extra=job.method.summary(job.model),  # the method's own figures (AdaLoRA's ranks), after the fields
    )


def _log_test(p: Progress, test: dict, summary: Summary) -> None:
    log.info(
        "test (best epoch %d): accuracy %.4f, macro-F1 %.4f, loss %.4f on %d examples; %.1f s/epoch, %.0f train examples/s",
        p.best_epoch, test["accuracy"], test["macro_f1"], test["loss"], test["examples"],
        summary.seconds_per_epoch, summary.train_examples_per_second,
    )
    for key, value in summary.extra.items():  # the method's figures, as summary.json holds them
        shown = ", ".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else value
        log.info("%s: %s", key, shown)


def _diverged(job: Job, p: Progress, value: float) -> None:
    run, method = job.run, job.method
    kept = (
        f"the last good checkpoint (epoch {p.best_epoch}) is kept in {run.path / method.artifact}"
        if p.best_epoch else "no epoch finished, so there is no checkpoint"
    )
    if job.world.is_main:
        run.append_metrics({"type": "diverged", "step": p.step + 1, "epoch": p.epoch, "loss": str(value)})
    raise UserError(f"loss became {value} at step {p.step + 1} (epoch {p.epoch}); {kept}; lower train.lr or set train.max_grad_norm")


def _table_header() -> str:
    return f"{'epoch':>5} {'train_loss':>10} {'val_loss':>9} {'val_acc':>8} {'val_f1':>8} {'seconds':>8}"


def _table_row(r: dict, improved: bool) -> str:
    return (f"{r['epoch']:>5} {r['train_loss']:>10.4f} {r['val_loss']:>9.4f} {r['val_accuracy']:>8.4f} "
            f"{r['val_macro_f1']:>8.4f} {r['seconds']:>8.1f}{'  *' if improved else ''}")


def _versions() -> dict:
    import peft
    import transformers

    return {
        "lorafit": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "peft": peft.__version__,
    }
