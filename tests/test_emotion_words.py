"""bench/emotion_words.py, the emotion error audit behind the README's "what bounds it": which word a tweet's
feeling is, how training labels that word, and the figures per group of test tweets, on data whose answers are
known by construction."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import emotion_words as ew  # noqa: E402  (bench/ is not a package)


def test_the_feeling_word_is_the_first_uncommon_word_after_feel():
    skip = frozenset({"i", "so", "and", "like"}) | ew.DEGREE
    assert ew.feeling_word("i feel so quite weird and sad", skip) == "weird"
    assert ew.feeling_word("i was feeling blessed", skip) == "blessed"
    assert ew.feeling_word("no feel word here", skip) == "word"
    assert ew.feeling_word("i am happy", skip) is None  # no form of feel
    assert ew.feeling_word("i feel so so so", skip) is None  # nothing uncommon within reach
    # common words are those found in the most texts, but feeling words among them are kept
    common = ew.common_words(["i love it", "i love that", "i feel it"], n=3)
    assert "i" in common and "it" in common and "love" not in common and "quite" in common


def _training():
    texts, labels = [], []
    for i in range(10):  # "weird": 6 fear, 4 surprise -> split at clear=0.8; "glad": all joy -> clear
        texts.append(f"i feel weird today {i}")
        labels.append("fear" if i < 6 else "surprise")
        texts.append(f"i feel glad today {i}")
        labels.append("joy")
        texts.append(f"i feel calm today {i}")  # 8 joy, 2 sadness: exactly at clear=0.8, which counts as clear
        labels.append("joy" if i < 8 else "sadness")
    texts += ["i feel odd today", "i feel odd today"]  # seen twice: below min_count, so "other"
    labels += ["fear", "joy"]
    return texts, labels


def test_groups_accuracies_errors_and_the_ceiling_are_counted_from_the_predictions():
    words = ew.WordLabels.fit(*_training(), min_count=5, clear=0.8, common=3)  # "i", "feel", "today": in every text
    assert words.skip >= {"i", "feel", "today"} and dict(words.counts["weird"]) == {"fear": 6, "surprise": 4}
    assert words.group("i feel calm now") == "clear"
    texts = ["i feel weird now", "i feel weird again", "i feel glad now", "i feel glad again", "i feel odd now", "nothing"]
    assert [words.group(t) for t in texts] == ["split", "split", "clear", "clear", "other", "other"]
    targets = ["fear", "surprise", "joy", "joy", "fear", "joy"]
    run = ["fear", "fear", "joy", "fear", "joy", "joy"]  # split 1/2 right, clear 1/2, other 1/2
    result = ew.audit(words, texts, targets, {"a": run})
    assert {g: (v["n"], v["accuracy"]["a"]) for g, v in result["groups"].items()} == {
        "clear": (2, 0.5), "split": (2, 0.5), "other": (2, 0.5)}
    r = result["runs"]["a"]
    assert r["accuracy"] == pytest.approx(0.5) and r["errors"] == {"clear": 1, "split": 1, "other": 1}
    # ceiling: the split group's predictions kept (one error), everything else right
    assert r["ceiling_accuracy"] == pytest.approx(5 / 6)
    assert r["ceiling_f1"]["surprise"] == 0.0 and r["ceiling_f1"]["joy"] == 1.0
    assert r["ceiling_f1"]["fear"] == pytest.approx(2 * 2 / (2 * 2 + 1))  # tp 2, fp 1, fn 0
    # the word alone on the split group: "weird"'s commonest label, fear, is right once of twice; drawn: (0.6 + 0.4) / 2
    assert result["split_word_alone"] == pytest.approx({"commonest_label": 0.5, "drawn_label": 0.5})
    assert result["class_split_share"] == pytest.approx({"fear": 0.5, "joy": 0.0, "surprise": 1.0})
    assert result["split_words"] == {"weird": 2}


def test_verbatim_conflicts_are_test_tweets_training_labels_otherwise():
    train_texts, train_labels = ["a b", "a b", "c d", "e f"], ["joy", "love", "joy", "fear"]
    assert ew.verbatim_conflicts(train_texts, train_labels, ["a b", "c d", "e f", "g h"], ["joy", "love", "fear", "joy"]) == {
        0: {"joy", "love"}, 1: {"joy"}}
