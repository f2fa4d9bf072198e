"""Seed ensembles of finished runs, measured: each run alone on test, the average of their logits (an
ensemble: N forward passes per text) and `lorafit soup` (one model whose weights are the mean of the runs'
merged weights, costing what one run costs at prediction; Wortsman et al. 2022).

    python bench/soup.py RUN_A RUN_B [RUN_C ...] [--out SOUP_DIR]

The runs must share base model and labels (seeds of one config). No choice is made here (every run is
averaged with the same weight), so test is read once per row.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import lorafit
from lorafit.evaluate import classification_metrics
from lorafit.hardware import cpu_line
from lorafit.inference import label_indices, run_split
from lorafit.rundir import RunDir


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--out", help="where to keep the soup (default: a temporary folder)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    first = RunDir(args.runs[0])
    test = run_split(first, first.config(), "test")
    labels = first.labels()
    targets = label_indices(test.labels, labels)
    print(cpu_line())
    logits = []
    for run in args.runs:
        logits.append(lorafit.load(run, device="cpu").logits(test.texts))
        print(f"{run}: test accuracy {100 * (logits[-1].argmax(-1) == targets).mean():.2f}%", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out) if args.out else Path(tmp) / "soup"
        lorafit.soup(args.runs, out, overwrite=bool(args.out))
        soup = classification_metrics(lorafit.load(out, device="cpu").logits(test.texts), targets, labels)
    singles = [float((l.argmax(-1) == targets).mean()) for l in logits]
    ensemble = classification_metrics(np.mean(logits, 0), targets, labels)
    print(f"runs alone: {', '.join(f'{100 * a:.2f}' for a in singles)} (mean {100 * np.mean(singles):.2f})")
    print(f"logit ensemble of {len(logits)}: {100 * ensemble['accuracy']:.2f}% (macro-F1 {100 * ensemble['macro_f1']:.2f})")
    print(f"lorafit soup of {len(logits)}: {100 * soup['accuracy']:.2f}% (macro-F1 {100 * soup['macro_f1']:.2f})")
    print(json.dumps({"runs": args.runs, "single": singles, "ensemble": ensemble["accuracy"], "soup": soup["accuracy"],
                      "cpu_model": cpu_line()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
