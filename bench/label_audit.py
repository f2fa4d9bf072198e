"""Labels that disagree with themselves: test queries whose nearest labelled query is a near paraphrase under
another label.

Each test query's nearest neighbour among the dataset's labelled non-test rows (train and validation) is found
by cosine similarity of the *pre-trained* encoder's sentence vectors (the runs' base model and pooling; nothing
fine-tuned, so no run's training decides what counts as a paraphrase). A test query whose neighbour is at least
as similar as a threshold and carries another label ("When will I get my card?": card_arrival in test, "When will
I receive my card?": card_delivery_estimate in training) is a conflict: a model that learns its training rows
predicts the neighbour's label there. Per threshold it prints how many test queries have such a neighbour and
how many of those conflict, the same count inside the labelled rows themselves, and, for each finished run
given, how its predictions on the conflicts split between the test label, the neighbour's label and others, and
its accuracy with them left out. Last, the test queries every run gets wrong.

    LORAFIT_DATA_DIR=/path/to/mirror python bench/label_audit.py RUN [RUN ...] [--thresholds 0.98 0.95 0.9]

Test labels and predictions are only counted: nothing here chooses anything.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np


def nearest(reference: np.ndarray, queries: np.ndarray, exclude_self: bool = False,
            chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Index and cosine similarity of each query's nearest reference row (rows need not be normalised).
    exclude_self: queries *are* the reference rows, and a row is not its own neighbour."""
    ref = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    index, similarity = np.empty(len(q), np.int64), np.empty(len(q), np.float32)
    for start in range(0, len(q), chunk):
        s = q[start:start + chunk] @ ref.T
        if exclude_self:
            s[np.arange(len(s)), np.arange(start, start + len(s))] = -np.inf
        index[start:start + chunk] = s.argmax(1)
        similarity[start:start + chunk] = s.max(1)
    return index, similarity


def audit(index: np.ndarray, similarity: np.ndarray, reference_labels: list[str], targets: list[str],
          predictions: dict[str, list[str]], thresholds: list[float]) -> dict:
    """Per threshold: test queries with a neighbour at >= it, the conflicts among them (neighbour labelled
    otherwise; `indices`, most similar first), and per run its predictions on the conflicts (test label /
    neighbour's label / other) and its accuracy on every other test query."""
    neighbour = np.asarray(reference_labels, dtype=object)[index]
    y = np.asarray(targets, dtype=object)
    out = {}
    for t in thresholds:
        close = similarity >= t
        conflict = close & (neighbour != y)
        rest = ~conflict
        runs = {}
        for run, p in predictions.items():
            p = np.asarray(p, dtype=object)
            runs[run] = {"test_label": int((p[conflict] == y[conflict]).sum()),
                         "neighbour_label": int((p[conflict] == neighbour[conflict]).sum()),
                         "other": int(((p[conflict] != y[conflict]) & (p[conflict] != neighbour[conflict])).sum()),
                         "accuracy": float((p == y).mean()),
                         "accuracy_without_conflicts": float((p[rest] == y[rest]).mean()) if rest.any() else None}
        indices = np.flatnonzero(conflict)
        out[t] = {"close": int(close.sum()), "conflicts": int(conflict.sum()), "runs": runs,
                  "indices": indices[np.argsort(-similarity[indices], kind="stable")].tolist()}
    return out


def common_errors(targets: list[str], predictions: dict[str, list[str]]) -> list[tuple[int, str]]:
    """(index, the runs' commonest prediction) of each test query that every run gets wrong, in test order."""
    out = []
    for i, target in enumerate(targets):
        guesses = [p[i] for p in predictions.values()]
        if guesses and all(g != target for g in guesses):
            out.append((i, Counter(guesses).most_common(1)[0][0]))
    return out


def sentence_vectors(cfg, texts: list[str], labels: int) -> np.ndarray:
    """The pre-trained encoder's pooled vectors (cfg.model: its base model and pooling), on one thread."""
    import torch

    from lorafit import batching
    from lorafit.inference import features_and_logits
    from lorafit.models import build_classifier, load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    model = build_classifier(cfg.model, labels, cfg.seed).eval()
    tokens = batching.tokenize(tokenizer, texts, cfg.data.max_length)
    return features_and_logits(model, tokens, tokenizer.pad_token_id or 0, 128, torch.device("cpu"), None, 4096, labels)[0]


def main() -> int:
    import torch

    from lorafit import data
    from lorafit.hardware import cpu_line
    from lorafit.inference import run_split
    from lorafit.rundir import RunDir

    from _runs import test_predictions  # bench/ is on sys.path: run as python bench/<script>.py

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="finished runs of one dataset and base model (their test predictions are counted)")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.98, 0.95, 0.9], help="cosine similarities (default 0.98 0.95 0.9)")
    parser.add_argument("--show", type=int, default=12,
                        help="conflicts (at the second threshold) and errors of every run to list (default 12 each)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    first = RunDir(args.runs[0])
    cfg = first.config()
    dataset, _ = data.load(cfg.data, cfg.seed)
    test = run_split(first, cfg, "test")  # checked against splits.json; in-scope rows only, as predictions.json holds
    # every labelled row once: a final run's train split already holds its validation rows
    reference = list(dict.fromkeys((t, label) for name, split in dataset.splits.items() if name != "test"
                                   for t, label in zip(split.texts, split.labels)))
    ref_texts, ref_labels = [t for t, _ in reference], [label for _, label in reference]
    predictions = test_predictions(args.runs, test.labels)

    print(cpu_line())
    print(f"{cfg.data.name}: {len(test.texts)} test queries against {len(ref_texts)} labelled rows (train and validation), "
          f"sentence vectors of the pre-trained {cfg.model.name} ({cfg.model.pooling} pooling)")
    vectors = sentence_vectors(cfg, ref_texts + list(test.texts), len(dataset.label_names))
    ref_vec, test_vec = vectors[:len(ref_texts)], vectors[len(ref_texts):]
    index, similarity = nearest(ref_vec, test_vec)
    inner = audit(*nearest(ref_vec, ref_vec, exclude_self=True), ref_labels, ref_labels, {}, args.thresholds)
    result = audit(index, similarity, ref_labels, list(test.labels), predictions, args.thresholds)

    print("\n| cosine >= | test queries with a neighbour that close | of them labelled otherwise | the same inside the labelled rows "
          "| the runs on them (mean): test label / neighbour's / other | the runs' accuracy without them (mean) |")
    print("|---:|---:|---:|---|---|---:|")
    for t in args.thresholds:
        r, i = result[t], inner[t]
        mean = {key: np.mean([run[key] for run in r["runs"].values()]) for key in next(iter(r["runs"].values()))}
        print(f"| {t} | {r['close']} | **{r['conflicts']}** ({r['conflicts'] / len(test.texts):.2%} of test) | "
              f"{i['conflicts']} of {i['close']} | {mean['test_label']:.1f} / {mean['neighbour_label']:.1f} / {mean['other']:.1f} | "
              f"{100 * mean['accuracy_without_conflicts']:.2f} (with them {100 * mean['accuracy']:.2f}) |")
    shown = args.thresholds[min(1, len(args.thresholds) - 1)]
    print(f"\nat cosine >= {shown}:\n\n| run | accuracy | on the {result[shown]['conflicts']} conflicts: test label / neighbour's "
          "label / other | accuracy without them |")
    print("|---|---:|---|---:|")
    for run, r in result[shown]["runs"].items():
        print(f"| {Path(run).parent.name}/{Path(run).name} | {100 * r['accuracy']:.2f} | {r['test_label']} / "
              f"{r['neighbour_label']} / {r['other']} | {100 * r['accuracy_without_conflicts']:.2f} |")
    conflicts = result[shown]["indices"]
    print(f"\nconflicts at cosine >= {shown}, most similar first (test label: query || neighbour's label: its text):")
    for i in conflicts[:args.show]:
        print(f"  {similarity[i]:.3f}  {test.labels[i]}: {test.texts[i]}  ||  {ref_labels[index[i]]}: {ref_texts[index[i]]}")
    always = common_errors(list(test.labels), predictions)
    print(f"\ntest queries every run gets wrong: {len(always)} (test label -> the runs' commonest prediction; * its nearest "
          f"labelled row is at cosine >= {shown} under another label)")
    for i, predicted in always[:args.show]:
        mark = "*" if i in conflicts else " "
        print(f"  {mark} {test.labels[i]} -> {predicted}: {test.texts[i]}")
    return 0


if __name__ == "__main__":
    from _runs import run_script  # bench/ is on sys.path: run as python bench/<script>.py

    run_script(main)
