"""Finished runs' test predictions as label names, for the audit scripts (bench/emotion_words.py,
bench/label_audit.py): each run's predictions.json, checked to hold the same test split, in the same order."""

from __future__ import annotations

import sys


def test_predictions(paths: list[str], targets: list[str]) -> dict[str, list[str]]:
    """{path: predicted label per test example}; SystemExit(2) with one line if a run scored another test split."""
    from lorafit.rundir import RunDir

    out = {}
    for path in paths:
        run = RunDir(path)
        record, labels = run.predictions(), run.labels()
        if record.split != "test" or [labels[t] for t in record.target] != list(targets):
            print(f"{path}: its predictions.json is not this test split", file=sys.stderr)
            raise SystemExit(2)
        out[path] = [labels[p] for p in record.predicted]
    return out
