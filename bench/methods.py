"""Every fine-tuning method on one dataset, one after another, and the table practitioners publish:
trainable parameters and %, adapter size on disk, seconds per epoch, peak memory, test accuracy and
macro-F1 -- read from each run's summary.json / eval.json, nothing computed here.

Each method trains in its own process (`python -m lorafit train ...`), so peak memory (the process's
peak resident set on CPU) belongs to that method alone. A run folder that already holds a finished
run is reused, so the table can be rebuilt, or completed, without training again.

    python bench/methods.py --out runs/methods
    python bench/methods.py --out runs/methods --only lora,dora --epochs 1   # a quick pass
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

from lorafit.sweep import execute  # one trial process, its output to a log

ROOT = Path(__file__).resolve().parents[1]
# method -> (shipped config, changes to its `method` section (None deletes a key), overrides).
# Methods without a config of their own run from the LoRA config with the method swapped, so they
# share data, schedule, targets and learning rates with LoRA unless stated here.
LORA = "configs/banking77-lora.yaml"
PLAN = {
    "full": ("configs/banking77-full.yaml", {}, []),
    "lora": (LORA, {}, []),
    "adalora": ("configs/banking77-adalora.yaml", {}, []),
    "dora": ("configs/banking77-dora.yaml", {}, []),
    "rslora": (LORA, {"name": "rslora"}, []),
    "loraplus": (LORA, {"name": "loraplus"}, ["train.lr=5e-4"]),
    "lora-pissa": (LORA, {"init": "pissa"}, []),
    "native-lora": (LORA, {"name": "native-lora"}, []),
    "vera": (LORA, {"name": "vera", "rank": 256, "alpha": None}, ["train.lr=1e-2"]),
    "ia3": (LORA, {"name": "ia3", "rank": None, "alpha": None, "dropout": None}, ["train.lr=1e-2"]),
    "loha": (LORA, {"name": "loha", "rank": 8, "dropout": None}, []),
    "lokr": (LORA, {"name": "lokr", "dropout": None}, []),
}
COLUMNS = ("method", "epochs", "threads", "trainable", "trainable %", "adapter size", "s/epoch", "peak memory", "test accuracy", "test macro-F1")


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def _row(name: str, run: Path) -> dict:
    s = json.loads((run / "summary.json").read_text())
    return {
        "method": name, "epochs": s["epochs_run"], "threads": s["threads"], "trainable": f"{s['trainable_params']:,}",
        "trainable %": f"{s['trainable_percent']:.2f}", "adapter size": _size(s["adapter_bytes"]),
        "s/epoch": f"{s['seconds_per_epoch']:.0f}", "peak memory": f"{s['peak_memory_mb']:,.0f} MB",
        "test accuracy": f"{100 * s['test_accuracy']:.2f}", "test macro-F1": f"{100 * s['test_macro_f1']:.2f}",
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/methods", help="folder holding one run folder per method")
    ap.add_argument("--only", help="comma-separated subset of: " + ", ".join(PLAN))
    ap.add_argument("--epochs", type=int, help="override train.epochs for every method (a quicker pass)")
    ap.add_argument("--set", nargs="*", default=[], help="extra overrides for every run (e.g. train.threads=2)")
    args = ap.parse_args()
    names = args.only.split(",") if args.only else list(PLAN)
    unknown = [n for n in names if n not in PLAN]
    if unknown:
        ap.error(f"unknown methods {unknown}; choose from {', '.join(PLAN)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names:
        config, changes, overrides = PLAN[name]
        run = out / name
        if not (run / "summary.json").exists():
            if changes:  # the shipped config with the method section changed, kept beside the run
                raw = yaml.safe_load((ROOT / config).read_text())
                for key, value in changes.items():
                    raw["method"].pop(key, None) if value is None else raw["method"].__setitem__(key, value)
                config = out / f"{name}.yaml"
                config.write_text(yaml.safe_dump(raw, sort_keys=False))
            overrides = overrides + ([f"train.epochs={args.epochs}"] if args.epochs else [])
            overrides += args.set
            cmd = [sys.executable, "-m", "lorafit", "train", str(ROOT / config), *overrides, "--out", str(run),
                   "--overwrite", "--quiet"]
            print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(cmd[3:])}", flush=True)
            code, last = execute(cmd, str(out / f"{name}.log"))
            if code != 0:
                print(f"  failed ({code}): {last}", flush=True)
                continue
        rows.append(_row(name, run))
        print("  " + ", ".join(f"{k} {v}" for k, v in rows[-1].items()), flush=True)
    table = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    table += ["| " + " | ".join(str(r[c]) for c in COLUMNS) + " |" for r in rows]
    (out / "table.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    return 0 if len(rows) == len(names) else 1


if __name__ == "__main__":
    sys.exit(main())
