"""Everything a run is built from before its first step: the same for a new run and a resumed one.

`prepare(cfg, run, recorded)` reads and tokenises the data, resolves the class weights, builds the classifier, applies the
method, decides how to compute (threads, device, autocast, token budget, CPU fast paths: recorded in
compute.json and reused on resume) and makes the optimiser and schedule; it returns a `Job`, which
the loop in train.py runs. Also here: which parameters weight decay applies to, and the records
that let a resume check it continues on the same data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import get_scheduler

from . import attention_dropout, augment, batching, data, distill, fused_lora, hardware, kernels, methods
from .averaging import WeightAverage
from .config import Config, load_config, resolve, resolve_schedule, validate
from .distributed import World
from .errors import UserError
from .layer_cache import FrozenLayerCache
from .methods.base import Method
from .models import build_classifier, hub_id, load_tokenizer, looks_like_hub_id
from .rundir import Compute, RunDir, Splits
from .runtime import autocast_dtype, seed_everything, select_device, set_threads, token_budget
from .track import Sinks

__all__ = ["Job", "prepare", "as_config", "count_parameters", "decayed_parameters", "make_optimizer", "NO_DECAY_ROLES",
           "splits_record", "check_same_data", "class_weights", "layer_depths"]

log = logging.getLogger(__name__)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total); peft's frozen copy of a saved module is not counted twice."""
    trainable = total = 0
    for name, p in model.named_parameters():
        if ".original_module." in name:
            continue
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


#: Parameters of two or more dimensions that are scales, not weight matrices: AdaLoRA's singular values
#: (lora_E, (r, 1)), IA3's scaling vectors (ia3_l, (out, 1)), DoRA's magnitudes, VeRA's scaling vectors.
NO_DECAY_ROLES = ("lora_E", "ia3_l", "lora_magnitude_vector", "vera_lambda_b", "vera_lambda_d")


def decayed_parameters(model: nn.Module) -> set[int]:
    """ids of the parameters weight decay applies to: weight matrices, chosen by role, not by shape alone.

    Decay pulls a parameter towards 0, which is a prior for weight matrices (and low-rank factors,
    whose product is a weight update), not for biases, norms or the scaling vectors of NO_DECAY_ROLES,
    whatever their number of dimensions: decaying AdaLoRA's singular values shrinks the update, and
    IA3's vectors multiply a layer's output, so decaying them pulls the output to 0.
    """
    return {id(p) for name, p in model.named_parameters()
            if p.ndim >= 2 and not any(role in name.split(".") for role in NO_DECAY_ROLES)}


def make_optimizer(model: nn.Module, method: Method, cfg: Config) -> torch.optim.Optimizer:
    """AdamW with the head at train.head_lr, weight decay on weight matrices only (see decayed_parameters), and
    with train.layer_lr_decay each layer's share of a group at its own rate (`layer_depths`)."""
    head_lr = cfg.train.head_lr if cfg.train.head_lr is not None else cfg.train.lr
    decayed = decayed_parameters(model)
    layer_decay = cfg.train.layer_lr_decay
    depth, top = layer_depths(model) if layer_decay not in (None, 1.0) else ({}, 0)
    groups = []
    for group in method.param_groups(model, cfg.train.lr, head_lr):
        by_depth: dict[int, list] = {}
        for p in group["params"]:
            by_depth.setdefault(depth.get(id(p), top) if group["name"] != "head" else top, []).append(p)
        for d, params in sorted(by_depth.items(), reverse=True):
            name = group["name"] if d == top else f"{group['name']}_layer{d}"
            lr = group["lr"] * layer_decay ** (top - d) if d != top else group["lr"]
            groups += [
                {"params": [p for p in params if id(p) in decayed], "lr": lr, "weight_decay": cfg.train.weight_decay,
                 "name": name},
                {"params": [p for p in params if id(p) not in decayed], "lr": lr, "weight_decay": 0.0,
                 "name": f"{name}_no_decay"},
            ]
    return torch.optim.AdamW([g for g in groups if g["params"]])


_LAYER = re.compile(r"\.(?:layer|layers|h|block)\.(\d+)\.")


def layer_depths(model: nn.Module) -> tuple[dict[int, int], int]:
    """({id(parameter): depth}, top) for train.layer_lr_decay: the embeddings 0, encoder layer k (the k in
    `...layer.k.`, from 0) depth k + 1, and everything else (pooler, head) the top, L + 1 for L layers."""
    named = list(model.named_parameters())
    indices = {name: int(m.group(1)) for name, _ in named if (m := _LAYER.search(name))}
    top = max(indices.values(), default=-1) + 2
    depth = {}
    for name, p in named:
        if name in indices:
            depth[id(p)] = indices[name] + 1
        elif ".embeddings." in f".{name}":
            depth[id(p)] = 0
    return depth, top


def as_config(config: Config | str | Path | dict) -> Config:
    if isinstance(config, Config):
        return config
    if isinstance(config, dict):
        return validate(config)
    return load_config(config)


@dataclass
class Job:
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
    scaler: torch.amp.GradScaler  # fp16 loss scaling; disabled (a pass-through) in every other precision
    compute: Compute  # how this run computes (threads, token budget, kernels): compute.json, reused on --resume
    oos_tokens: dict[str, list[list[int]]]  # out-of-scope examples of validation and test (set apart from `tokens`)
    sinks: Sinks | None = None  # the experiment trackers, opened when training starts
    class_weights: np.ndarray | None = None  # (C,) float64, train.class_weights resolved; None: every example weighs 1
    resolved: dict | None = None  # {dotted key: value} of the settings config.resolve made concrete (auto, null)
    average: WeightAverage | None = None  # train.ema's moving average of the trainable weights; None: off
    pretrained: nn.Module | None = None  # the base encoder without the method, built when an OOS score reads it
    teacher: torch.Tensor | None = None  # (N_train, C) float32 distill.teacher's logits on the training texts; None: off
    layer_cache: FrozenLayerCache | None = None  # train.cache_frozen_layers: built when training starts; None: off


def prepare(cfg: Config, run: RunDir, recorded: Compute | None = None, teacher: str = "compute",
            resumed: bool = False) -> Job:
    """Everything before the first step. `recorded`: the compute.json of the run being resumed, whose
    threads, token budget and CPU kernels are reused so the continuation computes as the start did.
    `teacher` (distill.teacher's logits, `distill.teacher_logits`): "compute" for a new run, "load" the
    saved ones for a resume, "skip" where nothing trains. `resumed`: a continuation (whose `recorded` is None
    where the run predates compute.json), which keeps the batch order it began with."""
    world = World.from_env()
    if world.size > 1 and cfg.contrastive.epochs:
        raise UserError("contrastive.epochs: the contrastive stage runs in one process (its loss compares the pairs "
                        "of a whole batch); train without torchrun, or set contrastive.epochs=0")
    set_threads((recorded and recorded.threads) or cfg.train.threads or world.threads())
    device = world.join(select_device(cfg.train.device))
    if not world.is_main:
        logging.getLogger("lorafit").setLevel(logging.WARNING)  # rank 0 tells the story
    amp = autocast_dtype(cfg.train, device)

    # -- data: read, clean, split, tokenise once ----------------------------------------------
    dataset, data_cfg = data.load(cfg.data, cfg.seed)
    tokenizer = load_tokenizer(cfg.model)  # a bad model.name fails before minutes of augmentation
    dataset = augment.apply(dataset, cfg.data.augment, cfg.seed, str(device), cfg.train.progress and world.is_main)  # train only
    cfg = cfg.model_copy(update={"data": data_cfg})
    cfg, resolved = resolve(cfg, len(dataset.splits["train"]))  # train.epochs=auto, null learning rates
    weights = class_weights(cfg.train.class_weights, dataset.label_names, dataset.label_ids("train"))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tokens = {name: batching.tokenize(tokenizer, split.texts, cfg.data.max_length) for name, split in dataset.splits.items()}
    targets = {name: np.array(dataset.label_ids(name)) for name in dataset.splits}
    if cfg.ood.score in ("knn", "base_knn", "hybrid") and cfg.ood.k > len(targets["train"]):
        raise UserError(f"ood.k={cfg.ood.k}: the {cfg.ood.score} score needs at least k training examples, there are "
                        f"{len(targets['train'])}; lower ood.k")
    # Out-of-scope examples (target -1) of validation and test are set apart: the loop's metrics are
    # in-scope classification; the OOS ones are scored after training (lorafit.ood).
    oos_tokens = {}
    for name in ("validation", "test"):
        oos = targets[name] < 0
        oos_tokens[name] = [t for t, o in zip(tokens[name], oos) if o]
        tokens[name] = [t for t, o in zip(tokens[name], oos) if not o]
        targets[name] = targets[name][~oos]

    # The teacher runs before the seed is set: building it draws no random numbers the run would see.
    teacher_logits = distill.teacher_logits(cfg.distill, dataset, run, teacher, world, device)

    # -- model and method ---------------------------------------------------------------------
    seed_everything(cfg.seed)
    model = build_classifier(cfg.model, len(dataset.label_names), cfg.seed)
    method = methods.build(cfg.method)
    schedule = resolve_schedule(cfg, len(dataset.splits["train"]))
    model = method.apply(model, total_steps=schedule.total_steps)
    model.to(device)
    # Checked here, before the run folder exists; the states themselves are computed when training starts.
    layer_cache = FrozenLayerCache(model) if cfg.train.cache_frozen_layers else None
    fast, kernel_choice = cpu_kernels(cfg, model, device, world, recorded.cpu_kernels if recorded else None)
    if fast:
        log.info("CPU fast paths: %s", ", ".join(f"{k} x{v}" for k, v in fast.items()))
    kept = recorded is not None and "max_batch_tokens" not in recorded.absent  # a run of an older version may lack it
    max_tokens = recorded.max_batch_tokens if kept else token_budget(cfg.train.max_batch_tokens, device)
    order = _batch_order(recorded, resumed)
    compute = Compute(device=str(device), threads=torch.get_num_threads(), processes=world.size, max_batch_tokens=max_tokens,
                      autocast=str(amp).replace("torch.", "") if amp else None, cpu_kernels=kernel_choice,
                      base_model=base_model_record(cfg.model.name), batch_order=order)
    forward = world.wrap(model, device)
    optimizer = make_optimizer(model, method, cfg)
    scheduler = get_scheduler(
        "constant_with_warmup" if cfg.train.schedule == "constant" else cfg.train.schedule,
        optimizer,
        num_warmup_steps=schedule.warmup_steps,
        num_training_steps=schedule.total_steps,
    )
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    return Job(cfg, run, device, amp, dataset, tokens, targets, pad_id, model, method, optimizer, scheduler, schedule,
                method.adapted, world, forward, fast, max_tokens, scaler, compute, oos_tokens, class_weights=weights,
               resolved=resolved, average=WeightAverage(model, cfg.train.ema) if cfg.train.ema is not None else None,
               teacher=None if teacher_logits is None else torch.from_numpy(teacher_logits).to(device), layer_cache=layer_cache)


def _batch_order(recorded: Compute | None, resumed: bool) -> str:
    """The training batches' order: a new run's, or the one a resumed run began with -- shuffled batches for a run
    whose compute.json lacks batch_order, or that has no compute.json (both older than the length-run order)."""
    if not resumed:
        return batching.BATCH_ORDER
    order = batching.OLD_BATCH_ORDER if recorded is None or "batch_order" in recorded.absent else recorded.batch_order
    if order not in (batching.BATCH_ORDER, batching.OLD_BATCH_ORDER):
        raise UserError(f"compute.json records batch_order {order!r}, which this lorafit does not know (a newer "
                        f"version's run?): resume it with the lorafit that started it")
    return order


def class_weights(setting: str | dict[str, float], label_names: list[str], train_ids: list[int]) -> np.ndarray | None:
    """train.class_weights as one weight per class (C,), or None for none.

    balanced: n / (n_classes * count of the class) over the training split, sklearn's "balanced" (a class
    without training examples, which no training loss sees, keeps 1). A mapping names labels; the
    others weigh 1, and a name the training data lacks is refused before any work.
    """
    if setting == "none":
        return None
    if setting == "balanced":
        counts = np.bincount(np.asarray(train_ids, dtype=np.int64), minlength=len(label_names))
        present = counts > 0
        weights = np.ones(len(label_names))
        weights[present] = len(train_ids) / (int(present.sum()) * counts[present])
        return weights
    assert isinstance(setting, dict)
    unknown = [name for name in setting if name not in label_names]
    if unknown:
        shown = ", ".join(repr(name) for name in unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        labels = ", ".join(label_names[:30]) + (f" and {len(label_names) - 30} more" if len(label_names) > 30 else "")
        raise UserError(f"train.class_weights names labels the training data does not have: {shown}; its labels are: {labels}")
    return np.array([setting.get(name, 1.0) for name in label_names], dtype=np.float64)


def base_model_record(name: str) -> dict:
    """The base model by the name other machines know it by, decided here, where `name` was resolved:
    later readers (the model card, push) may run elsewhere, where a relative folder means something else."""
    hub = hub_id(name)
    return {"name": name, "hub_id": hub, "on_hub": hub != name or (looks_like_hub_id(name) and not Path(name).expanduser().exists())}


def cpu_kernels(cfg: Config, model: nn.Module, device: torch.device, world: World,
                 recorded: dict | None) -> tuple[dict[str, int], dict]:
    """Switch `model` to the CPU fast paths train.cpu_kernels asks for; (layers switched, the decision).

    auto times oneDNN against PyTorch's linear on this host (kernels.decide) -- unless the run is being
    resumed, when the choice recorded at its start is reused: the two paths differ in float summation
    order, so a continuation that picked the other one would not end where the uninterrupted run does.
    Data-parallel processes all take rank 0's decision.
    """
    if device.type != "cpu" or cfg.train.cpu_kernels == "stock":
        why = "not a CPU run" if device.type != "cpu" else "train.cpu_kernels=stock"
        return {}, {"onednn_linear": False, "fast_dropout": False, "fused_lora": False, "shared_lora_inputs": False,
                    "attention_dropout": False, "dropout_draw": None, "reason": why,
                    "cpu": hardware.cpu_info()}
    if cfg.train.cpu_kernels == "onednn":
        decision = {"onednn_linear": True, "reason": "train.cpu_kernels=onednn"}
    elif recorded is not None:
        decision = recorded
    else:
        decision = world.gather_objects(kernels.decide(torch.get_num_threads()) if world.is_main else None)[0]
    paths = kernels.use_fast_paths(model, device, onednn=bool(decision["onednn_linear"]))
    # A run started before the fused LoRA linear existed resumes without it (its summation order).
    # Sharing a layer input's cast and dropout mask (query, key, value) began later still: a run recorded
    # without it resumes drawing one mask per linear.
    if recorded is None or recorded.get("fused_lora"):
        fused_lora.use_fused_lora(model, paths, share_inputs=recorded is None or bool(recorded.get("shared_lora_inputs")))
    # ... and one started before today's dropout draws keeps drawing its masks as it began: int64 (torch's
    # generator, before the PCG64 draws) or, with no draw recorded (before the 64-bit draws), int32.
    dropout = kernels.FastDropout
    if recorded is not None and "fast_dropout" in paths.counts:
        recorded_draw = recorded.get("dropout_draw") or "int32"
        if recorded_draw not in kernels.DROPOUT_BY_DRAW:
            raise UserError(f"this run's compute.json records dropout draws {recorded_draw!r}, which this lorafit does not know "
                            f"(it knows {', '.join(kernels.DROPOUT_BY_DRAW)}): resume it with the lorafit version that started it")
        replay = kernels.DROPOUT_BY_DRAW[recorded_draw]
        if replay is not dropout:
            paths.switch(model, "fast_dropout", dropout, replay)
            dropout = replay
    # Attention probabilities drop out by the same masks, where the draw is today's (older runs: SDPA's).
    if dropout is kernels.FastDropout and "fast_dropout" in paths.counts:
        attention_dropout.use_attention_dropout(model, paths)
    fast = paths.counts
    draw = dropout.draw if "fast_dropout" in fast else None
    choice = {**decision, "onednn_linear": "onednn_linear" in fast, "fast_dropout": "fast_dropout" in fast,
              "fused_lora": "fused_lora" in fast, "shared_lora_inputs": "shared_lora_inputs" in fast,
              "attention_dropout": bool(fast.get("attention_dropout")), "dropout_draw": draw}
    return fast, {"cpu": hardware.cpu_info(), **choice}


def splits_record(job: Job) -> Splits:
    """splits.json: every split's source rows, the seed, and a sha256 of what the rows hold (so a
    resume notices edited texts or labels, not only moved rows)."""
    content = {name: hashlib.sha256(json.dumps([split.texts, split.labels], ensure_ascii=False).encode("utf-8")).hexdigest()
               for name, split in job.dataset.splits.items()}
    return Splits.from_json(job.dataset.splits_record() | {"seed": job.cfg.seed, "content_sha256": content})


def check_same_data(job: Job, run: RunDir) -> None:
    """Resume only onto the data the run started with: every split's rows and content, and the labels."""
    then = run.splits().to_json()
    now = splits_record(job).to_json()
    # "source" is where the data was read from: a moved mirror holding the same rows is fine.
    changed = [f"{key} rows" if key in job.dataset.splits else key for key in sorted(set(then) | set(now))
               if key not in ("source", "content_sha256") and then.get(key) != now.get(key)]
    then_content, now_content = then.get("content_sha256", {}), now["content_sha256"]
    changed += [f"{name} texts or labels" for name in now_content if name in then_content and then_content[name] != now_content[name]]
    if run.read_json("labels.json") != job.dataset.label_names:
        changed.append("label names")
    if changed:
        raise UserError(f"the data changed since {run.path} started ({', '.join(changed)}); "
                        "cannot resume it exactly: restore the data or start a new run")
