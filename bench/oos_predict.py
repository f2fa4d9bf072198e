"""What `lorafit predict` / `serve` do with a run's out-of-scope score, on real data: from the run folder alone
(`lorafit.load(RUN).classify`), score the run's own test split (in-scope and out-of-scope queries) and compare
the AUROC and OOS recall with the row eval.json recorded at training; then the prediction speed of the run's
score against a top-probability threshold (msp, no extra pass), one thread.

    python bench/oos_predict.py RUN [--limit 1000]

RUN decides by the score in its ood.json (`lorafit eval RUN --refit --ood score=hybrid` switches a finished run).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

import lorafit
from lorafit import data
from lorafit.hardware import cpu_line
from lorafit.rundir import RunDir


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--limit", type=int, default=1000, help="texts timed per score")
    args = parser.parse_args()
    torch.set_num_threads(1)
    run = RunDir(args.run)
    cfg = run.config()
    dataset, _ = data.load(cfg.data, cfg.seed)
    test = dataset.splits["test"]
    is_oos = np.array([label == dataset.oos_label for label in test.labels])
    classifier = lorafit.load(args.run, device="cpu", threads=1)
    kind = classifier.oos.score
    row = run.read_json("eval.json")["ood"]["scores"][kind]
    print(cpu_line())
    print(f"{args.run}: decides by {kind}, threshold {classifier.threshold:.4f} ({classifier.threshold_source})")
    started = time.perf_counter()
    _, scores, outside = classifier.classify(test.texts)
    seconds = time.perf_counter() - started
    auroc = roc_auc_score(is_oos, -scores)
    print(f"test: {len(test.texts)} queries ({is_oos.sum()} OOS) scored from the folder in {seconds:.1f} s")
    print(f"AUROC  from the folder {auroc:.4f}   eval.json (training) {row['auroc']:.4f}")
    print(f"OOS recall  from the folder {outside[is_oos].mean():.4f}   eval.json {row['oos_recall']:.4f}")
    print(f"in-scope kept  from the folder {1 - outside[~is_oos].mean():.4f}")
    texts = test.texts[: args.limit]
    timings = {}
    for score, loaded in ((kind, classifier), ("msp", lorafit.load(args.run, device="cpu", threads=1, threshold=0.5))):
        loaded.classify(texts[:64])  # warm up
        started = time.perf_counter()
        loaded.classify(texts)
        timings[score] = len(texts) / (time.perf_counter() - started)
        print(f"{score:8s} {timings[score]:7.1f} texts/s (classify, one thread, {len(texts)} texts)")
    print(json.dumps({"score": kind, "auroc_folder": auroc, "auroc_eval": row["auroc"],
                      "texts_per_second": timings, "cpu_model": cpu_line()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
