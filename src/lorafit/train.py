"""The one training loop. Reads top to bottom: data -> model -> method -> optimiser -> epochs -> test.

Each epoch: length-grouped batches -> loss (+ the method's extra loss) -> backward -> clip -> step ->
`on_step_end` -> schedule -> log; then validation, best checkpoint and early stopping. The loop never
asks which method runs. Everything the loop knows lives in `Progress`, so a checkpoint (weights,
optimiser, scheduler, RNG states and `Progress`) lets `resume` continue bit for bit.
"""

from __future__ import annotations

import contextlib
import logging
import math
import platform
import random
import shutil
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
from transformers import get_scheduler

from . import __version__, checkpoint, data, kernels
from .distributed import World
from .track import Sinks, open_sinks
from .config import Config, load_config, resolve_schedule, validate
from .errors import UserError
from .evaluate import classification_metrics, softmax
from .inference import predict_logits
from .methods import registry
from .methods.base import AdapterConfig, Method
from .models import build_classifier, find_targets, load_tokenizer
from .rundir import RunDir, folder_bytes
from .runtime import autocast, autocast_dtype, peak_memory_mb, seed_everything, select_device, set_threads, token_budget

__all__ = ["train", "resume", "RunResult", "Interrupted", "count_parameters"]

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
    window_steps: int = 0
    window_examples: int = 0
    metrics_lines: int = 0  # metrics.jsonl lines written, so a resume drops lines from after the checkpoint


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total); peft's frozen copy of a saved module is not counted twice."""
    trainable = total = 0
    for name, p in model.named_parameters():
        if ".original_module." in name:
            continue
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def make_optimizer(model: nn.Module, method: Method, cfg: Config) -> torch.optim.Optimizer:
    """AdamW with the head at train.head_lr, and no weight decay on biases and norms."""
    head_lr = cfg.train.head_lr if cfg.train.head_lr is not None else cfg.train.lr
    groups = []
    for group in method.param_groups(model, cfg.train.lr, head_lr):
        decay = [p for p in group["params"] if p.ndim >= 2]
        no_decay = [p for p in group["params"] if p.ndim < 2]
        groups += [
            {"params": decay, "lr": group["lr"], "weight_decay": cfg.train.weight_decay, "name": group["name"]},
            {"params": no_decay, "lr": group["lr"], "weight_decay": 0.0, "name": f"{group['name']}_no_decay"},
        ]
    return torch.optim.AdamW([g for g in groups if g["params"]])


def _better(metric: str, value: float, best: float | None) -> bool:
    if best is None:
        return True
    return value < best if metric == "loss" else value > best


def _save_atomic(method: Method, model: nn.Module, target: Path) -> None:
    """Save into a sibling temp folder, then swap it in: the previous artifact survives a crash."""
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    method.save(model, tmp)
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def _as_config(config: Config | str | Path | dict) -> Config:
    if isinstance(config, Config):
        return config
    if isinstance(config, dict):
        return validate(config)
    return load_config(config)


@dataclass
class _Job:
    """Everything built before the first step; the same for a fresh run and a resumed one."""

    cfg: Config
    run: RunDir
    device: torch.device
    amp: torch.dtype | None
    dataset: data.Dataset
    tokens: dict[str, list[list[int]]]
    targets: dict[str, np.ndarray]
    pad_id: int
    model: nn.Module
    method: Method
    optimizer: torch.optim.Optimizer
    scheduler: object
    schedule: object
    adapted: list[str]
    world: World  # this process among the data-parallel ones (size 1: a plain run)
    forward: nn.Module  # what training steps call: the model, or DDP around it
    fast_paths: dict[str, int]  # CPU fast paths in use: layers switched, by kind (lorafit/kernels.py)
    max_tokens: int | None  # padded tokens per forward pass (train.max_batch_tokens for this device)
    sinks: Sinks | None = None  # the experiment trackers, opened when training starts


def _prepare(cfg: Config, run: RunDir) -> _Job:
    world = World.from_env()
    set_threads(cfg.train.threads or world.threads())
    device = world.join(select_device(cfg.train.device))
    if not world.is_main:
        logging.getLogger("lorafit").setLevel(logging.WARNING)  # rank 0 tells the story
    amp = autocast_dtype(cfg.train, device)

    # -- data: read, clean, split, tokenise once ----------------------------------------------
    dataset, data_cfg = data.load(cfg.data, cfg.seed)
    cfg = cfg.model_copy(update={"data": data_cfg})
    tokenizer = load_tokenizer(cfg.model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tokens = {name: data.tokenize(tokenizer, split.texts, cfg.data.max_length) for name, split in dataset.splits.items()}
    targets = {name: np.array(dataset.label_ids(name)) for name in dataset.splits}

    # -- model and method ---------------------------------------------------------------------
    seed_everything(cfg.seed)
    model = build_classifier(cfg.model, len(dataset.label_names), cfg.seed)
    method = registry.get(cfg.method.name)(cfg.method)
    adapted = find_targets(model, cfg.method.targets, cfg.method.layers) if isinstance(cfg.method, AdapterConfig) else []
    schedule = resolve_schedule(cfg, len(dataset.splits["train"]))
    model = method.apply(model, adapted, schedule.total_steps)
    model.to(device)
    fast = kernels.speed_up(model, device) if cfg.train.cpu_kernels == "auto" else {}
    if fast:
        log.info("CPU fast paths: %s", ", ".join(f"{k} x{v}" for k, v in fast.items()))
    forward = world.wrap(model, device)
    optimizer = make_optimizer(model, method, cfg)
    scheduler = get_scheduler(
        "constant_with_warmup" if cfg.train.schedule == "constant" else cfg.train.schedule,
        optimizer,
        num_warmup_steps=schedule.warmup_steps,
        num_training_steps=schedule.total_steps,
    )
    return _Job(cfg, run, device, amp, dataset, tokens, targets, pad_id, model, method, optimizer, scheduler, schedule,
                adapted, world, forward, fast, token_budget(cfg.train.max_batch_tokens, device))


def train(config: Config | str | Path | dict, out: str | Path, overwrite: bool = False) -> RunResult:
    """Train, keep the best epoch, evaluate it on test; everything lands in the run folder `out`."""
    cfg = _as_config(config)
    run = RunDir(out)
    run.check_new(overwrite)
    job = _prepare(cfg, run)
    job.world.barrier()  # every process has checked the folder before rank 0 creates it
    # Everything that can fail on bad input has been checked: only now is the folder created.
    if job.world.is_main:
        run.create(overwrite)
        run.write_config(job.cfg, derived=asdict(job.schedule) | {"adapted_modules": len(job.adapted)})
        run.write_json("labels.json", job.dataset.label_names)
        run.write_json("splits.json", job.dataset.splits_record() | {"seed": job.cfg.seed})
    return _run(job, Progress())


def resume(run_dir: str | Path) -> RunResult:
    """Continue a run from its newest checkpoint; ends as the uninterrupted run would have."""
    run = RunDir(run_dir)
    cfg = run.config()
    latest = checkpoint.latest(run.path)
    if latest is None:
        if (run.path / "summary.json").is_file():
            raise UserError(f"{run.path} already finished (summary.json exists); nothing to resume")
        raise UserError(f"{run.path} has no checkpoint to resume from (train.checkpoint_every may be off)")
    job = _prepare(cfg, run)
    if job.dataset.splits_record()["train"] != run.read_json("splits.json")["train"]:
        raise UserError(f"the training data changed since {run.path} started; cannot resume it exactly")
    tensors, meta = checkpoint.load(latest)
    job.method.load_state_dict(job.model, {k[6:]: v for k, v in tensors.items() if k.startswith("model/")})
    job.method.load_checkpoint_state(job.model, {k[7:]: v for k, v in tensors.items() if k.startswith("method/")}, meta["method"])
    checkpoint.optimizer_from_flat(job.optimizer, tensors, meta["optimizer"])
    job.scheduler.load_state_dict(meta["scheduler"])
    checkpoint.restore_rng(tensors, meta["rng"])
    progress = Progress(**meta["progress"])
    best = {k[5:]: v for k, v in tensors.items() if k.startswith("best/")}
    job.world.barrier()  # every process has read the checkpoint before rank 0 touches the folder
    if job.world.is_main:
        lines = (run.path / "metrics.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
        (run.path / "metrics.jsonl").write_text("".join(lines[: progress.metrics_lines]), encoding="utf-8")
    log.info("resuming %s from %s (epoch %d, step %d)", run.path, latest.name, progress.epoch, progress.step)
    return _run(job, progress, best or None)


def _write_checkpoint(job: _Job, progress: Progress, best_state: dict | None) -> None:
    if not job.world.is_main:
        return
    if job.sinks is not None:
        job.sinks.flush()
    tensors = {f"model/{k}": v for k, v in job.method.state_dict(job.model).items()}
    if best_state is not None:
        tensors |= {f"best/{k}": v for k, v in best_state.items()}
    method_tensors, method_meta = job.method.checkpoint_state(job.model)
    tensors |= {f"method/{k}": v for k, v in method_tensors.items()}
    opt_tensors, opt_meta = checkpoint.optimizer_to_flat(job.optimizer)
    rng_tensors, rng_meta = checkpoint.capture_rng()
    meta = {
        "progress": asdict(progress), "optimizer": opt_meta, "scheduler": job.scheduler.state_dict(),
        "rng": rng_meta, "method": method_meta,
    }
    checkpoint.save(job.run.path, progress.step, tensors | opt_tensors | rng_tensors, meta, job.cfg.train.keep_checkpoints)


def _no_sync(forward: nn.Module, skip: bool):
    """DDP's no_sync between gradient-accumulation steps (the next backward adds to the local grads)."""
    return forward.no_sync() if skip and hasattr(forward, "no_sync") else contextlib.nullcontext()


@contextmanager
def _catch_signals():
    """SIGINT/SIGTERM set a flag; the loop finishes its step, checkpoints and stops."""
    caught: list[int] = []
    previous = {}

    def handler(signum, frame):
        caught.append(signum)

    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: leave signals alone
        previous = {}
    try:
        yield caught
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _run(job: _Job, p: Progress, best_state: dict | None = None) -> RunResult:
    job.sinks = open_sinks(job.cfg, job.run.path, resume_step=p.step or None) if job.world.is_main else Sinks([], {})
    finished = False
    try:
        result = _train_and_finish(job, p, best_state)
        finished = True
        return result
    finally:
        job.sinks.close(finished)
        job.world.leave()


def _train_and_finish(job: _Job, p: Progress, best_state: dict | None) -> RunResult:
    try:
        with _catch_signals() as caught:
            best_state = _epochs(job, p, best_state, caught)
    except OSError as e:
        latest = checkpoint.latest(job.run.path)
        kept = f"the last checkpoint ({latest.name}) is intact" if latest else "no checkpoint was written yet"
        raise UserError(
            f"cannot write to {job.run.path}: {e.strerror or e}; {kept}; free space or fix permissions, "
            f"then resume with: lorafit train --resume {job.run.path}"
        ) from None
    return _finish(job, p, best_state)


def _epochs(job: _Job, p: Progress, best_state: dict | None, caught: list[int]) -> dict | None:
    cfg, run, model, method, optimizer, scheduler = job.cfg, job.run, job.model, job.method, job.optimizer, job.scheduler
    device, amp = job.device, job.amp
    trainable, total = count_parameters(model)
    log.info(
        "%s on %s: %d train / %d validation / %d test examples, %d labels; %s trainable of %s parameters (%.2f%%) on %s",
        cfg.method.name, cfg.model.name, len(job.tokens["train"]), len(job.tokens["validation"]), len(job.tokens["test"]),
        len(job.dataset.label_names), f"{trainable:,}", f"{total:,}", 100 * trainable / total, device,
    )
    lengths = [len(t) for t in job.tokens["train"]]
    log.info("%s", _table_header())

    world = job.world

    def append(record: dict) -> None:
        p.metrics_lines += 1
        if world.is_main:
            run.append_metrics(record)
            job.sinks.log(record)

    while p.epoch <= cfg.train.epochs and not p.stopped:
        model.train()
        batches = data.length_grouped_batches(lengths, cfg.train.batch_size, random.Random(cfg.seed * 1000 + p.epoch))
        if p.batch == 0:
            torch.manual_seed(cfg.seed * 1000 + p.epoch + 7919 * world.rank)  # dropout masks repeat per epoch
        steps_in_epoch = math.ceil(len(batches) / cfg.train.grad_accum)
        bar = tqdm(total=steps_in_epoch, initial=p.batch // cfg.train.grad_accum, desc=f"epoch {p.epoch}/{cfg.train.epochs}",
                   disable=not (cfg.train.progress and world.is_main), leave=False, unit="step", dynamic_ncols=True)
        started = time.perf_counter() - p.epoch_elapsed
        window_start = time.perf_counter()
        for i in range(p.batch, len(batches)):
            batch = batches[i]
            mine, weight = world.shard(batch)  # a single process: the whole batch, weight 1 / len(batch)
            boundary = (i + 1) % cfg.train.grad_accum == 0 or i + 1 == len(batches)
            # Pieces of at most max_batch_tokens padded tokens; their gradients add up to the slice's.
            pieces = data.split_by_tokens(mine, lengths, job.max_tokens)
            mine_loss, extra = 0.0, None
            for k, piece in enumerate(pieces):
                input_ids, attention_mask = data.collate([job.tokens["train"][j] for j in piece], job.pad_id)  # (b, T)
                y = torch.as_tensor(job.targets["train"][piece], device=device)  # (b,)
                # DDP all-reduces on the step's last backward only (no_sync must cover forward and backward).
                with _no_sync(job.forward, not (boundary and k == len(pieces) - 1)):
                    with autocast(device, amp):
                        logits = job.forward(input_ids.to(device), attention_mask.to(device))  # (b, C)
                        loss_sum = F.cross_entropy(logits.float(), y, label_smoothing=cfg.train.label_smoothing,
                                                   reduction="sum")
                        loss = loss_sum * weight  # the global batch's mean, once summed over pieces and processes
                        if k == 0:  # a method's penalty on the weights counts once per batch
                            extra = method.extra_loss(model)
                            loss = loss if extra is None else loss + extra
                    (loss / cfg.train.grad_accum).backward()
                mine_loss += float(loss_sum.detach())
            # The global batch's mean loss; a signal caught by any process stops them all at this step.
            summed, stop = world.sum([mine_loss if weight else 0.0, float(bool(caught))])
            batch_loss = summed / len(batch)
            if stop and not caught:
                caught.append(signal.SIGTERM)
            if not math.isfinite(batch_loss) or (extra is not None and not torch.isfinite(extra)):
                bar.close()
                _diverged(job, p, batch_loss if not math.isfinite(batch_loss) else float(extra.detach()))
            p.epoch_loss += batch_loss * len(batch)
            p.window_loss += batch_loss
            p.window_examples += len(batch)
            p.examples_seen += len(batch)
            p.batch = i + 1
            if not boundary:
                continue
            if cfg.train.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_([q for g in optimizer.param_groups for q in g["params"]], cfg.train.max_grad_norm)
            optimizer.step()
            p.step += 1
            method.on_step_end(model, p.step)
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            p.window_steps += 1
            bar.update(1)
            now = time.perf_counter()
            rate = p.window_examples / max(now - window_start, 1e-9)
            bar.set_postfix(loss=f"{p.window_loss / (p.window_steps * cfg.train.grad_accum):.3f}", ex_s=f"{rate:.0f}", refresh=False)
            if p.step % cfg.train.log_every == 0:
                append({"type": "step", "step": p.step, "epoch": p.epoch,
                        "loss": p.window_loss / (p.window_steps * cfg.train.grad_accum),
                        "lr": optimizer.param_groups[0]["lr"], "examples_per_second": rate})
                p.window_loss, p.window_steps, p.window_examples, window_start = 0.0, 0, 0, now
            p.epoch_elapsed = now - started
            if caught or (cfg.train.checkpoint_every and p.step % cfg.train.checkpoint_every == 0 and p.batch < len(batches)):
                _write_checkpoint(job, p, best_state)
            if caught:
                bar.close()
                raise Interrupted(
                    f"stopped by signal {signal.Signals(caught[0]).name} after step {p.step} (epoch {p.epoch}); "
                    f"checkpoint saved; resume with: lorafit train --resume {run.path}", caught[0])
        bar.close()
        seconds = time.perf_counter() - started
        p.epoch_seconds.append(seconds)

        val = classification_metrics(_logits(job, "validation"), job.targets["validation"], job.dataset.label_names)
        record = {
            "type": "epoch", "epoch": p.epoch, "step": p.step, "train_loss": p.epoch_loss / len(job.tokens["train"]),
            "val_loss": val["loss"], "val_accuracy": val["accuracy"], "val_macro_f1": val["macro_f1"],
            "seconds": seconds, "examples_per_second": len(job.tokens["train"]) / seconds,
        }
        append(record)
        value = val[cfg.train.metric]
        improved = _better(cfg.train.metric, value, p.best_value)
        log.info("%s", _table_row(record, improved))
        if improved:
            p.best_value, p.best_epoch, p.stale = value, p.epoch, 0
            best_state = method.state_dict(model)
            if world.is_main:
                _save_atomic(method, model, run.path / method.artifact)
        else:
            p.stale += 1
            if cfg.train.patience is not None and p.stale >= cfg.train.patience:
                log.info("early stop: validation %s did not improve for %d epochs", cfg.train.metric, p.stale)
                p.stopped = True
        p.epoch += 1
        p.batch, p.epoch_loss, p.epoch_elapsed = 0, 0.0, 0.0
        if world.sum([float(bool(caught))])[0] and not caught:
            caught.append(signal.SIGTERM)  # another process was signalled during validation
        if cfg.train.checkpoint_every:
            _write_checkpoint(job, p, best_state)
        if caught:
            raise Interrupted(f"stopped by signal {signal.Signals(caught[0]).name} after epoch {p.epoch - 1}; "
                              f"checkpoint saved; resume with: lorafit train --resume {run.path}", caught[0])
    return best_state


def _logits(job: _Job, split: str) -> np.ndarray:
    """Logits (N, C) of a split, in split order; data-parallel processes each compute a share."""
    tokens, world = job.tokens[split], job.world
    mine = world.my_examples([len(t) for t in tokens])  # one process: all of them
    part = predict_logits(job.model, [tokens[i] for i in mine], job.pad_id, job.cfg.train.eval_batch_size, job.device,
                          job.amp, job.max_tokens)
    return world.gather_rows(part, mine, len(tokens))


def _finish(job: _Job, p: Progress, best_state: dict | None) -> RunResult:
    """The best epoch, on test; summary.json; checkpoints are no longer needed."""
    cfg, run, model, method = job.cfg, job.run, job.model, job.method
    assert best_state is not None
    method.load_state_dict(model, best_state)
    logits = _logits(job, "test")  # (N, C)
    test = {"split": "test", **classification_metrics(logits, job.targets["test"], job.dataset.label_names)}
    if not job.world.is_main:
        return RunResult(run.path, test, {})
    run.write_json("eval.json", test)
    # Per-example outcomes, in test-split order: what paired tests between runs (`lorafit compare`) need.
    run.write_json("predictions.json", {
        "split": "test",
        "target": [int(t) for t in job.targets["test"]],
        "predicted": [int(i) for i in logits.argmax(-1)],
        "probability": [round(float(p), 6) for p in softmax(logits).max(-1)],
    })
    trainable, total = count_parameters(model)
    train_seconds = float(sum(p.epoch_seconds))
    summary = {
        "method": cfg.method.name,
        "model": cfg.model.name,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": 100 * trainable / total,
        "adapter_bytes": folder_bytes(run.path / method.artifact),
        "train_seconds": train_seconds,
        "seconds_per_epoch": train_seconds / len(p.epoch_seconds),
        "train_examples_per_second": p.examples_seen / train_seconds,
        "peak_memory_mb": peak_memory_mb(job.device),
        "best_epoch": p.best_epoch,
        "epochs_run": len(p.epoch_seconds),
        "stopped_early": len(p.epoch_seconds) < cfg.train.epochs,
        "best_validation": {cfg.train.metric: p.best_value},
        "test_accuracy": test["accuracy"],
        "test_macro_f1": test["macro_f1"],
        "train_label_counts": data.label_counts(job.dataset.splits["train"].labels),
        "steps": p.step,
        "device": str(job.device),
        "autocast": str(job.amp).replace("torch.", "") if job.amp else None,
        "threads": torch.get_num_threads(),
        "processes": job.world.size,  # data-parallel; peak memory is rank 0's, examples/s all processes'
        "cpu_fast_paths": job.fast_paths,
        "versions": _versions(),
    }
    method_summary = method.summary(model)
    summary.update(method_summary)
    job.sinks.finish(test, summary, p.step)
    run.write_json("summary.json", summary)
    checkpoint.remove_all(run.path)
    log.info(
        "test (best epoch %d): accuracy %.4f, macro-F1 %.4f, loss %.4f on %d examples; %.1f s/epoch, %.0f train examples/s",
        p.best_epoch, test["accuracy"], test["macro_f1"], test["loss"], test["examples"],
        summary["seconds_per_epoch"], summary["train_examples_per_second"],
    )
    for key, value in method_summary.items():
        shown = ", ".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else value
        log.info("%s: %s", key, shown)
    return RunResult(run.path, test, summary)


def _diverged(job: _Job, p: Progress, value: float) -> None:
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
