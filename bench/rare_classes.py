"""Rare classes on emotion (issue 15): the shipped config (configs/emotion-lora.yaml) with each rare-class
option against none, over seeds, one thread per run, at most `--workers` runs at a time.

    LORAFIT_DATA_DIR=../shared/data python bench/rare_classes.py --out runs/emotion-rare [--seeds 0 1 2]
    python bench/rare_classes.py --out runs/emotion-rare --summary-only     # the table of what is there

Runs land in OUT/<option>/seed=<seed> (finished runs are skipped, killed ones resumed, as `lorafit sweep`
does). Printed: per option its seeds, test accuracy, macro-F1 and the F1 of the two rarest classes
(`surprise`, 3.6% of training examples; `love`, 8%), mean over seeds, and the paired difference from `none`
on the seeds both have; then `lorafit compare`'s table (OUT/compare.md: 95% intervals, paired bootstrap).
`no-smoothing` trains without the shipped config's label smoothing (0.1). `--set KEY=VALUE ...` applies to
every run (an option's own settings win over it). Each row also shows the 15-bin test ECE before and after
the temperature.
Nothing here reads test to choose: each option is a fixed setting; the README's rule is to ship an option
as emotion's default only if it raises macro-F1 without costing accuracy.
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from _trials import train_or_resume  # bench/ is on sys.path: run as python bench/<script>.py

CONFIG = "configs/emotion-lora.yaml"
OPTIONS = {
    "none": [],
    "balanced": ["train.class_weights=balanced"],
    "focal": ["train.loss=focal"],
    "sampler": ["train.sampler=class_balanced"],
    "no-smoothing": ["train.label_smoothing=0.0"],  # the shipped config smooths labels by 0.1
}
RARE = ("surprise", "love")


def _run(out: Path, option: str, seed: int, overrides: list[str]) -> str | None:
    run = out / option / f"seed={seed}"
    return train_or_resume(run, [CONFIG, *overrides, *OPTIONS[option], f"seed={seed}", "train.threads=1"],
                           out / "logs" / f"{option}-seed={seed}.log", f"{option}/seed={seed}")


def _figures(run: Path) -> dict:
    ev = json.loads((run / "eval.json").read_text())
    calibration = ev.get("calibration") or {}
    return {"accuracy": ev["accuracy"], "macro_f1": ev["macro_f1"], **{c: ev["per_class"][c]["f1"] for c in RARE},
            "ece_before": calibration.get("ece_before", np.nan), "ece_after": calibration.get("ece_after", np.nan)}


def table(out: Path) -> str:
    results = {option: {int(run.name.split("=")[1]): _figures(run) for run in sorted((out / option).glob("seed=*"))
                        if (run / "eval.json").is_file()} for option in OPTIONS}
    keys = ("accuracy", "macro_f1", *RARE, "ece_before", "ece_after")
    lines = ["| option | seeds | test accuracy | macro-F1 | F1 surprise | F1 love | ECE before -> after T | "
             "Δ accuracy vs none | Δ macro-F1 vs none |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for option, by_seed in results.items():
        if not by_seed:
            continue
        means = {k: 100 * np.mean([f[k] for f in by_seed.values()]) for k in keys}
        paired = sorted(set(by_seed) & set(results["none"]))
        deltas = ["", ""]
        if option != "none" and paired:
            for i, k in enumerate(("accuracy", "macro_f1")):
                d = [100 * (by_seed[s][k] - results["none"][s][k]) for s in paired]
                deltas[i] = f"{np.mean(d):+.2f} ({', '.join(f'{x:+.2f}' for x in d)}; seeds {paired})"
        lines.append(f"| {option} | {sorted(by_seed)} | {means['accuracy']:.2f} | {means['macro_f1']:.2f} | "
                     f"{means['surprise']:.2f} | {means['love']:.2f} | {means['ece_before']:.2f} -> "
                     f"{means['ece_after']:.2f} | {deltas[0]} | {deltas[1]} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--options", nargs="+", default=list(OPTIONS), choices=list(OPTIONS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--workers", type=int, default=2, help="runs at once, one thread each")
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="overrides",
                    help="config overrides for every run, e.g. train.precision=bf16 on a CPU with native bf16")
    ap.add_argument("--summary-only", action="store_true", help="print the tables of the runs in --out; train nothing")
    args = ap.parse_args()

    from lorafit import compare, hardware

    print(hardware.cpu_line())
    failed = []
    if not args.summary_only:
        jobs = [(option, seed) for seed in args.seeds for option in args.options]  # seed by seed: pairs complete early
        with ThreadPoolExecutor(max_workers=args.workers) as pool:
            failed = [f for f in pool.map(lambda job: _run(args.out, *job, args.overrides), jobs) if f]
    print(table(args.out))
    finished = [run for option in OPTIONS for run in sorted((args.out / option).glob("seed=*")) if (run / "summary.json").is_file()]
    if finished:
        result = compare.compare(compare.collect(finished))
        (args.out / "compare.md").write_text(compare.to_markdown(result), encoding="utf-8")
        print(f"\nlorafit compare: {args.out / 'compare.md'}")
    if failed:
        print(f"failed runs (see their logs): {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
