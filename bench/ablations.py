"""What each of lorafit's defaults adds, dataset by dataset: the ablation table of the README.

Starts from the first write-up's setting (configs/seeds/banking77-lora-qv.yaml: LoRA r=8, alpha 16 on
query/value, the first token's state, one learning rate of 1e-3, no label smoothing, 5 epochs) and turns
lorafit's defaults on one at a time, in this order, until the last row is `lorafit train --data NAME`
with nothing else; then techniques tried on top of the defaults, and final models (`lorafit train --final`)
of another variant's runs, which train on their validation rows and so can never be the reference. Each
(dataset, variant, seed) is one `lorafit train --data NAME <overrides>` run (a final variant's: `lorafit train
--final` of the refitted variant's run of that seed) in OUT/<dataset>/<variant>/seed=<seed> (a re-run skips
finished runs and resumes killed ones, as `lorafit sweep` does), and each dataset's variants go through
`lorafit compare`: mean ± 95% CI over seeds, paired bootstrap and McNemar against the reference, the variant
with the best mean validation accuracy (test never chooses anything). Prints one table per dataset and
writes OUT/<dataset>/compare.md.

    LORAFIT_DATA_DIR=/path/to/mirror python bench/ablations.py --out runs/ablations                  # everything
    LORAFIT_DATA_DIR=/path/to/mirror python bench/ablations.py --out runs/ablations --datasets trec6 \\
        --variants defaults full --seeds 0 1 2 --workers 2
    python bench/ablations.py --out runs/ablations --summary-only     # tables from the runs there, no training

Every run uses one thread per worker (`--workers 2` on two cores): two 2-thread processes side by side
run several times slower on this 2-core machine than one thread each.
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _trials import train_or_resume  # bench/ is on sys.path: run as python bench/<script>.py

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ["banking77", "emotion", "snips", "trec6"]

#: The first write-up's setting, as overrides of lorafit's defaults (configs/seeds/banking77-lora-qv.yaml).
PUBLISHED = {
    "method.targets": ["query", "value"],
    "model.pooling": "cls",
    "train.lr": 1.0e-3, "train.head_lr": 1.0e-3,
    "method.rank": 8, "method.alpha": 16,
    "train.label_smoothing": 0.0,
    "train.epochs": 5,
}
#: The defaults, turned on one at a time (each step drops these keys from PUBLISHED: they fall back to the defaults).
STEPS = [
    ("+attention-ffn", "adapters on every attention and FFN linear", ["method.targets"]),
    ("+mean-pooling", "the sentence vector is the mean of token states", ["model.pooling"]),
    ("+method-lrs", "lr 2e-3, head 5e-3 (LoRA's own)", ["train.lr", "train.head_lr"]),
    ("+rank16", "rank 16, alpha 32", ["method.rank", "method.alpha"]),
    ("+label-smoothing", "label smoothing 0.1", ["train.label_smoothing"]),
    ("defaults", "epochs=auto: 1,100 optimiser steps, 3 to 20 epochs (lorafit train --data NAME)", ["train.epochs"]),
]
#: Techniques on top of the defaults.
TECHNIQUES = [
    ("full", "full fine-tuning with its own learning rates (1e-4, head 2e-3)", {"method.name": "full"}),
    ("steps-x2", "twice the optimiser steps: train.auto_steps=2200", {"train.auto_steps": 2200}),
    ("ema", "judged and saved by a moving average of the weights: train.ema=0.995 (about 200 steps)", {"train.ema": 0.995}),
    ("full+steps-x2", "full fine-tuning with twice the optimiser steps (train.auto_steps=2200)",
     {"method.name": "full", "train.auto_steps": 2200}),
    ("full+llrd", "full fine-tuning, layer-wise learning-rate decay 0.9 (train.layer_lr_decay)",
     {"method.name": "full", "train.layer_lr_decay": 0.9}),
    ("centroid-head", "the head starts as a nearest-centroid classifier of the training sentence vectors",
     {"model.head_init": "centroids"}),
    ("rdrop", "R-Drop, alpha 1: two dropout passes per example, their symmetric KL in the loss (train.rdrop=1.0)",
     {"train.rdrop": 1.0}),
    ("distill-full", "distilled from the full fine-tuning run of the same seed (same validation rows; distill.alpha 0.5, "
     "temperature 2)", {"distill.teacher": "{variants}/full/seed={seed}"}),
]
#: The final model of another variant's run of the same seed (`lorafit train --final RUN`: that run's recipe trained
#: again on train + validation for its best epoch count, with the temperature its held-out validation chose).
#: name -> (what it is, the variant whose runs it refits, which must have run first).
FINALS = {
    "full+final": ("the full run of the same seed trained again on train + validation for its best epoch count "
                   "(lorafit train --final)", "full"),
}


def variants() -> dict[str, tuple[str, dict]]:
    """name -> (what it is, overrides of the defaults), in table order."""
    out = {"published": ("the first write-up's LoRA setting (configs/seeds/banking77-lora-qv.yaml)", dict(PUBLISHED))}
    current = dict(PUBLISHED)
    for name, what, keys in STEPS:
        current = {k: v for k, v in current.items() if k not in keys}
        out[name] = (what, dict(current))
    assert current == {}, "the last step must leave the defaults"
    out.update({name: (what, overrides) for name, what, overrides in TECHNIQUES})
    out.update({name: (what, {}) for name, (what, _) in FINALS.items()})
    return out


def train_args(out: Path, dataset: str, name: str, overrides: dict, seed: int) -> list[str]:
    """The `lorafit train` arguments of one variant's run of `seed` (less --out): `--data DATASET` and the
    overrides of the defaults, one thread; or for a final variant (FINALS) `--final` and the run it refits.
    {variants} and {seed} in an override name another variant's run of this seed (a teacher)."""
    if name in FINALS:
        return ["--final", str(out / dataset / FINALS[name][1] / f"seed={seed}")]
    values = [f"{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in overrides.items()]
    mine = [v.replace("{variants}", str(out / dataset)).replace("{seed}", str(seed)) for v in values]
    return ["--data", dataset, *mine, f"seed={seed}", "train.threads=1"]


def _run(out: Path, dataset: str, name: str, overrides: dict, seeds: list[int], workers: int) -> list[str]:
    """Every seed's run of one variant (`train_args`; finished runs skipped, killed ones resumed:
    `_trials.train_or_resume`); returns the runs that failed."""
    folder = out / dataset / name

    def one(seed: int) -> str | None:
        run = folder / f"seed={seed}"
        return train_or_resume(run, train_args(out, dataset, name, overrides, seed),
                               folder / "logs" / f"{run.name}.log", f"{dataset}/{name}/{run.name}")

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return [failed for failed in pool.map(one, seeds) if failed]


def _table(out: Path, dataset: str, names: list[str]) -> str | None:
    from lorafit import compare

    finished = [run for name in names for run in sorted((out / dataset / name).glob("seed=*")) if (run / "summary.json").is_file()]
    runs = compare.collect(finished) if finished else []
    if not runs:
        return None
    result = compare.compare(runs)
    (out / dataset / "compare.md").write_text(compare.to_markdown(result), encoding="utf-8")
    return _compact(result, names)


def _compact(result: dict, names: list[str]) -> str:
    """The README's table: one row per variant in the order of `names`, with lorafit compare's figures
    (the full table, per-class figures included, is OUT/<dataset>/compare.md)."""
    from lorafit import compare

    everything = variants()
    by_variant = {Path(row["runs"][0]).parent.name: row for row in result["rows"]}
    lines = ["| variant | what it changes | seeds | validation accuracy % | test accuracy % | test macro-F1 % | "
             "Δ test accuracy vs reference [95% CI] | p (bootstrap) | s/epoch |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in names:
        row = by_variant.get(name)
        if row is None:
            continue
        v = row["versus_best"]
        versus = ("reference", "") if row["best"] else \
            (f"{100 * v['difference']:+.2f} [{100 * v['ci_low']:+.2f}, {100 * v['ci_high']:+.2f}]", f"{v['p_bootstrap']:.2g}")
        validation = compare._validation_cell(row, result["reference_metric"])
        lines.append(f"| {name} | {everything[name][0]} | {len(row['seeds'])} | {validation} | "
                     f"{compare._pct(row['accuracy'], row['accuracy_ci'])} | {compare._pct(row['macro_f1'], row['macro_f1_ci'])} | {versus[0]} | "
                     f"{versus[1]} | {row['seconds_per_epoch']:.0f} |")
    best = next(name for name, row in by_variant.items() if row["best"])
    return "\n".join(lines) + (f"\n\nReference: {best}, the variant with the best mean validation accuracy; Δ and p are "
                               "paired over the seeds both have and the same test examples (lorafit compare).")


def main() -> int:
    everything = variants()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--datasets", nargs="+", default=DATASETS, choices=DATASETS)
    ap.add_argument("--variants", nargs="+", default=list(everything), choices=list(everything))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--workers", type=int, default=2, help="runs at once, one thread each")
    ap.add_argument("--summary-only", action="store_true", help="print the tables of the runs in --out; train nothing")
    args = ap.parse_args()

    from lorafit import hardware

    print(hardware.cpu_line())
    failed = []
    for dataset in args.datasets:
        if not args.summary_only:
            for name in args.variants:
                failed += _run(args.out, dataset, name, everything[name][1], args.seeds, args.workers)
        print(f"\n## {dataset}\n")
        for name in args.variants:
            what, overrides = everything[name]
            shown = "" if name in FINALS else \
                " (overrides of the defaults: " + (", ".join(f"{k}={v}" for k, v in overrides.items()) or "none") + ")"
            print(f"- {name}: {what}{shown}")
        print()
        print(_table(args.out, dataset, args.variants) or "(no finished runs)")
    if failed:
        print(f"failed runs (see their logs): {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
