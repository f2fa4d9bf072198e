"""How lorafit's post-hoc choices were made without reading test, re-run from finished run folders.

`oos`: OOS scores on a development set. For runs of the open-intent protocol (`bench/oos.py`), in-scope =
the run's validation split (known intents), OOS = the *training* queries of the unknown intents (the
protocol drops them from training; test holds other queries of the same intents). Prints each score's AUROC
per run and the mean: the fine-tuned model's msp / energy / knn (k=1, 10) / mahalanobis, the same on the
pre-trained encoder's vectors (base_*), and sums of two scores standardised on the in-scope validation
scores. Test is never read. (This chose ood.k=1 and hybrid = energy + base_knn.)

`calibration`: is one temperature the right calibrator? Temperature scaling (lorafit's), vector scaling (a
scale and a bias per class) and temperature + a bias per class, each fitted by LBFGS on NLL; the choice is
2-fold cross-validation on the in-scope validation split (fit on one half, 15-bin ECE on the other, both
ways, mean). Then each fitted on all of validation and its test ECE, for the record. Last, the floor of the
ECE estimator: the ECE a perfectly calibrated model would show with the run's own test confidences
(correctness drawn with probability = confidence, 2,000 draws), the part of a measured ECE that is noise.

    LORAFIT_DATA_DIR=/path/to/mirror python bench/posthoc_choices.py oos runs/oos-b77-75/seed0 runs/oos-b77-75/seed1
    LORAFIT_DATA_DIR=/path/to/mirror python bench/posthoc_choices.py calibration runs/emotion-a runs/emotion-b
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from lorafit import batching, calibration, data, ood
from lorafit.evaluate import softmax
from lorafit.hardware import cpu_line
from lorafit.inference import load_model
from lorafit.job import check_same_data, prepare
from lorafit.models import build_classifier, load_tokenizer
from lorafit.inference import features_and_logits
from lorafit.rundir import RunDir


# -- oos ------------------------------------------------------------------------------------------

def oos_scores(run_path: Path) -> tuple[dict[str, np.ndarray], np.ndarray]:
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


def oos_table(runs: list[Path]) -> None:
    """AUROC of every development-set score, per run and mean; the last line JSON."""
    table: dict[str, list[float]] = defaultdict(list)
    for run in runs:
        values, is_oos = oos_scores(run)
        print(f"{run}: {int((~is_oos).sum())} in-scope validation, {int(is_oos.sum())} OOS training queries")
        for name, s in values.items():
            table[name].append(float(roc_auc_score(is_oos, -s)))
    print("| score | " + " | ".join(str(r) for r in runs) + " | mean |")
    print("|---|" + "---:|" * (len(runs) + 1))
    for name, aurocs in table.items():
        print(f"| {name} | " + " | ".join(f"{a:.4f}" for a in aurocs) + f" | {np.mean(aurocs):.4f} |")
    print(json.dumps({"auroc": table}))


# -- calibration ----------------------------------------------------------------------------------

Calibrator = Callable[[np.ndarray], np.ndarray]


def _lbfgs(logits: np.ndarray, targets: np.ndarray, per_class_scale: bool, base_t: float) -> Calibrator:
    """Fit log-scales (one, or one per class) and a bias per class on NLL of logits / base_t."""
    z = torch.as_tensor(logits / base_t, dtype=torch.float64)
    y = torch.as_tensor(targets)
    c = z.shape[1]
    log_s = torch.zeros(c if per_class_scale else 1, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(c, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_s, bias], lr=0.5, max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(z * log_s.exp() + bias, y)
        loss.backward()
        return loss

    optimizer.step(closure)
    scale, b = log_s.detach().exp().numpy() / base_t, bias.detach().numpy()
    return lambda x: x * scale + b


CALIBRATORS: dict[str, Callable[[np.ndarray, np.ndarray], Calibrator]] = {
    "none": lambda z, y: (lambda x: x),
    "temperature": lambda z, y: (lambda t: (lambda x: x / t))(calibration.fit_temperature(z, y)),
    "vector scaling": lambda z, y: _lbfgs(z, y, per_class_scale=True, base_t=1.0),
    "temperature + bias": lambda z, y: _lbfgs(z, y, per_class_scale=False, base_t=calibration.fit_temperature(z, y)),
}


def _ece(logits: np.ndarray, targets: np.ndarray) -> float:
    return calibration.expected_calibration_error(softmax(logits), targets)


def ece_floor(confidence: np.ndarray, draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """(mean, 95th percentile) of the 15-bin ECE of a perfectly calibrated model with these confidences."""
    rng = np.random.default_rng(seed)
    edges = np.linspace(0.0, 1.0, calibration.BINS + 1)
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, calibration.BINS - 1)
    values = []
    for _ in range(draws):
        correct = rng.random(len(confidence)) < confidence
        values.append(sum((index == b).mean() * abs(correct[index == b].mean() - confidence[index == b].mean())
                          for b in range(calibration.BINS) if (index == b).any()))
    return float(np.mean(values)), float(np.percentile(values, 95))


def calibration_table(runs: list[Path]) -> None:
    """Per run: the calibrator chosen on validation, each one's held-out and test ECE, the ECE floor; the last line JSON."""
    results = {}
    for path in runs:
        run = RunDir(path)
        cfg = run.config()
        job = prepare(cfg, run, run.compute(), teacher="skip")
        check_same_data(job, run)
        model = load_model(run, cfg, job.dataset.label_names).to(job.device).eval()
        logits = {split: features_and_logits(model, job.tokens[split], job.pad_id, 128, job.device, None, job.max_tokens,
                                             len(job.dataset.label_names))[1] for split in ("validation", "test")}
        zv, yv, zt, yt = logits["validation"], job.targets["validation"], logits["test"], job.targets["test"]
        order = np.random.default_rng(0).permutation(len(yv))
        halves = (order[: len(order) // 2], order[len(order) // 2:])
        rows = {}
        for name, fit in CALIBRATORS.items():
            held_out = np.mean([_ece(fit(zv[a], yv[a])(zv[b]), yv[b]) for a, b in (halves, halves[::-1])])
            calibrated = fit(zv, yv)(zt)
            rows[name] = {"cv_ece_validation": float(held_out), "test_ece": _ece(calibrated, yt),
                          "test_accuracy": float((calibrated.argmax(-1) == yt).mean())}
        chosen = min((n for n in rows if n != "none"), key=lambda n: rows[n]["cv_ece_validation"])
        t = calibration.fit_temperature(zv, yv)
        floor = ece_floor(softmax(zt / t).max(-1))
        print(f"{path}: chosen on validation: {chosen}; ECE floor of a calibrated model on this test set "
              f"{floor[0]:.4f} (95th percentile {floor[1]:.4f})")
        for name, row in rows.items():
            print(f"  {name:20s} 2-fold validation ECE {row['cv_ece_validation']:.4f}   test ECE {row['test_ece']:.4f}   "
                  f"test accuracy {row['test_accuracy']:.4f}")
        results[str(path)] = {"chosen": chosen, "rows": rows, "ece_floor": floor}
    print(json.dumps(results))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["oos", "calibration"])
    parser.add_argument("runs", nargs="+", type=Path, help="finished run folders")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(cpu_line())
    (oos_table if args.what == "oos" else calibration_table)(args.runs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
