"""Few-shot intent classification: lorafit's few-shot recipe against SetFit, on the same draws.

For each setting (dataset, shots per class) and each draw, the training examples are drawn by lorafit's
own `data.shots_per_class` / `data.draw_seed` (`lorafit.data.load`), so both tools see exactly the same
texts. SetFit is trained as its paper and docs recommend (the `setfit` package, same all-MiniLM-L6-v2
backbone, contrastive body training on pairs: batch 16, 20 pair iterations per example, one epoch, body
learning rate 2e-5, then its logistic-regression head); it uses no validation data. lorafit trains the
shipped few-shot config of the dataset (configs/banking77-10shot.yaml; configs/emotion-8shot.yaml for
emotion, whose contrastive stage the README explains) with the same draw. Its validation examples (N per
class, drawn from the rest of train) choose the best epoch and set the temperature, so lorafit's model
has seen 2N labelled examples per class to SetFit's N; the variant `--variant last train.keep=last` keeps
the final epoch instead, so validation chooses nothing about its weights (the temperature does not move
the top class): that row compares the two on the same N labels. Both are scored once on the full test
set. Each run is its own process; finished runs (a JSON line in the results file) are reused, so an
interrupted bench goes on where it stopped, in this session or a later one (--results names a file
kept with the project: bench/results/fewshot.jsonl holds the runs the README quotes). A lorafit row
trained from another config than the dataset's shipped one today is stale: ignored, and trained again.

Prints, per setting, mean +- 95% CI over draws of test accuracy and macro-F1 and training seconds per
run for each tool, and paired tests over the draws both tools ran (lorafit.compare's two-level bootstrap
over draws and test examples, McNemar's exact test per draw, and from three draws a paired t-test).

    python bench/fewshot.py --out runs/fewshot                      # the acceptance settings
    python bench/fewshot.py --out runs/fewshot --settings banking77:10 --draws 0 1
    python bench/fewshot.py --out runs/fewshot --results bench/results/fewshot.jsonl --summary-only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ["banking77:10", "banking77:5", "emotion:8"]
#: The shipped few-shot recipe per dataset (its data.name and shots are set per run); a dataset without
#: its own takes Banking77's.
CONFIGS = {"banking77": "configs/banking77-10shot.yaml", "emotion": "configs/emotion-8shot.yaml"}


def config_for(dataset: str) -> str:
    return CONFIGS.get(dataset, CONFIGS["banking77"])


def _draw(dataset: str, shots: int, draw: int):
    """The few-shot draw exactly as a lorafit run with these settings makes it."""
    from lorafit import data
    from lorafit.config import load_config

    cfg = load_config(None, [f"data.name={dataset}", f"data.shots_per_class={shots}", f"data.draw_seed={draw}", f"seed={draw}"])
    found, _ = data.load(cfg.data, cfg.seed)
    return found


def run_setfit(dataset: str, shots: int, draw: int, iterations: int) -> dict:
    """One SetFit run (in this process): train on the draw, score the full test set."""
    import numpy as np
    from datasets import Dataset
    from setfit import SetFitModel, Trainer, TrainingArguments
    from sklearn.metrics import accuracy_score, f1_score

    from lorafit.models import resolve_model_path

    found = _draw(dataset, shots, draw)
    train, test = found.splits["train"], found.splits["test"]
    index = {name: i for i, name in enumerate(found.label_names)}
    model = SetFitModel.from_pretrained(resolve_model_path("minilm-l6"))
    # SetFit's Trainer writes its checkpoints to output_dir ("checkpoints" in the current folder by
    # default): a temporary folder, so no run leaves hundreds of MB in the checkout.
    with tempfile.TemporaryDirectory(prefix="setfit-") as scratch:
        args = TrainingArguments(output_dir=scratch, batch_size=16, num_epochs=1, num_iterations=iterations,
                                 body_learning_rate=2e-5, seed=draw, report_to="none", show_progress_bar=False)
        trainer = Trainer(model=model, args=args,
                          train_dataset=Dataset.from_dict({"text": train.texts, "label": [index[y] for y in train.labels]}))
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    predicted = np.asarray(model.predict(test.texts, batch_size=128, as_numpy=True))
    truth = np.array([index[y] for y in test.labels])
    return {"accuracy": float(accuracy_score(truth, predicted)), "macro_f1": float(f1_score(truth, predicted, average="macro")),
            "train_seconds": seconds, "n_train": len(train), "n_test": len(test),
            "correct": "".join("1" if c else "0" for c in predicted == truth)}


def run_lorafit(dataset: str, shots: int, draw: int, out: Path, overrides: list[str], tool: str = "lorafit") -> dict:
    """One lorafit run (its own process), read back from the run folder."""
    folder = out / f"{dataset}-{shots}shot" / f"{tool.replace('[', '-').rstrip(']')}-d{draw}"
    command = [sys.executable, "-m", "lorafit", "train", str(ROOT / config_for(dataset)), f"data.name={dataset}",
               f"data.shots_per_class={shots}", f"data.draw_seed={draw}", f"seed={draw}", *overrides,
               "--out", str(folder), "--overwrite", "--quiet"]
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.with_suffix(".log"), "w") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise SystemExit(f"lorafit run failed (exit {code}); see {folder.with_suffix('.log')}")
    from lorafit.rundir import RunDir

    run = RunDir(folder)
    test, predictions = run.eval(), run.predictions()
    correct = "".join("1" if p == t else "0" for p, t in zip(predictions.predicted, predictions.target))
    summary = run.summary()
    return {"accuracy": test.accuracy, "macro_f1": test.macro_f1, "train_seconds": summary.train_seconds,
            "validation_accuracy": (summary.best_validation or {}).get("accuracy"),
            "n_train": sum(summary.train_label_counts.values()),  # augmented examples included
            "run": str(folder), "correct": correct}


def _results(path: Path) -> list[dict]:
    """The finished runs of the results file, less lorafit rows trained from another config than their
    dataset's shipped one today (stale: the recipe changed since)."""
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["tool"] == "setfit" or r.get("config") == config_for(r["dataset"])]


def _key(r: dict) -> tuple:
    return (r["tool"], r["dataset"], r["shots"], r["draw"])


def summarise(results: list[dict], settings: list[tuple[str, int]], draws: list[int]) -> str:
    from lorafit.compare import mean_ci, paired_tests

    def cell(values: list[float], scale: float = 100, digits: int = 2) -> str:
        mean, half = mean_ci([scale * v for v in values])
        return f"{mean:.{digits}f}" + (f" ± {half:.{digits}f}" if half is not None else "")

    lines = ["| setting | tool | draws | test accuracy | macro-F1 | train s/run | validation accuracy |",
             "|---|---|---:|---:|---:|---:|---:|"]
    tests = []
    by = {_key(r): r for r in results}
    tools = list(dict.fromkeys(["setfit", "lorafit", *sorted(r["tool"] for r in results)]))
    for dataset, shots in settings:
        pairs = {}
        for tool in tools:
            rows = [by[(tool, dataset, shots, d)] for d in draws if (tool, dataset, shots, d) in by]
            pairs[tool] = {r["draw"]: r for r in rows}
            if rows:
                validation = [r["validation_accuracy"] for r in rows if r.get("validation_accuracy") is not None]
                lines.append(f"| {dataset} {shots}-shot | {tool} | {len(rows)} | {cell([r['accuracy'] for r in rows])} | "
                             f"{cell([r['macro_f1'] for r in rows])} | {cell([r['train_seconds'] for r in rows], 1, 0)} | "
                             f"{cell(validation) if validation else '-'} |")
        for tool in tools[1:]:
            tests.extend(_paired(pairs, "setfit", tool, dataset, shots, cell, paired_tests))
        for tool in tools[2:]:
            tests.extend(_paired(pairs, "lorafit", tool, dataset, shots, cell, paired_tests))
    return "\n".join(lines + [""] + tests)


def _paired(pairs: dict, a: str, b: str, dataset: str, shots: int, cell, paired_tests) -> list[str]:
    """b - a on the draws both ran: test accuracy (paired tests), and validation accuracy where both have it."""
    common = sorted(set(pairs[a]) & set(pairs[b]))
    out = []
    if len(common) >= 2:
        from scipy import stats

        # lorafit compare's paired test, draws in the place of seeds: a two-level bootstrap (draws,
        # then test examples) of the accuracy difference, and McNemar's exact test per draw.
        test = paired_tests(_group(pairs[a], common), _group(pairs[b], common))
        diffs = [100 * (pairs[b][d]["accuracy"] - pairs[a][d]["accuracy"]) for d in common]
        # A t-test over two draws (one degree of freedom) says little: shown from three draws on.
        t_p = (f"paired t-test over draws p = {stats.ttest_rel([pairs[b][d]['accuracy'] for d in common], [pairs[a][d]['accuracy'] for d in common]).pvalue:.3g}; "
               if len(common) >= 3 else "")
        out.append(f"{dataset} {shots}-shot, draws {common}: {b} - {a} test accuracy {cell(diffs, 1)} points "
                   f"({b} ahead on {sum(d > 0 for d in diffs)} of {len(diffs)}); bootstrap 95% CI "
                   f"[{100 * test['ci_low']:+.2f}, {100 * test['ci_high']:+.2f}], p = {test['p_bootstrap']:.3g}; "
                   f"{t_p}McNemar per draw, largest p = {test['p_mcnemar']:.3g}")
        if all(pairs[t][d].get("validation_accuracy") is not None for t in (a, b) for d in common):
            val = [100 * (pairs[b][d]["validation_accuracy"] - pairs[a][d]["validation_accuracy"]) for d in common]
            out.append(f"  validation accuracy {b} - {a}: {cell(val, 1)} points")
    return out


def _group(runs: dict[int, dict], draws: list[int]) -> SimpleNamespace:
    """What lorafit.compare.paired_tests reads of a group: per draw (as its seed) the correct test examples."""
    import numpy as np

    members = []
    for d in draws:
        correct = np.frombuffer(runs[d]["correct"].encode(), dtype=np.uint8) == ord("1")
        members.append(SimpleNamespace(replicate=d, correct=correct, target=np.zeros(len(correct), dtype=np.int64)))
    return SimpleNamespace(runs=members)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="folder for lorafit runs (required)")
    parser.add_argument("--results", type=Path, help="the JSON-lines file of finished runs (default: OUT/results.jsonl)")
    parser.add_argument("--settings", nargs="+", default=SETTINGS, help="dataset:shots, e.g. banking77:10")
    parser.add_argument("--draws", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--tools", nargs="+", default=["setfit", "lorafit"], choices=["setfit", "lorafit"])
    parser.add_argument("--setfit-iterations", type=int, default=20, help="SetFit pair iterations per example (paper: 20)")
    parser.add_argument("--summary-only", action="store_true", help="print the table from results.jsonl, train nothing")
    parser.add_argument("--one", nargs=3, metavar=("DATASET", "SHOTS", "DRAW"), help=argparse.SUPPRESS)
    parser.add_argument("--variant", help="name of a lorafit variant (its runs are tool 'lorafit[NAME]'), set by the overrides")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every lorafit run (not SetFit's: its "
                        "draw is the plain data.shots_per_class/draw_seed one)")
    args = parser.parse_args()

    if args.one:  # a SetFit run in a fresh process: its JSON on the last line
        dataset, shots, draw = args.one[0], int(args.one[1]), int(args.one[2])
        print(json.dumps(run_setfit(dataset, shots, draw, args.setfit_iterations)))
        return 0

    if args.out is None:
        parser.error("--out is required")
    from lorafit.hardware import cpu_line

    settings = [(s.split(":")[0], int(s.split(":")[1])) for s in args.settings]
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.results or args.out / "results.jsonl"
    done = {_key(r) for r in _results(path)}
    for dataset, shots in settings if not args.summary_only else []:
        for draw in args.draws:
            for tool in [f"lorafit[{args.variant}]" if t == "lorafit" and args.variant else t for t in args.tools]:
                if (tool, dataset, shots, draw) in done:
                    continue
                print(f"{tool} {dataset} {shots}-shot draw {draw} ...", file=sys.stderr, flush=True)
                if tool == "setfit":
                    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
                    command = [sys.executable, __file__, "--one", dataset, str(shots), str(draw),
                               "--setfit-iterations", str(args.setfit_iterations)]
                    done_run = subprocess.run(command, capture_output=True, text=True, env=env)
                    if done_run.returncode != 0:
                        print(done_run.stderr[-3000:], file=sys.stderr)
                        return 1
                    result = json.loads(done_run.stdout.strip().splitlines()[-1])
                else:
                    result = run_lorafit(dataset, shots, draw, args.out, args.overrides, tool)
                record = {"tool": tool, "dataset": dataset, "shots": shots, "draw": draw, **result,
                          "setfit_iterations": args.setfit_iterations if tool == "setfit" else None,
                          "overrides": args.overrides if tool.startswith("lorafit") else None,
                          "config": config_for(dataset) if tool.startswith("lorafit") else None,
                          "cpu": cpu_line(), "threads": os.environ.get("OMP_NUM_THREADS")}
                with open(path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                print(f"  accuracy {100 * result['accuracy']:.2f}  macro-F1 {100 * result['macro_f1']:.2f}  "
                      f"{result['train_seconds']:.0f} s", file=sys.stderr, flush=True)
    print(cpu_line())
    print(summarise(_results(path), settings, args.draws))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
