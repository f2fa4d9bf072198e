"""Where emotion's errors are: the feeling word of each tweet, and the labels training gives that word.

The emotion dataset (CARER, Saravia et al. 2018) labels "i feel X" tweets by distant supervision, and
some words X carry two emotions about equally often in the training split ("weird": fear 49 / surprise
46; "blessed": joy 45 / love 41). A tweet whose word is split that way has a label the text barely
decides. This script finds each tweet's feeling word (the first uncommon word after a form of "feel"),
counts the labels training gives it, and splits the test tweets of finished runs into three groups:
the word is known and one label holds >= --clear of its training tweets ("clear"), it is known and split
("split"), or there is none or it is rare ("other"). Per run it prints accuracy in each group, where the
errors fall, and the accuracy and macro-F1 the run would reach with every tweet outside the split group
right: a ceiling set by the split words alone. It also lists test tweets that occur verbatim in training
with another label.

    LORAFIT_DATA_DIR=/path/to/mirror python bench/emotion_words.py RUN [RUN ...]

Everything that defines a group (word frequencies, the labels of each word) comes from the runs' training
split; test labels and predictions are only counted. Nothing here chooses anything.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.metrics import f1_score

#: Forms of "feel" that introduce the feeling word.
FEEL = frozenset({"feel", "feeling", "felt", "feels"})
#: Degree words skipped on the way to it ("i feel *quite* stressed"); the corpus's most frequent words are skipped too.
DEGREE = frozenset(
    "quite less rather lot particularly kind sort slightly extremely completely somewhat anything almost totally "
    "kinda such getting strongly fucking especially damn inside absolutely incredibly truly super utterly fairly "
    "increasingly terribly deeply genuinely overly seriously mildly somehow definitely certainly honestly already "
    "strangely oddly sometimes ever often usually awfully horribly insanely ridiculously unbelievably immensely "
    "hugely majorly enormously exceptionally remarkably thoroughly entirely wholly fully highly surprisingly".split())
#: Frequent words that are feeling words themselves, kept although they are common.
KEEP = frozenset({"love", "good", "happy"})


def common_words(texts: list[str], n: int = 150) -> frozenset[str]:
    """The n words found in the most texts, less KEEP, plus DEGREE: what `feeling_word` steps over."""
    counts = Counter(word for text in texts for word in set(text.split()))
    return frozenset({word for word, _ in counts.most_common(n)} - KEEP) | DEGREE


def feeling_word(text: str, skip: frozenset[str], reach: int = 7) -> str | None:
    """The first word after the first form of "feel" that `skip` lacks, within `reach` words; None if none."""
    words = text.split()
    for i, word in enumerate(words):
        if word in FEEL:
            return next((w for w in words[i + 1:i + 1 + reach] if w not in skip), None)
    return None


@dataclass
class WordLabels:
    """The labels training gives each feeling word, and how a tweet's word is classed by them."""

    skip: frozenset[str]
    counts: dict[str, Counter]
    min_count: int
    clear: float

    @classmethod
    def fit(cls, texts: list[str], labels: list[str], min_count: int = 10, clear: float = 0.8, common: int = 150) -> WordLabels:
        skip = common_words(texts, common)
        counts: dict[str, Counter] = {}
        for text, label in zip(texts, labels):
            word = feeling_word(text, skip)
            if word is not None:
                counts.setdefault(word, Counter())[label] += 1
        return cls(skip, counts, min_count, clear)

    def group(self, text: str) -> str:
        """clear (the word's commonest label holds >= `clear` of its training tweets), split, or other."""
        counts = self.counts.get(feeling_word(text, self.skip))
        if counts is None or sum(counts.values()) < self.min_count:
            return "other"
        return "clear" if max(counts.values()) / sum(counts.values()) >= self.clear else "split"


def audit(words: WordLabels, texts: list[str], targets: list[str], predictions: dict[str, list[str]]) -> dict:
    """Per group: size and each run's accuracy; per run: errors in each group, and accuracy and macro-F1 with
    every tweet outside the split group right (the run's own predictions kept on it); the split words' test counts."""
    groups = [words.group(text) for text in texts]
    y = np.array(targets)
    masks = {name: np.array([g == name for g in groups]) for name in ("clear", "split", "other")}
    split = masks["split"]
    out: dict = {"groups": {}, "runs": {}, "class_split_share": {}}
    for name, mask in masks.items():
        out["groups"][name] = {"n": int(mask.sum()),
                               "accuracy": {run: float((np.array(p)[mask] == y[mask]).mean()) if mask.any() else None
                                            for run, p in predictions.items()}}
    labels = sorted(set(targets))
    # what the word alone gets right on the split group: its commonest training label, and in expectation a label
    # drawn from its training labels (the share of the test tweet's own label among them)
    split_words = [(feeling_word(t, words.skip), target) for t, target, g in zip(texts, targets, groups) if g == "split"]
    shares = [(words.counts[word], target) for word, target in split_words]
    out["split_words"] = Counter(word for word, _ in split_words)
    out["split_word_alone"] = {
        "commonest_label": float(np.mean([c.most_common(1)[0][0] == target for c, target in shares])) if shares else None,
        "drawn_label": float(np.mean([c[target] / sum(c.values()) for c, target in shares])) if shares else None}
    for run, p in predictions.items():
        p = np.array(p)
        ceiling = np.where(split, p, y)
        out["runs"][run] = {
            "accuracy": float((p == y).mean()), "macro_f1": float(f1_score(y, p, average="macro")),
            "errors": {name: int(((p != y) & mask).sum()) for name, mask in masks.items()},
            "ceiling_accuracy": float((ceiling == y).mean()), "ceiling_macro_f1": float(f1_score(y, ceiling, average="macro")),
            "ceiling_f1": dict(zip(labels, (float(v) for v in f1_score(y, ceiling, average=None, labels=labels)))),
        }
    for label in labels:
        mask = y == label
        out["class_split_share"][label] = float(split[mask].mean())
    return out


def verbatim_conflicts(train_texts: list[str], train_labels: list[str], texts: list[str],
                       targets: list[str]) -> dict[int, set[str]]:
    """{index: the labels training gives it} of each test tweet found verbatim in training under another label."""
    seen: dict[str, set[str]] = {}
    for text, label in zip(train_texts, train_labels):
        seen.setdefault(text, set()).add(label)
    return {i: seen[text] for i, (text, label) in enumerate(zip(texts, targets)) if text in seen and seen[text] != {label}}


def main() -> int:
    from lorafit.inference import run_split
    from lorafit.rundir import RunDir

    from _runs import test_predictions  # bench/ is on sys.path: run as python bench/<script>.py

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="finished runs on the same test split (emotion, or any 'i feel X' data)")
    parser.add_argument("--min-count", type=int, default=10, help="training tweets a word needs to be judged (default 10)")
    parser.add_argument("--clear", type=float, default=0.8,
                        help="share of its training tweets the word's commonest label needs for 'clear' (default 0.8)")
    parser.add_argument("--words", type=int, default=12, help="split words to list (default 12)")
    args = parser.parse_args()

    first = RunDir(args.runs[0])
    cfg = first.config()
    train, test = run_split(first, cfg, "train"), run_split(first, cfg, "test")
    predictions = test_predictions(args.runs, test.labels)

    words = WordLabels.fit(train.texts, train.labels, args.min_count, args.clear)
    result = audit(words, test.texts, test.labels, predictions)
    print(f"training split: {len(train.texts)} tweets of {args.runs[0]}; test: {len(test.texts)}")
    judged = {w: c for w, c in words.counts.items() if sum(c.values()) >= args.min_count}
    print(f"feeling words seen in >= {args.min_count} training tweets: {len(judged)}; split (commonest label < "
          f"{args.clear:.0%}): {sum(max(c.values()) / sum(c.values()) < args.clear for c in judged.values())}")
    print("commonest split words in test (test tweets: training labels):")
    for word, n in result["split_words"].most_common(args.words):
        print(f"  {word} ({n}): " + ", ".join(f"{label} {count}" for label, count in words.counts[word].most_common()))
    print("share of each class's test tweets whose word is split: "
          + ", ".join(f"{label} {share:.1%}" for label, share in sorted(result["class_split_share"].items(), key=lambda kv: -kv[1])))
    print("\n| group | test tweets | " + " | ".join(f"accuracy, {Path(r).parent.name}/{Path(r).name}" for r in predictions) + " |")
    print("|---|---:|" + "---:|" * len(predictions))
    for name, g in result["groups"].items():
        print(f"| {name} | {g['n']} | " + " | ".join("-" if a is None else f"{100 * a:.1f}%" for a in g["accuracy"].values()) + " |")
    alone = result["split_word_alone"]
    if alone["commonest_label"] is not None:
        print(f"split group, the word alone: its commonest training label {100 * alone['commonest_label']:.1f}% right; a label "
              f"drawn from its training labels {100 * alone['drawn_label']:.1f}% in expectation")
    print("\n| run | accuracy | macro-F1 | errors: clear / split / other | with every non-split tweet right: accuracy, macro-F1, "
          "F1 surprise / love |")
    print("|---|---:|---:|---|---|")
    for run, r in result["runs"].items():
        e, f = r["errors"], r["ceiling_f1"]
        print(f"| {run} | {100 * r['accuracy']:.2f} | {100 * r['macro_f1']:.2f} | {e['clear']} / {e['split']} / {e['other']} | "
              f"{100 * r['ceiling_accuracy']:.2f}, {100 * r['ceiling_macro_f1']:.2f}, "
              f"{100 * f.get('surprise', float('nan')):.1f} / {100 * f.get('love', float('nan')):.1f} |")
    conflicts = verbatim_conflicts(train.texts, train.labels, test.texts, test.labels)
    print(f"\ntest tweets found verbatim in training under another label: {len(conflicts)}; predicted as training "
          "labels them, by run: " + ", ".join(str(sum(p[i] in training for i, training in conflicts.items()))
                                              for p in predictions.values()))
    return 0


if __name__ == "__main__":
    from _runs import run_script  # bench/ is on sys.path: run as python bench/<script>.py

    run_script(main)
