"""Why the shipped LoRA recipe beats the stock one: start from the stock Hugging Face setting (CLS
vector, LoRA r=8 on query/value, one learning rate of 1e-3 for adapters and the new head) and change
one thing at a time towards `configs/banking77-lora.yaml`, on the same data, schedule and epochs.

Each step trains in its own process; the table shows validation and test accuracy / macro-F1 read
from the runs. Run folders that already hold a finished run are reused.

    LORAFIT_DATA_DIR=../shared/data python bench/recipe_ablation.py --epochs 2 --out runs/ablation
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from lorafit.sweep import execute  # one trial process, its output to a log

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "banking77-lora.yaml"
# Cumulative: each step keeps the changes above it.
STEPS = [
    ("stock: CLS vector, r=8 on query/value, lr 1e-3 for all",
     ["model.pooling=cls", "method.rank=8", "method.alpha=16", "method.targets=[query,value]", "train.lr=1e-3", "train.head_lr=1e-3"]),
    ("+ mean pooling (how the checkpoint was trained)",
     ["model.pooling=mean", "method.rank=8", "method.alpha=16", "method.targets=[query,value]", "train.lr=1e-3", "train.head_lr=1e-3"]),
    ("+ head learning rate 5e-3",
     ["model.pooling=mean", "method.rank=8", "method.alpha=16", "method.targets=[query,value]", "train.lr=1e-3", "train.head_lr=5e-3"]),
    ("+ adapters on all attention and FFN linears",
     ["model.pooling=mean", "method.rank=8", "method.alpha=16", "method.targets=[attention,ffn]", "train.lr=1e-3", "train.head_lr=5e-3"]),
    ("+ adapter lr 2e-3, rank 16 (the shipped config)", []),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/ablation")
    ap.add_argument("--epochs", type=int, default=2, help="epochs for every step (same schedule for all)")
    ap.add_argument("--set", nargs="*", default=[], help="extra overrides for every run")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (label, overrides) in enumerate(STEPS):
        run = out / f"step{i}"
        if not (run / "summary.json").exists():
            cmd = [sys.executable, "-m", "lorafit", "train", str(CONFIG), *overrides, f"train.epochs={args.epochs}",
                   *args.set, "--out", str(run), "--overwrite", "--quiet"]
            print(f"[{time.strftime('%H:%M:%S')}] step {i}: {label}", flush=True)
            code, last = execute(cmd, str(out / f"step{i}.log"))
            if code != 0:
                print(f"  failed ({code}): {last}", flush=True)
                continue
        epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        val = [e for e in epochs if e["type"] == "epoch"][-1]
        s = json.loads((run / "summary.json").read_text())
        rows.append((label, 100 * val["val_accuracy"], 100 * s["test_accuracy"], 100 * s["test_macro_f1"]))
        print(f"  val acc {rows[-1][1]:.2f}  test acc {rows[-1][2]:.2f}  test macro-F1 {rows[-1][3]:.2f}", flush=True)
    table = [f"| step ({args.epochs} epochs each) | val accuracy | test accuracy | test macro-F1 |", "|---|---|---|---|"]
    table += [f"| {label} | {v:.2f} | {t:.2f} | {f:.2f} |" for label, v, t, f in rows]
    (out / "table.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    return 0 if len(rows) == len(STEPS) else 1


if __name__ == "__main__":
    sys.exit(main())
