"""How ood.k and the hybrid score were chosen without reading test: OOS scores on a development set.

For finished runs of the open-intent protocol (`bench/oos.py`), in-scope = the run's validation split (known
intents), OOS = the *training* queries of the unknown intents (the protocol drops them from training; test
holds other queries of the same intents). Prints each score's AUROC per run and the mean: the fine-tuned
model's msp / energy / knn (k=1, 10) / mahalanobis, knn on the pre-trained encoder's vectors (base_knn), and
sums of two scores standardised on the in-scope validation scores. Test is never read.

    LORAFIT_DATA_DIR=/path/to/mirror python bench/oos_dev.py runs/oos-b77-75/seed0 runs/oos-b77-75/seed1 runs/oos-b77-75/seed2
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from lorafit import batching, data, ood
from lorafit.hardware import cpu_info
from lorafit.inference import load_model
from lorafit.models import build_classifier, load_tokenizer
from lorafit.posthoc import features_and_logits
from lorafit.rundir import RunDir


def scores(run_path: Path) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """{score name: in-scope scores of validation followed by those of the unknown intents' training queries}, is_oos."""
    run = RunDir(run_path)
    cfg = run.config()
    dataset, _ = data.load(cfg.data.model_copy(update={"known_intents": None}), cfg.seed)  # every class, as in the file
    known, _ = data.load(cfg.data, cfg.seed)
    unknown = set(known.open_intent["unknown"])
    oos_texts = [t for split in ("train", "validation")  # the training file's rows (validation is carved from them)
                 for label, t in zip(dataset.splits[split].labels, dataset.splits[split].texts) if label in unknown]
    tokenizer = load_tokenizer(cfg.model)
    tokens = {name: batching.tokenize(tokenizer, texts, cfg.data.max_length) for name, texts in
              (("train", known.splits["train"].texts), ("validation", known.splits["validation"].texts), ("oos", oos_texts))}
    labels = known.label_names
    train_targets = np.array(known.label_ids("train"))
    temperature = run.read_json("ood.json")["temperature"]
    out: dict[str, np.ndarray] = {}
    for name, model in (("tuned", load_model(run, cfg, labels)), ("base", build_classifier(cfg.model, len(labels), cfg.seed))):
        model.eval()
        f = {split: features_and_logits(model, t, tokenizer.pad_token_id or 0, 128, torch.device("cpu"), None, 1024, len(labels))
             for split, t in tokens.items()}
        if name == "tuned":
            for kind in ("msp", "energy"):
                out[kind] = np.r_[ood.logit_score(kind, f["validation"][1], temperature), ood.logit_score(kind, f["oos"][1], temperature)]
        for kind, k in (("mahalanobis", 1), ("knn", 1), ("knn", 10)):
            scorer = ood.fit_feature_scorer(kind, f["train"][0], train_targets, k=k)
            key = f"{'base_' if name == 'base' else ''}{kind}{k if kind == 'knn' else ''}"
            out[key] = np.r_[scorer.score(f["validation"][0]), scorer.score(f["oos"][0])]
    n_val = len(tokens["validation"])
    z = lambda s: (s - s[:n_val].mean()) / s[:n_val].std()  # noqa: E731  standardised on in-scope validation
    for a in ("msp", "energy", "knn1"):
        out[f"{a} + base_knn1"] = z(out[a]) + z(out["base_knn1"])
    out["energy + knn1"] = z(out["energy"]) + z(out["knn1"])
    return out, np.r_[np.zeros(n_val, bool), np.ones(len(oos_texts), bool)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cpu = cpu_info()
    print(f"CPU: {cpu.get('model')}, {cpu.get('cores')} cores, {' '.join(cpu.get('flags', []))}")
    table: dict[str, list[float]] = defaultdict(list)
    for run in args.runs:
        values, is_oos = scores(run)
        print(f"{run}: {int((~is_oos).sum())} in-scope validation, {int(is_oos.sum())} OOS training queries")
        for name, s in values.items():
            table[name].append(float(roc_auc_score(is_oos, -s)))
    print("| score | " + " | ".join(str(r) for r in args.runs) + " | mean |")
    print("|---|" + "---:|" * (len(args.runs) + 1))
    for name, aurocs in table.items():
        print(f"| {name} | " + " | ".join(f"{a:.4f}" for a in aurocs) + f" | {np.mean(aurocs):.4f} |")
    print(json.dumps({"auroc": table}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
