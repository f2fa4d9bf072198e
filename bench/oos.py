"""Out-of-scope detection and calibration on the open-intent protocol: the table issue 15 asks for.

Trains the shipped config with `data.known_intents=K` (a seeded share of the classes is known; the
others leave train and validation and their test examples are out of scope) for each seed, each run in
its own process, then reads every run's eval.json and ood.json -- nothing is computed from test here
that lorafit did not record -- and prints, per OOS score (msp, energy, mahalanobis, knn, base_knn, hybrid), the mean
+- 95% CI over seeds of in-scope accuracy, OOS AUROC, AUPR, FPR at 95% in-scope recall, OOS recall and
precision at the threshold chosen on validation, and open-set macro-F1; plus the test ECE before and
after the temperature; then each score's AUROC gain over msp, paired by seed. A finished run folder is
reused; `--refit` fits its post-hoc stage again first (`lorafit eval RUN --refit`: scores added since it
trained; `--ood k=1` replaces an ood.* setting), reading test once more for the new scores only.

    python bench/oos.py --out runs/oos-b77-75 --known 0.75 --seeds 0 1 2
    python bench/oos.py --out runs/oos-b77-75 --refit --ood k=1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lorafit.compare import mean_ci
from lorafit.hardware import cpu_info
from lorafit.sweep import execute  # one trial process, its output to a log

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = [("in_scope_accuracy", "in-scope acc"), ("auroc", "AUROC"), ("aupr", "AUPR"),
           ("fpr_at_95_recall", "FPR@95"), ("oos_recall", "OOS recall"), ("oos_precision", "OOS precision"),
           ("in_scope_accuracy_thresholded", "in-scope acc (thr)"), ("open_macro_f1", "open macro-F1")]


def _cell(values: list[float], scale: float = 100) -> str:
    """Mean +- 95% CI half-width over seeds; scale 100: fractions shown as percentages."""
    mean, half = mean_ci([scale * v for v in values])
    return f"{mean:.2f}" + (f" ± {half:.2f}" if half is not None else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/banking77-lora.yaml")
    parser.add_argument("--known", type=float, default=0.75, help="share of known intents (data.known_intents)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--refit", action="store_true", help="fit finished runs' post-hoc stage again (new scores)")
    parser.add_argument("--ood", action="append", default=[], metavar="KEY=VALUE", help="with --refit: an ood.* setting")
    parser.add_argument("overrides", nargs="*", help="more key=value overrides for every run")
    args = parser.parse_args()

    runs = []
    for seed in args.seeds:
        run = args.out / f"seed{seed}"
        if not (run / "eval.json").is_file():
            overrides = [f"data.known_intents={args.known}", f"seed={seed}", *args.overrides]
            print(f"training {run} ...", file=sys.stderr, flush=True)
            run.parent.mkdir(parents=True, exist_ok=True)
            command = [sys.executable, "-m", "lorafit", "train", str(ROOT / args.config), *overrides, "--out", str(run),
                       "--overwrite", "--quiet"]
            code, last = execute(command, str(run.with_suffix(".log")))
            if code != 0:
                print(f"{run}: training failed (exit {code}): {last}", file=sys.stderr)
                return 1
        elif args.refit:
            print(f"re-fitting {run} ...", file=sys.stderr, flush=True)
            command = [sys.executable, "-m", "lorafit", "eval", str(run), "--refit", *(f"--ood={o}" for o in args.ood)]
            code, last = execute(command, str(run.with_suffix(".refit.log")))
            if code != 0:
                print(f"{run}: re-fit failed (exit {code}): {last}", file=sys.stderr)
                return 1
        runs.append(run)

    evals = [json.loads((r / "eval.json").read_text()) for r in runs]
    records = [json.loads((r / "ood.json").read_text()) for r in runs]
    summaries = [json.loads((r / "summary.json").read_text()) for r in runs]
    splits = json.loads((runs[0] / "splits.json").read_text())
    cpu = cpu_info()
    print(f"CPU: {cpu.get('model')} family {cpu.get('family')} model {cpu.get('model_id')}, {cpu.get('cores')} cores, "
          f"{' '.join(cpu.get('flags', []))}; {args.config}, data.known_intents={args.known}, seeds {args.seeds}")
    print(f"known intents: {len(splits['open_intent']['known'])}, unknown: {len(splits['open_intent']['unknown'])} "
          f"(seed {args.seeds[0]}); OOS test examples: {splits['oos']['examples']['test']}; "
          f"thresholds chosen on validation ({records[0]['scores']['msp']['rule']})")
    print(f"train seconds per run: {_cell([s['train_seconds'] for s in summaries], 1)} s")
    print()
    print("| score | " + " | ".join(name for _, name in COLUMNS) + " |")
    print("|---|" + "---:|" * len(COLUMNS))
    for score in evals[0]["ood"]["scores"]:
        cells = [_cell([e["ood"]["scores"][score][key] for e in evals]) for key, _ in COLUMNS]
        print(f"| {score} | " + " | ".join(cells) + " |")
    print()
    msp = [e["ood"]["scores"]["msp"]["auroc"] for e in evals]
    for score in evals[0]["ood"]["scores"]:
        if score != "msp":
            gains = [e["ood"]["scores"][score]["auroc"] - m for e, m in zip(evals, msp)]
            mean, half = mean_ci(gains)
            print(f"AUROC gain of {score} over msp, paired by seed: {mean:+.4f}" + (f" ± {half:.4f}" if half is not None else "")
                  + f" ({', '.join(f'{g:+.4f}' for g in gains)})")
    print()
    cal = [e["calibration"] for e in evals]
    print(f"temperature {_cell([r['temperature'] for r in records], 1)}; in-scope test ECE (15 bins) "
          f"before {_cell([c['ece_before'] for c in cal])} %, after {_cell([c['ece_after'] for c in cal])} %; "
          f"NLL before {_cell([c['nll_before'] for c in cal], 1)}, after {_cell([c['nll_after'] for c in cal], 1)}")
    table = {score: {key: [e["ood"]["scores"][score][key] for e in evals] for key, _ in COLUMNS} for score in evals[0]["ood"]["scores"]}
    print(json.dumps({"known_intents": args.known, "seeds": args.seeds, "scores": table, "cpu_model": cpu.get("model"), "cpu_flags": cpu.get("flags"),
                      "ece_before": [c["ece_before"] for c in cal], "ece_after": [c["ece_after"] for c in cal]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
