"""`lorafit compare`: runs grouped into configurations, with the statistics that say which differences are real.
(Just over 400 lines: the grouping, the statistics and the tables they feed stay together.)

A *configuration* is everything in a run's config except the seed (and settings that cannot change
results: threads, progress bars, logging and checkpoint cadence); its runs over different seeds are
its samples. Per configuration: efficiency figures, the mean validation figure of its runs' best
epochs, test accuracy and macro-F1 as mean ± the 95% t-interval half-width over seeds, and against
the *reference* configuration, the one with the best mean **validation** figure (by the metric the
runs chose their best epochs by, `train.metric`; accuracy from each best epoch's record where runs
differ in it). Test figures never choose anything: a reference picked on test would then be tested
against the others on the very data that crowned it. Against the reference:

- the accuracy difference with a 95% paired-bootstrap interval: shared seeds and test examples are
  resampled (the same examples for every seed of a draw), the statistic is the mean over seeds of
  the per-seed accuracy difference, so seed noise and example noise both show;
- the bootstrap's two-sided p-value (seeds and examples both resampled), 2 (k + 1) / (B + 1) with k
  the draws on the far side of 0 (so never below 2 / (B + 1)), and McNemar's exact test on
  per-example correctness, per shared seed, reporting the largest p (the conservative reading).
  Every row is tested against the reference without a multiple-comparison correction: read
  p-values near 0.05 with that in mind.

Also: per-class F1 against training-set frequency (Spearman's rho: do rare classes suffer?), the
most confused label pairs, and per-class misclassification proportions across configurations
(the classes that stay hardest whatever the configuration). Pure reading of run folders.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserError
from .rundir import Eval, RunDir, Summary, make_folder

__all__ = ["Run", "Group", "choose_reference", "collect", "compare", "columns", "to_markdown", "write"]

#: Settings that do not change what a run computes: runs differing only here are one configuration.
_NOT_CONFIGURATION = {("seed",), ("data", "draw_seed"), ("train", "threads"), ("train", "progress"), ("train", "log_every"),
                      ("train", "checkpoint_every"), ("train", "keep_checkpoints")}
BOOTSTRAP_SAMPLES = 10_000


@dataclass
class Run:
    path: Path
    seed: int
    settings: dict[str, Any]  # flattened config without the seed etc.
    summary: Summary
    eval: Eval
    labels: list[str]
    target: np.ndarray | None = None
    correct: np.ndarray | None = None  # per test example
    label: str | None = None  # a sweep trial's swept values without the seed, e.g. "rank=16, alpha=2x"
    draw: int | None = None  # the few-shot draw's seed (data.draw_seed, else the seed); None: not a few-shot run
    trained_on_validation: bool = False  # data.train_on_validation (lorafit train --final): its validation figures are not held out

    @property
    def replicate(self) -> int | str:
        """What tells a configuration's samples apart and pairs them across configurations: the seed, or for
        few-shot runs the seed and the draw ("0/d3"), so draws are samples too (sweeps vary them separately)."""
        return self.seed if self.draw is None else f"{self.seed}/d{self.draw}"


@dataclass
class Group:
    settings: dict[str, Any]
    runs: list[Run] = field(default_factory=list)
    name: str = ""

    @property
    def validation_held_out(self) -> bool:
        """Whether its runs' validation figures are held out (no run trained on its validation rows)."""
        return not any(r.trained_on_validation for r in self.runs)


def _flatten(tree: dict, prefix: tuple = ()) -> dict[tuple, Any]:
    out = {}
    for key, value in tree.items():
        path = prefix + (key,)
        if isinstance(value, dict):
            out.update(_flatten(value, path))
        else:
            out[path] = value
    return out


def _settings(cfg) -> dict[str, Any]:
    """A run's configuration as dotted settings, less what does not make it another configuration: the
    seed and output settings (_NOT_CONFIGURATION), track.* and ood.* (which change neither training nor the
    figures compared here; ood.* only the post-hoc out-of-scope scoring in eval.json's `ood` section)."""
    flat = _flatten(cfg.model_dump(mode="json"))
    return {".".join(k): v for k, v in flat.items() if k not in _NOT_CONFIGURATION and k[0] not in ("track", "ood")}


def _read_run(folder: Path) -> Run:
    run = RunDir(folder)
    cfg = run.config()
    settings = _settings(cfg)
    if settings.get("distill.teacher") is not None:
        settings["distill.teacher"] = _teacher_setting(run, settings["distill.teacher"])
    final_of = (run.derived().get("final_of") or {}) if cfg.data.train_on_validation else {}
    if final_of.get("epochs_rule") == "best":
        # lorafit train --final: each seed trains its own run's best epoch count, a choice of that run's
        # validation (as a best epoch is), not another configuration; the run's own train.epochs still is
        settings["train.epochs"] = f"its run's best epoch count (of {_source_epochs(final_of)})"
    result = Run(folder, cfg.seed, settings, run.summary(), run.eval(), run.labels(),
                 trained_on_validation=cfg.data.train_on_validation)
    if cfg.data.shots_per_class is not None:
        result.draw = cfg.seed if cfg.data.draw_seed is None else cfg.data.draw_seed
    if (folder / "predictions.json").is_file():
        p = run.predictions()
        result.target = np.asarray(p.target)
        result.correct = np.asarray(p.predicted) == result.target
    return result


def _source_epochs(final_of: dict) -> int | str:
    """The train.epochs of the run a final model was made from (recorded since it exists; else read from that run)."""
    if "source_train_epochs" in final_of:
        return final_of["source_train_epochs"]
    try:
        return RunDir(final_of["run"]).config().train.epochs
    except (UserError, KeyError):
        return "?"


def _teacher_setting(run: RunDir, given: str) -> str:
    """distill.teacher as a setting: the teacher's own configuration without its seed, so that students of
    one recipe, each distilled from its own seed's teacher, are one configuration. The teacher folder is
    the one config.yaml's derived.distill resolved at training time; gone, its path with any seed=N as seed=*."""
    teacher = Path((run.derived().get("distill") or {}).get("teacher") or given)
    try:
        settings = _settings(RunDir(teacher).config())
    except UserError:  # gone, moved or unreadable: the path stands for it
        return re.sub(r"seed=\d+", "seed=*", given)
    if (teacher / "export.json").is_file():  # an export or soup carries its first run's config: what it is counts too
        meta = json.loads((teacher / "export.json").read_text(encoding="utf-8"))
        settings["export"] = [meta.get("format"), meta.get("quantize"), len((meta.get("soup") or {}).get("runs") or [])]
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"a {settings['method.name']} run ({digest})"


def collect(paths: list[str | Path]) -> list[Run]:
    """Finished runs from run folders and sweep folders (whose trial folders are read)."""
    folders: list[Path] = []
    labels: dict[Path, str] = {}
    for item in paths:
        path = Path(item)
        if (path / "sweep.json").is_file():
            trials = json.loads((path / "sweep.json").read_text())["trials"]
            for t in trials:
                if (path / t["name"] / "summary.json").is_file():
                    folders.append(path / t["name"])
                    labels[path / t["name"]] = _sweep_label(t["name"])
        elif (path / "summary.json").is_file():
            folders.append(path)
        elif path.is_dir():
            raise UserError(f"{path} is neither a finished run (no summary.json) nor a sweep folder (no sweep.json)")
        elif path.exists():
            raise UserError(f"{path} is a file; give a run folder or a sweep folder")
        else:
            raise UserError(f"{path} not found")
    if not folders:
        raise UserError("no finished runs to compare")
    runs = [_read_run(f) for f in folders]
    for run in runs:
        run.label = labels.get(run.path)
    return runs


def _sweep_label(trial: str) -> str:
    """'rank=16,alpha=2x,seed=0' -> 'rank=16, alpha=2x'; 'base=banking77-dora,seed=1' -> 'base=banking77-dora'."""
    parts = [p for p in re.split(r",(?=[A-Za-z_.]+=)", trial) if not re.fullmatch(r"(seed|draw_seed)=\d+", p)]
    return ", ".join(parts) or "all runs"


def _group(runs: list[Run]) -> list[Group]:
    groups: dict[str, Group] = {}
    for run in runs:
        key = json.dumps(run.settings, sort_keys=True, default=str)
        groups.setdefault(key, Group(run.settings)).runs.append(run)
    out = list(groups.values())
    keys = list(dict.fromkeys(k for g in out for k in g.settings))  # every group's keys: methods differ in theirs
    varying = [k for k in keys if len({json.dumps(g.settings.get(k), default=str) for g in out}) > 1]
    taken: dict[str, int] = {}
    for g in out:
        seeds = [r.replicate for r in g.runs]
        if len(seeds) != len(set(seeds)):
            raise UserError(f"configuration {g.runs[0].path} has two runs with the same seed (and draw); compare distinct runs")
        shown = [k for k in varying if k in g.settings]
        name = ", ".join(f"{k.rsplit('.', 1)[-1] if _unique_leaf(k, varying) else k}={g.settings[k]}" for k in shown) or "all runs"
        taken[name] = taken.get(name, 0) + 1
        g.name = name if taken[name] == 1 else f"{name} #{taken[name]}"  # names key the per-class tables
    # Trials of one sweep are named by what the sweep varied (shorter than every differing setting
    # when whole base configs are swept), where those names tell the configurations apart.
    labels = [{r.label for r in g.runs} for g in out]
    if all(len(s) == 1 and None not in s for s in labels) and len({next(iter(s)) for s in labels}) == len(out):
        for g, s in zip(out, labels):
            g.name = next(iter(s))
    return out


def _unique_leaf(key: str, keys: list[str]) -> bool:
    leaf = key.rsplit(".", 1)[-1]
    return sum(k.rsplit(".", 1)[-1] == leaf for k in keys) == 1


def mean_ci(values: list[float]) -> tuple[float, float | None]:
    """Mean and the half-width of its 95% t-interval (None for a single value)."""
    from scipy import stats

    n = len(values)
    mean = float(np.mean(values))
    if n < 2:
        return mean, None
    return mean, float(stats.t.ppf(0.975, n - 1) * np.std(values, ddof=1) / math.sqrt(n))


def _validation(run: Run, metric: str) -> float:
    """The run's best-epoch validation `metric`: summary.json's best_validation, else its metrics.jsonl record."""
    recorded = run.summary.best_validation or {}
    if metric in recorded:
        return float(recorded[metric])
    best_epoch = run.summary.best_epoch
    for record in RunDir(run.path).metrics() if (run.path / "metrics.jsonl").is_file() else []:
        if record.get("type") == "epoch" and record.get("epoch") == best_epoch and f"val_{metric}" in record:
            return float(record[f"val_{metric}"])
    raise UserError(f"{run.path} has no validation {metric} for its best epoch (summary.json best_validation, "
                    "metrics.jsonl); the reference configuration is chosen on validation, never on test")


def choose_reference(groups: list[Group]) -> tuple[int, str, list[float]]:
    """(index of the reference configuration, the validation metric that chose it, each group's mean).

    The metric is the runs' `train.metric` (what picked their best epochs) when they share one, else
    accuracy. Reads validation figures only, and only held-out ones: a configuration that trained on its
    validation rows (lorafit train --final) is shown with them but cannot be the reference.
    """
    chosen_by = {r.settings.get("train.metric") or next(iter(r.summary.best_validation or {}), None)
                 for g in groups for r in g.runs}
    metric = chosen_by.pop() if len(chosen_by) == 1 and None not in chosen_by else "accuracy"
    means = [float(np.mean([_validation(r, metric) for r in g.runs])) for g in groups]
    held_out = [i for i, g in enumerate(groups) if g.validation_held_out]
    if not held_out:
        raise UserError("every configuration trained on its validation rows (lorafit train --final), so none has held-out "
                        "validation figures to choose a reference by; compare them together with the runs they refit")
    index = min(held_out, key=lambda i: means[i]) if metric == "loss" else max(held_out, key=lambda i: means[i])
    return index, metric, means


def paired_tests(best: Group, other: Group, seed: int = 0) -> dict | None:
    """Bootstrap interval and p-value of accuracy(other) - accuracy(best), and McNemar's p, over shared seeds."""
    from scipy import stats

    shared = sorted({r.replicate for r in best.runs} & {r.replicate for r in other.runs})
    pairs = []
    for s in shared:
        a = next(r for r in best.runs if r.replicate == s)
        b = next(r for r in other.runs if r.replicate == s)
        if a.correct is None or b.correct is None or a.target.shape != b.target.shape or not np.array_equal(a.target, b.target):
            continue
        pairs.append((a.correct, b.correct))
    if not pairs:
        return None
    best_correct = np.stack([p[0] for p in pairs]).astype(np.float64)  # (S, N)
    other_correct = np.stack([p[1] for p in pairs]).astype(np.float64)
    diff = other_correct - best_correct  # (S, N)
    observed = float(diff.mean())
    rng = np.random.default_rng(seed)
    n_seeds, n = diff.shape
    # Two-level bootstrap: resample the shared seeds, then the test examples (the same examples for
    # every seed of a draw), so both seed-to-seed and example noise widen the interval.
    draws = np.empty(BOOTSTRAP_SAMPLES)
    for i in range(0, BOOTSTRAP_SAMPLES, 500):
        size = min(500, BOOTSTRAP_SAMPLES - i)
        seeds = rng.integers(0, n_seeds, size=(size, n_seeds))  # (D, S)
        examples = rng.integers(0, n, size=(size, n))  # (D, N)
        per_seed = np.stack([diff[:, examples[d]].mean(axis=1) for d in range(size)])  # (D, S) accuracy differences
        draws[i : i + size] = np.take_along_axis(per_seed, seeds, axis=1).mean(axis=1)
    low, high = np.quantile(draws, [0.025, 0.975])
    # Two-sided bootstrap p-value for "no difference": k = the draws on the far side of 0 (the
    # smaller tail), p = 2 (k + 1) / (B + 1), counting the observed difference as one of the draws
    # (Phipson & Smyth 2010, "Permutation p-values should never be zero"): B draws cannot show a p
    # below 2 / (B + 1), and k = 0 must not read as p = 0.
    far_side = int(min((draws <= 0).sum(), (draws >= 0).sum()))
    p_boot = min(1.0, 2 * (far_side + 1) / (BOOTSTRAP_SAMPLES + 1))
    # McNemar's exact test per seed (pooling seeds would count near-identical predictions S times);
    # the largest p over the seeds is reported, the conservative reading.
    only_best = ((best_correct == 1) & (other_correct == 0)).sum(axis=1).astype(int)  # (S,)
    only_other = ((best_correct == 0) & (other_correct == 1)).sum(axis=1).astype(int)
    p_mcnemar = max(float(stats.binomtest(int(min(b, o)), int(b + o), 0.5).pvalue) if b + o else 1.0
                    for b, o in zip(only_best, only_other))
    return {"seeds": n_seeds, "difference": observed, "ci_low": float(low), "ci_high": float(high),
            "p_bootstrap": p_boot, "p_mcnemar": p_mcnemar,
            "only_best_correct": [int(x) for x in only_best], "only_other_correct": [int(x) for x in only_other]}


def compare(runs: list[Run]) -> dict:
    """Everything `lorafit compare` prints and writes, as data."""
    groups = _group(runs)
    labels = runs[0].labels
    if any(r.labels != labels for r in runs):
        raise UserError("the runs have different label spaces; compare runs on the same dataset")
    rows = []
    for g in groups:
        acc = mean_ci([r.summary.test_accuracy for r in g.runs])
        f1 = mean_ci([r.summary.test_macro_f1 for r in g.runs])
        s0 = g.runs[0].summary
        rows.append({
            "configuration": g.name, "seeds": sorted(r.replicate for r in g.runs), "method": g.settings.get("method.name"),
            "runs": [str(r.path) for r in g.runs],
            "trainable_params": s0.trainable_params, "trainable_percent": s0.trainable_percent,
            "adapter_bytes": s0.adapter_bytes,
            "seconds_per_epoch": float(np.mean([r.summary.seconds_per_epoch for r in g.runs])),
            "peak_memory_mb": float(np.mean([r.summary.peak_memory_mb for r in g.runs])),
            "accuracy": acc[0], "accuracy_ci": acc[1], "macro_f1": f1[0], "macro_f1_ci": f1[1],
        })
    best_index, metric, validation = choose_reference(groups)
    for i, (row, g) in enumerate(zip(rows, groups)):
        row["validation"] = validation[i]
        row["validation_held_out"] = g.validation_held_out
        row["best"] = i == best_index  # the reference: best mean validation `metric`
        row["versus_best"] = None if i == best_index else paired_tests(groups[best_index], g)
    return {"rows": rows, "per_class": _per_class(groups, labels, best_index), "best": rows[best_index]["configuration"],
            "reference_metric": metric, "confused_pairs": _confused_pairs(groups[best_index], labels)}


def _per_class(groups: list[Group], labels: list[str], reference: int) -> dict:
    """Per class: training count, F1 and misclassification proportion per configuration (seed means)."""
    counts = groups[0].runs[0].summary.train_label_counts
    f1 = {g.name: [float(np.mean([r.eval.per_class[label].f1 for r in g.runs])) for label in labels] for g in groups}
    error = {g.name: [float(np.mean([1 - r.eval.per_class[label].recall for r in g.runs])) for label in labels] for g in groups}
    rho = None
    if counts:
        from scipy import stats

        rho = {g.name: float(stats.spearmanr([counts.get(label, 0) for label in labels], f1[g.name]).statistic) for g in groups}
        rho["_best"] = groups[reference].name
    mean_error = np.mean([error[g.name] for g in groups], axis=0)
    hardest = [labels[i] for i in np.argsort(-mean_error, kind="stable")]
    return {"labels": labels, "train_counts": [counts.get(label, 0) for label in labels] if counts else None,
            "f1": f1, "error": error, "spearman_count_f1": rho, "hardest": hardest,
            "mean_error": {labels[i]: float(mean_error[i]) for i in range(len(labels))}}


def _confused_pairs(group: Group, labels: list[str], k: int = 10) -> list[dict]:
    total = np.sum([np.array(r.eval.confusion) for r in group.runs], axis=0)
    np.fill_diagonal(total, 0)
    order = np.dstack(np.unravel_index(np.argsort(-total, axis=None, kind="stable"), total.shape))[0][:k]
    return [{"true": labels[t], "predicted": labels[p], "count": int(total[t, p]), "runs": len(group.runs)}
            for t, p in order if total[t, p] > 0]


# -- output -----------------------------------------------------------------------------------------

def _pct(value: float | None, ci: float | None = None) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.2f}" + (f" ± {100 * ci:.2f}" if ci is not None else "")


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def _p(value: float) -> str:
    """Four decimals; below 1e-4 (exact McNemar p can be) two significant digits, never a bare "<"."""
    return f"{value:.4f}" if value >= 1e-4 else f"{value:.1e}"


def _validation_cell(row: dict, metric: str) -> str:
    """A result row's mean validation figure, marked where its runs trained on their validation rows."""
    value = row["validation"]
    cell = f"{value:.4f}" if metric == "loss" else f"{100 * value:.2f}"
    return cell + ("" if row.get("validation_held_out", True) else " (trained on)")


def _chosen_by(result: dict) -> str:
    metric = result["reference_metric"]
    return f"{'lowest' if metric == 'loss' else 'highest'} mean validation {metric.replace('_', '-')}"


def columns(result: dict) -> list[str]:
    """The configuration table's header; `table_rows` gives its cells (compare.md and the HTML report)."""
    metric = result["reference_metric"].replace("_", "-")
    validation = f"validation {metric}{'' if metric == 'loss' else ' %'} (mean; picks the reference)"
    return ["configuration", "seeds", "trainable", "trainable %", "adapter size", "s/epoch", "peak memory", validation,
            "test accuracy % (mean ± 95% CI)", "test macro-F1 %", "Δ test accuracy vs reference [95% CI]", "p (bootstrap)",
            "p (McNemar)"]


def table_rows(result: dict) -> list[list[str]]:
    """One row of cells per configuration, in validation order: the reference first."""
    metric = result["reference_metric"]
    table = []
    for r in sorted(result["rows"], key=lambda r: (not r["best"], r["validation"] if metric == "loss" else -r["validation"])):
        v = r["versus_best"]
        if r["best"]:
            versus = ["reference", "", ""]
        elif v is None:
            versus = ["not paired: no shared seed with predictions.json", "", ""]
        else:
            versus = [f"{100 * v['difference']:+.2f} [{100 * v['ci_low']:+.2f}, {100 * v['ci_high']:+.2f}]",
                      _p(v["p_bootstrap"]), _p(v["p_mcnemar"])]
        table.append([r["configuration"], str(len(r["seeds"])), f"{r['trainable_params']:,}", f"{r['trainable_percent']:.2f}",
                      _size(r["adapter_bytes"]), f"{r['seconds_per_epoch']:.0f}", f"{r['peak_memory_mb']:,.0f} MB",
                      _validation_cell(r, metric),
                      _pct(r["accuracy"], r["accuracy_ci"]), _pct(r["macro_f1"], r["macro_f1_ci"]), *versus])
    return table


def to_markdown(result: dict, hardest: int = 15) -> str:
    out = io.StringIO()
    header = columns(result)
    out.write("| " + " | ".join(header) + " |\n|---|" + "---:|" * (len(header) - 1) + "\n")
    for cells in table_rows(result):
        out.write("| " + " | ".join(cells) + " |\n")
    out.write(f"\nReference: {result['best']}, the {_chosen_by(result)} over seeds (each run's best epoch); "
              "test figures are reported, never used to choose.\n")
    if not all(r.get("validation_held_out", True) for r in result["rows"]):
        out.write("\n(trained on): a configuration trained on its validation rows (`lorafit train --final`); its "
                  "validation figures are not held out, so it cannot be the reference.\n")
    out.write("\nCI: 95% t-interval over seeds (none with one seed). Δ and p: paired over shared seeds and the same "
              f"test examples. Bootstrap: B = {BOOTSTRAP_SAMPLES:,} draws, each resampling the shared seeds and, once for all "
              "seeds, the test examples (two levels); statistic the mean over seeds of the per-seed accuracy difference; "
              "interval its 2.5-97.5 % quantiles; p = 2 (k + 1) / (B + 1) with k the draws on the far side of 0, so "
              f"{2 / (BOOTSTRAP_SAMPLES + 1):.4f} is the smallest it can report. McNemar: exact binomial test per seed, "
              "the largest p. No multiple-comparison correction.\n")
    pc = result["per_class"]
    if pc["spearman_count_f1"]:
        rho = {k: v for k, v in pc["spearman_count_f1"].items() if not k.startswith("_")}
        out.write("\n**Per-class F1 against training-set frequency** (Spearman's rho; positive: rarer classes score lower): "
                  + "; ".join(f"{name}: {value:+.2f}" for name, value in rho.items()) + "\n")
    out.write(f"\n**Most confused pairs** (reference configuration, {result['best']}, summed over seeds):\n\n")
    out.write("| true | predicted | count |\n|---|---|---:|\n")
    for c in result["confused_pairs"]:
        out.write(f"| {c['true']} | {c['predicted']} | {c['count']} |\n")
    names = list(pc["error"])
    out.write("\n**Hardest classes across configurations** (misclassification proportion = 1 - recall, mean over seeds):\n\n")
    out.write("| class | train count | " + " | ".join(names) + " |\n|---|---:|" + "---:|" * len(names) + "\n")
    index = {label: i for i, label in enumerate(pc["labels"])}
    for label in pc["hardest"][:hardest]:
        i = index[label]
        count = pc["train_counts"][i] if pc["train_counts"] else "n/a"
        out.write(f"| {label} | {count} | " + " | ".join(f"{pc['error'][n][i]:.2f}" for n in names) + " |\n")
    return out.getvalue()


def write(result: dict, folder: Path) -> list[Path]:
    """compare.md, compare.csv (one row per configuration), per_class.csv (one row per class)."""
    make_folder(folder)
    (folder / "compare.md").write_text(to_markdown(result), encoding="utf-8")
    with open(folder / "compare.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["configuration", "seeds", "trainable_params", "trainable_percent", "adapter_bytes", "seconds_per_epoch",
                         "peak_memory_mb", f"validation_{result['reference_metric']}_mean", "reference", "accuracy_mean",
                         "accuracy_ci95", "macro_f1_mean", "macro_f1_ci95",
                         "delta_vs_best", "delta_ci_low", "delta_ci_high", "p_bootstrap", "p_mcnemar"])
        for r in result["rows"]:
            v = r["versus_best"] or {}
            writer.writerow([r["configuration"], " ".join(map(str, r["seeds"])), r["trainable_params"], r["trainable_percent"],
                             r["adapter_bytes"], r["seconds_per_epoch"], r["peak_memory_mb"], r["validation"], r["best"],
                             r["accuracy"], r["accuracy_ci"],
                             r["macro_f1"], r["macro_f1_ci"], v.get("difference"), v.get("ci_low"), v.get("ci_high"),
                             v.get("p_bootstrap"), v.get("p_mcnemar")])
    pc = result["per_class"]
    with open(folder / "per_class.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        names = list(pc["f1"])
        writer.writerow(["class", "train_count", *[f"f1[{n}]" for n in names], *[f"error[{n}]" for n in names]])
        for i, label in enumerate(pc["labels"]):
            writer.writerow([label, pc["train_counts"][i] if pc["train_counts"] else "", *[pc["f1"][n][i] for n in names],
                             *[pc["error"][n][i] for n in names]])
    return [folder / "compare.md", folder / "compare.csv", folder / "per_class.csv"]
