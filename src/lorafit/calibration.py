"""Calibrated probabilities: temperature scaling, expected calibration error, reliability bins.

Pure functions on arrays (logits (N, C), integer targets (N,)); no model, no files.

Temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks", section 4.2)
divides every logit by one scalar T > 0 fitted after training by minimising the negative
log-likelihood of the *validation* set. It leaves the arg-max (and so accuracy) unchanged and only
changes how confident the probabilities are. T is optimised as log T, so it stays positive.
"""

from __future__ import annotations

import numpy as np
import torch

from .evaluate import cross_entropy, softmax

__all__ = ["fit_temperature", "expected_calibration_error", "reliability_bins", "calibration_record", "BINS"]

#: The temperatures fit_temperature may return.
T_RANGE = (0.05, 20.0)

#: Equal-width confidence bins for the expected calibration error (the usual 15 of Guo et al.).
BINS = 15


def fit_temperature(logits: np.ndarray, targets: np.ndarray, max_iter: int = 200) -> float:
    """The T > 0 that minimises mean NLL of softmax(logits / T) on (logits, targets); LBFGS on log T."""
    if len(targets) == 0:
        raise ValueError("cannot fit a temperature on no examples")
    z = torch.as_tensor(np.asarray(logits, dtype=np.float64))
    y = torch.as_tensor(np.asarray(targets, dtype=np.int64))
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, tolerance_grad=1e-10, tolerance_change=1e-12,
                                  line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    # Bounded: a model no better than chance on validation drives T to infinity, which would flatten
    # every probability to a tie and lose the arg-max.
    t = float(np.clip(float(log_t.detach().exp()), T_RANGE[0], T_RANGE[1]))
    # LBFGS can wander on degenerate inputs (e.g. all predictions right and growing ever more confident):
    # keep the result only if it does not make the NLL worse than T = 1.
    return t if cross_entropy(np.asarray(logits) / t, targets) <= cross_entropy(np.asarray(logits), targets) else 1.0


def reliability_bins(probabilities: np.ndarray, targets: np.ndarray, bins: int = BINS) -> list[dict]:
    """Per equal-width bin of top-1 confidence: its range, examples, mean confidence and accuracy."""
    confidence = probabilities.max(-1)
    correct = probabilities.argmax(-1) == np.asarray(targets)
    edges = np.linspace(0.0, 1.0, bins + 1)
    # Bin b holds confidences in (edges[b], edges[b+1]]; confidence 0 (impossible for softmax) joins bin 0.
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    rows = []
    for b in range(bins):
        mask = index == b
        n = int(mask.sum())
        rows.append({"low": float(edges[b]), "high": float(edges[b + 1]), "examples": n,
                     "confidence": float(confidence[mask].mean()) if n else None,
                     "accuracy": float(correct[mask].mean()) if n else None})
    return rows


def expected_calibration_error(probabilities: np.ndarray, targets: np.ndarray, bins: int = BINS) -> float:
    """ECE: sum over bins of (examples in bin / N) * |accuracy - mean confidence| (top-1)."""
    return _ece(reliability_bins(probabilities, targets, bins))


def _ece(rows: list[dict]) -> float:
    n = sum(r["examples"] for r in rows)
    return float(sum(r["examples"] / n * abs(r["accuracy"] - r["confidence"]) for r in rows if r["examples"]))


def calibration_record(logits: np.ndarray, targets: np.ndarray, temperature: float, bins: int = BINS) -> dict:
    """ECE, NLL and reliability bins of `logits` before and after dividing by `temperature`."""
    before = reliability_bins(softmax(logits), targets, bins)
    after = reliability_bins(softmax(logits / temperature), targets, bins)
    return {
        "temperature": float(temperature),
        "bins": bins,
        "ece_before": _ece(before),
        "ece_after": _ece(after),
        "nll_before": cross_entropy(logits, targets),
        "nll_after": cross_entropy(logits / temperature, targets),
        "reliability_before": before,
        "reliability_after": after,
    }
