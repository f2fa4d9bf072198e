"""Is one temperature the right calibrator? Chosen on validation only, test printed for the record.

For each finished run: temperature scaling (lorafit's), vector scaling (a scale and a bias per class) and
temperature + a bias per class, each fitted by LBFGS on NLL; the choice is 2-fold cross-validation on the
in-scope validation split (fit on one half, 15-bin ECE on the other, both ways, mean). Then each fitted on
all of validation and its test ECE. Last, the floor of the ECE estimator: the ECE a perfectly calibrated
model would show with the run's own test confidences (correctness drawn with probability = confidence,
2,000 draws), the part of a measured ECE that is sampling noise.

    LORAFIT_DATA_DIR=/path/to/mirror python bench/calibrators.py runs/emotion-run-a runs/emotion-run-b
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from lorafit import calibration
from lorafit.evaluate import softmax
from lorafit.hardware import cpu_info
from lorafit.inference import load_model
from lorafit.job import check_same_data, prepare
from lorafit.posthoc import features_and_logits
from lorafit.rundir import RunDir

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cpu = cpu_info()
    print(f"CPU: {cpu.get('model')}, {cpu.get('cores')} cores, {' '.join(cpu.get('flags', []))}")
    results = {}
    for path in args.runs:
        run = RunDir(path)
        cfg = run.config()
        job = prepare(cfg, run, run.compute())
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
