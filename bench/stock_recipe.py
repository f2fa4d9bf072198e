"""The stock Hugging Face recipe, as practitioners write it, on the same rows as a lorafit run.

transformers `Trainer` + `DataCollatorWithPadding` + peft `get_peft_model` (or full fine-tuning)
on `AutoModelForSequenceClassification`. Only the choice of rows comes from lorafit (the run's
train and test splits, so both tools see the same data); everything timed is stock.
`--group-by-length` turns on the Trainer's documented length grouping (transformers 5:
`train_sampling_strategy="group_by_length"`; before: `group_by_length=True`), which batches texts of
similar length and so pads less: one flag away for any user, so the fair stock baseline. `--bf16` turns
on the Trainer's documented mixed precision (`bf16=True`; on CPU it autocasts to bf16), the baseline for
lorafit's `train.precision=bf16`.

    python bench/stock_recipe.py RUN_DIR --method lora --rank 8 --epochs 5 --out stock.json
    python bench/stock_recipe.py RUN_DIR --method lora --rank 8 --epochs 5 --group-by-length --out grouped.json

Writes one JSON object: training examples/s, train seconds, peak RSS, test accuracy and macro-F1
(scored against the labels the Trainer returns with its predictions: with length grouping it evaluates
in length-grouped order too), the samplers used. Run it in its own process so the peak RSS is its own.
"""

from __future__ import annotations

import argparse
import inspect
import json
import resource
import time

import numpy as np
import torch
from sklearn.metrics import f1_score

from lorafit import allocator


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a lorafit run whose train/test rows and labels to use")
    parser.add_argument("--method", choices=["lora", "full"], default="lora")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--targets", default="query,key,value,dense")
    parser.add_argument("--epochs", type=float, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=float, default=0.1)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--group-by-length", action="store_true", help="the Trainer's length-grouped sampler")
    parser.add_argument("--bf16", action="store_true",
                        help="the Trainer's documented bf16=True (mixed precision; on CPU, autocast to bf16)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers
    from datasets import Dataset
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments)

    from lorafit.inference import run_split
    from lorafit.models import resolve_model_path
    from lorafit.rundir import RunDir

    run = RunDir(args.run_dir)
    cfg, labels = run.config(), run.labels()
    index = {label: i for i, label in enumerate(labels)}
    train, test = run_split(run, cfg, "train"), run_split(run, cfg, "test")
    path = resolve_model_path(cfg.model.name)

    tokenizer = AutoTokenizer.from_pretrained(path)

    def encode(split) -> Dataset:
        ds = Dataset.from_dict({"text": split.texts, "label": [index[label] for label in split.labels]})
        return ds.map(lambda b: tokenizer(b["text"], truncation=True, max_length=cfg.data.max_length), batched=True,
                      remove_columns=["text"])

    train_ds, test_ds = encode(train), encode(test)
    # Seeded before the model is made, as the Trainer's docs advise (or `model_init`): the classification head
    # (and LoRA's A matrices) are initialised from torch's generator, which this PyTorch seeds from the OS at
    # start-up, so without this every process trained from another head (the tiny test task then scored 0.67
    # in some processes, 1.0 in others).
    transformers.set_seed(args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id=index)
    if args.method == "lora":
        from peft import LoraConfig, TaskType, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=args.rank, lora_alpha=args.alpha,
                                                 lora_dropout=args.dropout, target_modules=args.targets.split(",")))
    sampling = {}
    if args.group_by_length:
        # transformers 5 replaced the boolean with a sampler choice; older versions only know the boolean.
        if "train_sampling_strategy" in inspect.signature(TrainingArguments.__init__).parameters:
            sampling = {"train_sampling_strategy": "group_by_length"}
        else:
            sampling = {"group_by_length": True}
    training_args = TrainingArguments(
        output_dir=f"{args.out}.trainer", per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=64,
        num_train_epochs=args.epochs, learning_rate=args.lr, warmup_steps=args.warmup, weight_decay=args.weight_decay,
        lr_scheduler_type="linear", seed=args.seed, logging_strategy="no", save_strategy="no", eval_strategy="no",
        report_to=[], use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, disable_tqdm=True, bf16=args.bf16,
        **sampling,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=train_ds,
                      data_collator=DataCollatorWithPadding(tokenizer))
    sampler = type(trainer._get_train_sampler()).__name__  # which sampler the flag really gave (outside the timing)
    if args.group_by_length and sampler != "LengthGroupedSampler":
        raise SystemExit(f"stock_recipe: asked for length grouping, but the Trainer samples with {sampler}")
    started = time.perf_counter()
    trained = trainer.train()
    train_seconds = time.perf_counter() - started
    peak_train = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available():
        peak_train = torch.cuda.max_memory_allocated() / 2**20

    started = time.perf_counter()
    output = trainer.predict(test_ds)
    predict_seconds = time.perf_counter() - started
    # Scored against the labels the Trainer returns with the predictions, not the dataset's column: with
    # length grouping, transformers (huggingface/transformers#33514, 2024) also length-groups -- and
    # shuffles -- evaluation, so predictions come back in another order than test_ds (scored against the
    # column, a well-trained grouped run read as chance).
    predicted = np.asarray(output.predictions).argmax(-1)
    targets = np.asarray(output.label_ids)
    if sorted(targets.tolist()) != sorted(test_ds["label"]):
        raise SystemExit("stock_recipe: the Trainer's predictions do not cover the test set once each")
    result = {
        "tool": "stock (group_by_length)" if args.group_by_length else "stock", "sampler": sampler,
        "training_arguments": {**sampling, "bf16": args.bf16}, "precision": "bf16" if args.bf16 else "fp32", "transformers": transformers.__version__, "method": args.method, "rank": args.rank, "epochs": args.epochs, "seed": args.seed,
        "train_examples": len(train_ds), "train_seconds": train_seconds,
        "train_examples_per_second": len(train_ds) * args.epochs / train_seconds,
        "peak_memory_mb": peak_train, "train_loss": trained.training_loss,
        "test_accuracy": float((predicted == targets).mean()),
        "test_macro_f1": float(f1_score(targets, predicted, average="macro")),
        "eval_examples_per_second": len(test_ds) / predict_seconds,
        "eval_sampler": type(trainer._get_eval_sampler(test_ds)).__name__,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "allocator": allocator.active(),  # system, unless bench/speed.py --stock-malloc preloaded lorafit's
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
