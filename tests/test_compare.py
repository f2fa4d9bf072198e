"""`lorafit compare`: grouping over seeds, intervals and paired tests checked against hand computations."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from lorafit.cli import main
from lorafit.compare import (BOOTSTRAP_SAMPLES, Group, Run, choose_reference, collect, compare, mean_ci, paired_tests,
                             to_markdown)
from lorafit.config import dump, load_config
from lorafit.errors import UserError
from lorafit.evaluate import classification_metrics
from lorafit.rundir import Summary

LABELS = ["a", "b", "c", "rare"]
TARGETS = np.array([0, 1, 2] * 60 + [3] * 6)  # 186 test examples; "rare" is rare in train too
TRAIN_COUNTS = {"a": 300, "b": 250, "c": 200, "rare": 12}


def fake_run(folder, seed: int, rank: int, wrong: np.ndarray, seconds: float = 10.0, validation: float | None = None,
             metric: str = "accuracy", overrides: tuple[str, ...] = ()):
    """A finished run folder whose test predictions are right except at the indices in `wrong`.

    `validation`: its best epoch's validation `metric` (summary.json's best_validation); by default
    the test accuracy, so that validation and test agree unless a test says otherwise."""
    folder.mkdir(parents=True)
    predicted = TARGETS.copy()
    predicted[wrong] = (TARGETS[wrong] + 1) % len(LABELS)
    logits = np.full((len(TARGETS), len(LABELS)), -5.0)
    logits[np.arange(len(TARGETS)), predicted] = 5.0
    ev = {"split": "test", **classification_metrics(logits, TARGETS, LABELS)}
    cfg = load_config(None, [f"seed={seed}", f"method.rank={rank}", f"train.threads={1 + seed % 2}", f"train.metric={metric}",
                             f"ood.k={1 + seed}", *overrides])
    (folder / "config.yaml").write_text(dump(cfg))
    (folder / "labels.json").write_text(json.dumps(LABELS))
    (folder / "eval.json").write_text(json.dumps(ev))
    (folder / "predictions.json").write_text(json.dumps({"split": "test", "target": TARGETS.tolist(),
                                                          "predicted": predicted.tolist(), "probability": [0.9] * len(TARGETS)}))
    (folder / "summary.json").write_text(json.dumps({
        "test_accuracy": ev["accuracy"], "test_macro_f1": ev["macro_f1"], "trainable_params": 1000 * rank,
        "trainable_percent": 0.1 * rank, "adapter_bytes": 4000 * rank, "seconds_per_epoch": seconds,
        "peak_memory_mb": 500.0, "train_label_counts": TRAIN_COUNTS,
        "best_validation": {metric: ev["accuracy"] if validation is None else validation}}))
    return folder


def test_mean_ci_is_the_t_interval():
    values = [0.91, 0.93, 0.92]
    mean, half = mean_ci(values)
    assert mean == pytest.approx(0.92)
    assert half == pytest.approx(stats.t.ppf(0.975, 2) * np.std(values, ddof=1) / math.sqrt(3))
    assert mean_ci([0.5]) == (0.5, None)


def test_groups_over_seeds_and_paired_tests_match_hand_computation(tmp_path):
    rng = np.random.default_rng(0)
    runs = []
    only_best, only_other = [], []
    for seed in (0, 1, 2):
        good = rng.choice(len(TARGETS), size=10, replace=False)  # rank 8: 10 mistakes per seed
        bad = np.unique(np.concatenate([good[:4], rng.choice(len(TARGETS), size=25, replace=False)]))
        runs.append(fake_run(tmp_path / f"r8-s{seed}", seed, 8, good))
        runs.append(fake_run(tmp_path / f"r2-s{seed}", seed, 2, bad))
        g, b = np.zeros(len(TARGETS), bool), np.zeros(len(TARGETS), bool)
        g[good], b[bad] = True, True
        only_best.append(int((~g & b).sum()))
        only_other.append(int((g & ~b).sum()))
    result = compare(collect(runs))
    rows = {r["configuration"]: r for r in result["rows"]}
    assert set(rows) == {"rank=8", "rank=2"}  # threads and ood.k differ between seeds but are not configuration
    best, other = rows["rank=8"], rows["rank=2"]
    assert best["best"] and best["seeds"] == [0, 1, 2]
    accuracies = [json.loads((tmp_path / f"r2-s{s}" / "summary.json").read_text())["test_accuracy"] for s in (0, 1, 2)]
    assert other["accuracy"] == pytest.approx(np.mean(accuracies))
    assert other["accuracy_ci"] == pytest.approx(mean_ci(accuracies)[1])

    v = other["versus_best"]
    assert v["seeds"] == 3
    assert v["only_best_correct"] == only_best and v["only_other_correct"] == only_other
    assert v["difference"] == pytest.approx(other["accuracy"] - best["accuracy"])
    # McNemar per seed, the largest p reported (the binomial sums written out, not the code's scipy call).
    assert v["p_mcnemar"] == pytest.approx(max(_mcnemar_exact(b, o) for b, o in zip(only_best, only_other)), rel=1e-9)
    assert v["ci_low"] < v["difference"] < v["ci_high"] < 0  # clearly worse: the interval excludes 0
    assert v["p_bootstrap"] < 0.01 and v["p_mcnemar"] < 0.01


def test_identical_configurations_are_not_significantly_different(tmp_path):
    wrong = np.arange(0, 186, 9)
    runs = [fake_run(tmp_path / f"x{s}", s, 8, wrong) for s in (0, 1)]
    runs += [fake_run(tmp_path / f"y{s}", s, 4, wrong) for s in (0, 1)]
    result = compare(collect(runs))
    (other,) = [r for r in result["rows"] if not r["best"]]
    v = other["versus_best"]
    assert v["difference"] == 0 and v["p_bootstrap"] == 1.0 and v["p_mcnemar"] == 1.0
    assert v["only_best_correct"] == v["only_other_correct"] == [0, 0]


def test_reference_is_the_best_mean_validation_configuration_not_the_best_test_one(tmp_path):
    """rank 8 has the higher test accuracy, rank 2 the higher validation accuracy: rank 2 is the reference."""
    runs = []
    for seed in (0, 1):
        runs.append(fake_run(tmp_path / f"r8-s{seed}", seed, 8, np.arange(seed, 186, 31), validation=0.80))
        runs.append(fake_run(tmp_path / f"r2-s{seed}", seed, 2, np.arange(seed, 186, 7), validation=0.90 + 0.01 * seed))
    result = compare(collect(runs))
    rows = {r["configuration"]: r for r in result["rows"]}
    assert rows["rank=8"]["accuracy"] > rows["rank=2"]["accuracy"]  # test prefers rank 8 ...
    assert result["best"] == "rank=2" and rows["rank=2"]["best"] and not rows["rank=8"]["best"]  # ... validation chose 2
    assert result["reference_metric"] == "accuracy"
    assert rows["rank=2"]["validation"] == pytest.approx(0.905) and rows["rank=8"]["validation"] == pytest.approx(0.80)
    assert rows["rank=8"]["versus_best"]["difference"] > 0  # paired against the validation choice
    markdown = to_markdown(result)
    assert "Reference: rank=2, the highest mean validation accuracy" in markdown
    assert markdown.index("| rank=2 |") < markdown.index("| rank=8 |")  # the reference row comes first


def test_validation_loss_picks_the_lowest(tmp_path):
    runs = [fake_run(tmp_path / "r4", 0, 4, np.arange(0, 186, 40), validation=0.50, metric="loss"),
            fake_run(tmp_path / "r8", 0, 8, np.arange(0, 186, 5), validation=0.30, metric="loss")]
    result = compare(collect(runs))
    assert result["best"] == "rank=8" and result["reference_metric"] == "loss"
    assert "the lowest mean validation loss" in to_markdown(result)


def test_runs_trained_on_different_metrics_are_compared_on_validation_accuracy_of_their_best_epochs(tmp_path):
    """train.metric differs: each run's best-epoch validation accuracy comes from its metrics.jsonl."""
    a = fake_run(tmp_path / "a", 0, 4, np.arange(0, 186, 40), validation=0.95, metric="macro_f1")
    b = fake_run(tmp_path / "b", 0, 8, np.arange(0, 186, 5), validation=0.60, metric="accuracy")
    for folder, best_epoch, accuracies in ((a, 2, [0.5, 0.7, 0.6]), (b, 1, [0.6, 0.55, 0.5])):
        summary = json.loads((folder / "summary.json").read_text())
        (folder / "summary.json").write_text(json.dumps({**summary, "best_epoch": best_epoch}))
        (folder / "metrics.jsonl").write_text("".join(json.dumps({"type": "epoch", "epoch": e + 1, "val_accuracy": acc}) + "\n"
                                                      for e, acc in enumerate(accuracies)))
    result = compare(collect([a, b]))
    assert result["reference_metric"] == "accuracy"
    assert {r["configuration"]: r["validation"] for r in result["rows"]} == {"rank=4, metric=macro_f1": 0.7,
                                                                           "rank=8, metric=accuracy": 0.6}
    assert result["best"] == "rank=4, metric=macro_f1"
    (a / "metrics.jsonl").unlink()
    with pytest.raises(UserError, match="no validation accuracy for its best epoch"):
        compare(collect([a, b]))


class _NoTest(Summary):
    """A summary.json whose test figures may not be read."""

    def __getattribute__(self, name):
        if name.startswith("test"):
            raise AssertionError(f"the reference choice read {name}")
        return super().__getattribute__(name)


def _no_test(summary: Summary) -> _NoTest:
    return _NoTest(**{f.name: getattr(summary, f.name) for f in dataclasses.fields(summary)})


def test_choosing_the_reference_never_reads_test_figures(tmp_path):
    folders = []
    for seed in (0, 1, 2):
        for rank, validation, spacing in ((2, 0.70, 4), (4, 0.90, 9), (8, 0.80, 50)):
            folders.append(fake_run(tmp_path / f"r{rank}-s{seed}", seed, rank, np.arange(seed, 186, spacing),
                                    validation=validation + 0.01 * seed))
    chosen = compare(collect(folders))["best"]
    assert chosen == "rank=4"
    # The same runs with their test figures shuffled between configurations (and reversed in rank):
    # the reference does not move.
    runs = collect(folders)
    accuracies = sorted((r.summary.test_accuracy for r in runs))
    for run, accuracy in zip(sorted(runs, key=lambda r: r.summary.test_accuracy), reversed(accuracies)):
        run.summary = dataclasses.replace(run.summary, test_accuracy=accuracy)
    assert compare(runs)["best"] == chosen
    # The choice itself, given runs that hold no test figure at all.
    runs = collect(folders)
    for run in runs:
        run.summary, run.eval, run.correct, run.target = _no_test(run.summary), None, None, None
    groups = {}
    for run in runs:
        groups.setdefault(run.settings["method.rank"], Group(run.settings)).runs.append(run)
    index, metric, means = choose_reference(list(groups.values()))
    assert list(groups)[index] == 4 and metric == "accuracy"
    assert means == pytest.approx([0.71, 0.91, 0.81])


@pytest.mark.filterwarnings("ignore::scipy.stats.ConstantInputWarning")  # the all-right run's per-class F1 is constant
def test_bootstrap_p_value_counts_the_observed_difference_and_never_claims_below_its_resolution(tmp_path):
    """Every draw favours one side: p = 2 (0 + 1) / (B + 1), the smallest a B-draw bootstrap can state, printed as such."""
    everything = np.arange(len(TARGETS))
    runs = [fake_run(tmp_path / f"right{s}", s, 8, everything[:0]) for s in (0, 1)]
    runs += [fake_run(tmp_path / f"wrong{s}", s, 4, everything) for s in (0, 1)]
    result = compare(collect(runs))
    (other,) = [r for r in result["rows"] if not r["best"]]
    v = other["versus_best"]
    assert v["difference"] == v["ci_low"] == v["ci_high"] == -1.0
    assert v["p_bootstrap"] == 2 / (BOOTSTRAP_SAMPLES + 1)
    markdown = to_markdown(result)
    assert "<0.0001" not in markdown and "| 0.0002 |" in markdown
    assert "2 (k + 1) / (B + 1)" in markdown


def _paired(best_correct: list, other_correct: list) -> dict:
    """paired_tests on two configurations whose seed s got these per-example correctness vectors."""
    def group(rows):
        return Group({}, [Run(Path(f"s{seed}"), seed, {}, {}, {}, LABELS, np.zeros(len(c), int), np.asarray(c, bool))
                          for seed, c in enumerate(rows)])
    return paired_tests(group(best_correct), group(other_correct))


def _mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar from the binomial sum, written out (no scipy): P(X <= min) doubled, X ~ Bin(b + c, 1/2)."""
    n = b + c
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n) if n else 1.0


def test_mcnemar_matches_a_hand_worked_case():
    """Seed 0: 1 example only the reference gets right, 7 only the other; seed 1: 0 and 5 (of 30; 3 both wrong)."""
    def seed(only_best: int, only_other: int) -> tuple[list[bool], list[bool]]:
        both_right = 30 - 3 - only_best - only_other
        best = [True] * only_best + [False] * only_other + [True] * both_right + [False] * 3
        other = [False] * only_best + [True] * only_other + [True] * both_right + [False] * 3
        return best, other
    (b0, o0), (b1, o1) = seed(1, 7), seed(0, 5)
    v = _paired([b0, b1], [o0, o1])
    assert v["only_best_correct"] == [1, 0] and v["only_other_correct"] == [7, 5]
    # By hand: seed 0, 2 (C(8,0) + C(8,1)) / 2^8 = 18/256; seed 1, 2 C(5,0) / 2^5 = 2/32. The larger is reported.
    assert _mcnemar_exact(1, 7) == 18 / 256 and _mcnemar_exact(0, 5) == 2 / 32
    assert stats.binomtest(1, 8, 0.5).pvalue == pytest.approx(18 / 256)  # the hand sums agree with scipy's test
    assert v["p_mcnemar"] == pytest.approx(18 / 256, rel=1e-12)


def test_bootstrap_resamples_seeds_known_distribution():
    """Seed 0: the other configuration is right and the reference wrong on every example; seed 1: both always right.

    Resampling examples then changes nothing, and resampling the 2 seeds gives a mean difference of 0, 1/2 or 1
    with probabilities 1/4, 1/2, 1/4: interval [0, 1], P(draw <= 0) = 1/4, so p ~ 2 x 1/4."""
    n = 40
    v = _paired([[False] * n, [True] * n], [[True] * n, [True] * n])
    assert v["difference"] == 0.5
    assert v["ci_low"] == 0.0 and v["ci_high"] == 1.0
    # k ~ Binomial(B, 1/4): p = 2 (k + 1) / (B + 1) has a standard deviation of 0.009 around 0.5.
    assert v["p_bootstrap"] == pytest.approx(0.5, abs=0.045)


def test_bootstrap_resamples_examples_known_distribution():
    """One seed, 20 examples, the other configuration right where the reference is wrong on 2 of them.

    A draw is X / 20 with X ~ Binomial(20, 1/10): interval [Bin.ppf(0.025), Bin.ppf(0.975)] / 20 = [0, 0.25],
    P(draw <= 0) = 0.9^20 = 0.1216, so p ~ 2 x 0.1216."""
    best = [False, False] + [True] * 18
    other = [True] * 20
    v = _paired([best], [other])
    assert v["difference"] == pytest.approx(0.1)
    assert (v["ci_low"], v["ci_high"]) == (stats.binom.ppf(0.025, 20, 0.1) / 20, stats.binom.ppf(0.975, 20, 0.1) / 20) == (0.0, 0.25)
    # k ~ Binomial(B, 0.1216): p has a standard deviation of 0.0065 around 0.243.
    assert v["p_bootstrap"] == pytest.approx(2 * 0.9**20, abs=0.03)


def test_runs_of_different_methods_get_distinct_names(tmp_path):
    """Method settings differ in their keys (full has no rank): every group still gets its own name."""
    runs = [fake_run(tmp_path / "lora4", 0, 4, np.arange(0, 186, 9)), fake_run(tmp_path / "lora8", 0, 8, np.arange(0, 186, 11))]
    full = tmp_path / "full"
    fake_run(full, 0, 8, np.arange(0, 186, 13))
    (full / "config.yaml").write_text(dump(load_config(None, ["method.name=full"])))
    result = compare(collect([full, *runs]))
    names = [r["configuration"] for r in result["rows"]]
    assert len(set(names)) == 3, names
    assert set(result["per_class"]["f1"]) == set(names)
    assert any("name=full" in n for n in names) and any("rank=4" in n for n in names)


def test_sweep_trials_are_named_by_what_the_sweep_varied(tmp_path):
    """A sweep over whole base configs: configurations are 'base=...', not every setting that differs."""
    sweep = tmp_path / "sweep"
    names = []
    for base, overrides in (("b77-full", ["method.name=full"]), ("b77-lora", ["method.rank=16", "train.lr=0.002"])):
        for seed in (0, 1):
            names.append(f"base={base},seed={seed}")
            fake_run(sweep / names[-1], seed, 8, np.arange(seed, 186, 9 + len(overrides)))
            (sweep / names[-1] / "config.yaml").write_text(dump(load_config(None, [f"seed={seed}", *overrides])))
    (sweep / "sweep.json").write_text(json.dumps({"trials": [{"name": n} for n in names]}))
    result = compare(collect([sweep]))
    assert sorted(r["configuration"] for r in result["rows"]) == ["base=b77-full", "base=b77-lora"]
    # Runs given one by one have no sweep names: the differing settings name them.
    loose = compare(collect([sweep / n for n in names]))
    assert any("name=full" in r["configuration"] for r in loose["rows"])


def test_per_class_analysis_finds_the_rare_hard_class(tmp_path):
    rare = np.where(TARGETS == 3)[0]
    runs = [fake_run(tmp_path / f"r{rank}", 0, rank, np.concatenate([rare[: 3 + rank // 4], [0, 1]])) for rank in (4, 8)]
    result = compare(collect(runs))
    pc = result["per_class"]
    assert pc["hardest"][0] == "rare"
    assert pc["train_counts"] == [300, 250, 200, 12]
    assert all(rho > 0 for name, rho in pc["spearman_count_f1"].items() if not name.startswith("_"))
    assert pc["error"]["rank=4"][3] == pytest.approx(4 / 6) and pc["error"]["rank=8"][3] == pytest.approx(5 / 6)
    assert result["confused_pairs"][0] == {"true": "rare", "predicted": "a", "count": 4, "runs": 1}
    markdown = to_markdown(result)
    assert "| rare | 12 | 0.67 | 0.83 |" in markdown
    assert "not paired" not in markdown


def fake_sweep(sweep, spacing: int, never_ran: tuple[str, ...] = ()) -> list[str]:
    """A sweep folder: ranks 2 and 8 over seeds 0 and 1 (plus trials sweep.json lists that never ran)."""
    names = []
    for rank in (2, 8):
        for seed in (0, 1):
            names.append(f"rank={rank},seed={seed}")
            fake_run(sweep / names[-1], seed, rank, np.arange(seed, 186, spacing + rank))
    (sweep / "sweep.json").write_text(json.dumps({"trials": [{"name": n} for n in names + list(never_ran)]}))
    return names


def test_cli_writes_tables_into_the_sweep_folder(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    fake_sweep(sweep, 7, never_ran=("rank=16,seed=0",))
    assert main(["compare", str(sweep)]) == 0
    printed = capsys.readouterr().out
    assert sum(line.startswith("| rank=") for line in printed.splitlines()) == 2 and "p (McNemar)" in printed
    for name in ("compare.md", "compare.csv", "per_class.csv"):
        assert (sweep / name).is_file()
    lines = (sweep / "compare.csv").read_text().splitlines()
    assert len(lines) == 3 and lines[0].startswith("configuration,seeds,")
    assert len((sweep / "per_class.csv").read_text().splitlines()) == 1 + len(LABELS)


def test_compare_refuses_what_it_cannot_compare(tmp_path):
    with pytest.raises(UserError, match="not found"):
        collect([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="neither a finished run"):
        collect([tmp_path / "empty"])
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(UserError, match="is a file; give a run folder or a sweep folder"):
        collect([tmp_path / "a-file"])
    a = fake_run(tmp_path / "a", 0, 8, np.arange(3))
    b = fake_run(tmp_path / "b", 0, 8, np.arange(5))
    with pytest.raises(UserError, match="two runs with the same seed"):
        compare(collect([a, b]))
    c = fake_run(tmp_path / "c", 1, 8, np.arange(5))
    (c / "labels.json").write_text(json.dumps(["w", "x", "y", "z"]))
    with pytest.raises(UserError, match="different label spaces"):
        compare(collect([a, c]))


def test_few_shot_draws_are_samples_paired_across_configurations(tmp_path):
    """data.draw_seed varies like the seed: runs of one training seed over three draws are three samples of
    their configuration, paired with the other configuration's runs on the same draw."""
    rng = np.random.default_rng(0)
    folders = []
    for rank, errors in ((4, 40), (8, 10)):
        for draw in range(3):
            wrong = rng.choice(len(TARGETS), errors, replace=False)
            folders.append(fake_run(tmp_path / f"r{rank}-d{draw}", 0, rank, wrong,
                                    overrides=("data.shots_per_class=5", f"data.draw_seed={draw}")))
    result = compare(collect(folders))
    assert [len(r["seeds"]) for r in result["rows"]] == [3, 3]
    assert result["rows"][0]["seeds"] == ["0/d0", "0/d1", "0/d2"]
    versus = next(r["versus_best"] for r in result["rows"] if r["versus_best"])
    assert versus["seeds"] == 3  # paired over the three draws
    assert versus["difference"] == pytest.approx(-30 / len(TARGETS))
