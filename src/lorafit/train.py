"""The one training loop. Reads top to bottom: data -> model -> method -> optimiser -> epochs -> test.

Each epoch: length-grouped batches -> loss (+ the method's extra loss) -> backward -> clip -> step ->
`on_step_end` -> schedule -> log; then validation, best checkpoint and early stopping. The loop never
asks which method runs.
"""

from __future__ import annotations

import logging
import math
import platform
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import get_scheduler

from . import __version__, data
from .config import Config, load_config, resolve_schedule, validate
from .errors import UserError
from .evaluate import classification_metrics
from .inference import predict_logits
from .methods import registry
from .methods.base import AdapterConfig, Method
from .models import build_classifier, find_targets, load_tokenizer
from .rundir import RunDir, folder_bytes
from .runtime import autocast, autocast_dtype, peak_memory_mb, seed_everything, select_device, set_threads

__all__ = ["train", "RunResult", "count_parameters"]

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    path: Path
    eval: dict
    summary: dict


class Diverged(Exception):
    pass


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
    """Save into a sibling temp folder, then swap it in: the previous checkpoint survives a crash."""
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    method.save(model, tmp)
    old = target.with_name(f".{target.name}.old")
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


def train(config: Config | str | Path | dict, out: str | Path, overwrite: bool = False) -> RunResult:
    """Train, keep the best epoch, evaluate it on test; everything lands in the run folder `out`."""
    cfg = _as_config(config)
    run = RunDir(out)
    run.check_new(overwrite)
    set_threads(cfg.train.threads)
    device = select_device(cfg.train.device)
    amp = autocast_dtype(cfg.train, device)

    # -- data: read, clean, split, tokenise once ----------------------------------------------
    dataset, data_cfg = data.load(cfg.data, cfg.seed)
    cfg = cfg.model_copy(update={"data": data_cfg})
    labels = dataset.label_names
    tokenizer = load_tokenizer(cfg.model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tokens = {name: data.tokenize(tokenizer, split.texts, cfg.data.max_length) for name, split in dataset.splits.items()}
    targets = {name: np.array(dataset.label_ids(name)) for name in dataset.splits}

    # -- model and method ---------------------------------------------------------------------
    seed_everything(cfg.seed)
    model = build_classifier(cfg.model, len(labels), cfg.seed)
    method = registry.get(cfg.method.name)(cfg.method)
    adapted = find_targets(model, cfg.method.targets, cfg.method.layers) if isinstance(cfg.method, AdapterConfig) else []
    schedule = resolve_schedule(cfg, len(dataset.splits["train"]))
    model = method.apply(model, adapted, schedule.total_steps)
    model.to(device)
    trainable, total = count_parameters(model)
    optimizer = make_optimizer(model, method, cfg)
    scheduler = get_scheduler(
        "constant_with_warmup" if cfg.train.schedule == "constant" else cfg.train.schedule,
        optimizer,
        num_warmup_steps=schedule.warmup_steps,
        num_training_steps=schedule.total_steps,
    )

    # Everything that can fail on bad input has been checked: only now is the folder created.
    run.create(overwrite)
    run.write_config(cfg, derived=asdict(schedule) | {"adapted_modules": len(adapted)})
    run.write_json("labels.json", labels)
    run.write_json("splits.json", dataset.splits_record() | {"seed": cfg.seed})
    log.info(
        "%s on %s: %d train / %d validation / %d test examples, %d labels; %s trainable of %s parameters (%.2f%%) on %s",
        cfg.method.name, cfg.model.name, len(tokens["train"]), len(tokens["validation"]), len(tokens["test"]),
        len(labels), f"{trainable:,}", f"{total:,}", 100 * trainable / total, device,
    )

    # -- epochs -------------------------------------------------------------------------------
    lengths = [len(t) for t in tokens["train"]]
    step = 0
    best_value: float | None = None
    best_epoch = 0
    best_state: dict | None = None
    stale = 0
    epoch_seconds: list[float] = []
    examples_seen = 0
    history: list[dict] = []
    log.info("%s", _table_header())
    for epoch in range(1, cfg.train.epochs + 1):
        model.train()
        rng = random.Random(cfg.seed * 1000 + epoch)
        batches = data.length_grouped_batches(lengths, cfg.train.batch_size, rng)
        torch.manual_seed(cfg.seed * 1000 + epoch)  # dropout masks repeat per epoch
        bar = tqdm(total=math.ceil(len(batches) / cfg.train.grad_accum), desc=f"epoch {epoch}/{cfg.train.epochs}",
                   disable=not cfg.train.progress, leave=False, unit="step", dynamic_ncols=True)
        started = time.perf_counter()
        epoch_loss = 0.0
        window_loss, window_steps, window_examples, window_start = 0.0, 0, 0, started
        for i, (batch, input_ids, attention_mask) in enumerate(data.iterate(tokens["train"], batches, pad_id)):
            y = torch.as_tensor(targets["train"][batch], device=device)  # (B,)
            with autocast(device, amp):
                logits = model(input_ids.to(device), attention_mask.to(device))  # (B, C)
                loss = F.cross_entropy(logits.float(), y)
                extra = method.extra_loss(model)
                total_loss = loss if extra is None else loss + extra
            if not torch.isfinite(total_loss):
                bar.close()
                _diverged(run, method, step, epoch, float(total_loss.detach()), best_epoch)
            (total_loss / cfg.train.grad_accum).backward()
            epoch_loss += loss.item() * len(batch)
            window_loss += loss.item()
            window_examples += len(batch)
            examples_seen += len(batch)
            last_micro = (i + 1) % cfg.train.grad_accum == 0 or i + 1 == len(batches)
            if not last_micro:
                continue
            if cfg.train.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], cfg.train.max_grad_norm)
            optimizer.step()
            step += 1
            method.on_step_end(model, step)
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            window_steps += 1
            now = time.perf_counter()
            bar.update(1)
            bar.set_postfix(loss=f"{window_loss / (window_steps * cfg.train.grad_accum):.3f}",
                            ex_s=f"{window_examples / max(now - window_start, 1e-9):.0f}", refresh=False)
            if step % cfg.train.log_every == 0:
                run.append_metrics({
                    "type": "step", "step": step, "epoch": epoch,
                    "loss": window_loss / (window_steps * cfg.train.grad_accum),
                    "lr": optimizer.param_groups[0]["lr"],
                    "examples_per_second": window_examples / max(now - window_start, 1e-9),
                })
                window_loss, window_steps, window_examples, window_start = 0.0, 0, 0, now
        bar.close()
        seconds = time.perf_counter() - started
        epoch_seconds.append(seconds)

        val = classification_metrics(
            predict_logits(model, tokens["validation"], pad_id, cfg.train.eval_batch_size, device, amp),
            targets["validation"], labels,
        )
        record = {
            "type": "epoch", "epoch": epoch, "step": step,
            "train_loss": epoch_loss / len(tokens["train"]),
            "val_loss": val["loss"], "val_accuracy": val["accuracy"], "val_macro_f1": val["macro_f1"],
            "seconds": seconds, "examples_per_second": len(tokens["train"]) / seconds,
        }
        run.append_metrics(record)
        history.append(record)
        value = val[cfg.train.metric]
        improved = _better(cfg.train.metric, value, best_value)
        log.info("%s", _table_row(record, improved))
        if improved:
            best_value, best_epoch, stale = value, epoch, 0
            best_state = method.state_dict(model)
            _save_atomic(method, model, run.path / method.artifact)
        else:
            stale += 1
            if cfg.train.patience is not None and stale >= cfg.train.patience:
                log.info("early stop: validation %s did not improve for %d epochs", cfg.train.metric, stale)
                break

    # -- the best epoch, on test --------------------------------------------------------------
    assert best_state is not None
    method.load_state_dict(model, best_state)
    test = classification_metrics(
        predict_logits(model, tokens["test"], pad_id, cfg.train.eval_batch_size, device, amp), targets["test"], labels
    )
    test = {"split": "test", **test}
    run.write_json("eval.json", test)
    train_seconds = float(sum(epoch_seconds))
    summary = {
        "method": cfg.method.name,
        "model": cfg.model.name,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": 100 * trainable / total,
        "adapter_bytes": folder_bytes(run.path / method.artifact),
        "train_seconds": train_seconds,
        "seconds_per_epoch": train_seconds / len(epoch_seconds),
        "train_examples_per_second": examples_seen / train_seconds,
        "peak_memory_mb": peak_memory_mb(device),
        "best_epoch": best_epoch,
        "epochs_run": len(epoch_seconds),
        "stopped_early": len(epoch_seconds) < cfg.train.epochs,
        "best_validation": {cfg.train.metric: best_value},
        "test_accuracy": test["accuracy"],
        "test_macro_f1": test["macro_f1"],
        "steps": step,
        "device": str(device),
        "autocast": str(amp).replace("torch.", "") if amp else None,
        "threads": torch.get_num_threads(),
        "versions": _versions(),
        **method.summary(model),
    }
    run.write_json("summary.json", summary)
    log.info(
        "test (best epoch %d): accuracy %.4f, macro-F1 %.4f, loss %.4f on %d examples; %.1f s/epoch, %.0f train examples/s",
        best_epoch, test["accuracy"], test["macro_f1"], test["loss"], test["examples"],
        summary["seconds_per_epoch"], summary["train_examples_per_second"],
    )
    return RunResult(run.path, test, summary)


def _diverged(run: RunDir, method: Method, step: int, epoch: int, value: float, best_epoch: int) -> None:
    kept = (
        f"the last good checkpoint (epoch {best_epoch}) is kept in {run.path / method.artifact}"
        if best_epoch else "no epoch finished, so there is no checkpoint"
    )
    run.append_metrics({"type": "diverged", "step": step + 1, "epoch": epoch, "loss": str(value)})
    raise UserError(f"loss became {value} at step {step + 1} (epoch {epoch}); {kept}; lower train.lr or set train.max_grad_norm")


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
