"""For the audit scripts (bench/emotion_words.py, bench/label_audit.py): finished runs' test predictions as
label names, each run's predictions.json checked to hold the same test split in the same order; and their
entry point, which answers a user's mistake (lorafit's UserError) with one line and exit 2, as the CLI does."""

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


def run_script(main) -> None:
    """sys.exit(main()), a UserError (a missing run folder, a dataset that is not there) printed as one line, exit 2."""
    from lorafit.errors import UserError

    try:
        code = main()
    except UserError as e:
        print(f"{sys.argv[0]}: error: {e}", file=sys.stderr)
        code = 2
    sys.exit(code)
