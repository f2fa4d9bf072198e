"""What the post-hoc stage (posthoc.py) fitted, as a run folder keeps it: `Posthoc`, the temperature and
every out-of-scope score's threshold (ood.json) with the fitted arrays the deciding score reads
(ood.safetensors); `save` writes them, `load` reads them back for prediction (inference.py, serving.py,
exports). Arrays and files only: no model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import ood
from .sources import sha256_of

__all__ = ["Posthoc", "save", "load", "ARRAYS", "NEEDS"]

#: The fitted arrays the deciding score reads at prediction time (knn banks, Mahalanobis means and precision),
#: next to ood.json in a run folder and in its exports.
ARRAYS = "ood.safetensors"
#: Per deciding score, the fitted scorers it reads (msp and energy need none).
NEEDS = {"mahalanobis": ("mahalanobis",), "knn": ("knn",), "base_knn": ("base_knn",), "hybrid": ("base_knn",)}


@dataclass
class Posthoc:
    temperature: float
    validation_calibration: dict
    score: str  # the score that decides (ood.score)
    thresholds: dict[str, dict]  # per score: {"threshold", "rule", validation figures}
    scorers: dict[str, ood.FeatureScorer] = field(default_factory=dict)  # mahalanobis, knn, base_knn
    standardise: dict[str, tuple[float, float]] = field(default_factory=dict)  # hybrid's parts: (mean, sd) on validation
    fitted_on: str = "validation"  # where the temperature came from

    def scores(self, kind: str, features: np.ndarray, logits: np.ndarray, base_features: np.ndarray | None = None) -> np.ndarray:
        """In-scope scores (N,) of examples given their sentence vectors, logits and (for BASE_SCORES) the
        pre-trained encoder's sentence vectors."""
        if kind == "hybrid":
            parts = [(self.scores(part, features, logits, base_features) - mean) / sd
                     for part, (mean, sd) in ((p, self.standardise[p]) for p in ood.HYBRID_PARTS)]
            return np.sum(parts, axis=0)
        if kind == "base_knn":
            return self.scorers[kind].score(base_features)
        if kind in ood.FEATURE_SCORES:
            return self.scorers[kind].score(features)
        return ood.logit_score(kind, logits, self.temperature)

    def record(self) -> dict:
        """ood.json: the temperature, and every score's threshold with the rule that chose it."""
        return {"temperature": self.temperature, "fitted_on": self.fitted_on,
                "validation_calibration": {k: v for k, v in self.validation_calibration.items() if not k.startswith("reliability")},
                "score": self.score, "threshold": self.threshold,
                "source": self.source, "scores": self.thresholds}

    @property
    def threshold(self) -> float:
        """The deciding score's threshold (out of scope below it)."""
        return float(self.thresholds[self.score]["threshold"])

    @property
    def source(self) -> str:
        """Where the deciding threshold came from: 'validation: RULE', or 'fixed (ood.threshold)'."""
        rule = self.thresholds[self.score]["rule"]
        return rule if rule.startswith("fixed") else f"validation: {rule}"

    @property
    def ready(self) -> bool:
        """Whether the deciding score can be computed: every fitted scorer it reads is here."""
        return all(name in self.scorers for name in NEEDS.get(self.score, ())) and (
            self.score != "hybrid" or set(ood.HYBRID_PARTS) <= set(self.standardise))


def save(run, post: Posthoc) -> None:
    """ood.json, and before it ood.safetensors: the fitted arrays the deciding score reads when `predict`,
    `serve` and exports score a new text (none for msp and energy; a stale file from an earlier fit is removed)."""
    from safetensors.numpy import save_file

    from . import atomic

    path = run.path / ARRAYS
    names = NEEDS.get(post.score, ())
    record = post.record()
    if names:
        tensors = {f"{name}.{key}": np.ascontiguousarray(array) for name in names for key, array in post.scorers[name].arrays.items()}
        metadata = {name: json.dumps({"kind": post.scorers[name].kind, "k": post.scorers[name].k}) for name in names}
        with atomic.file(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
        # ood.json names the arrays it was fitted with: a crash between the two writes cannot pair a
        # threshold with another fit's arrays unnoticed (`load`)
        record["arrays_sha256"] = sha256_of(path)
    else:
        path.unlink(missing_ok=True)
    run.write_json("ood.json", record)


def load(folder) -> Posthoc | None:
    """What a run folder (or an export of one) recorded after training: ood.json, with the scorers of
    ood.safetensors that its deciding score reads. None without ood.json (a run of an older lorafit); a
    deciding score whose arrays are missing (trained before they were saved) or are not the ones ood.json was
    fitted with has no scorer: `ready` is False."""
    folder = Path(folder)
    if not (folder / "ood.json").is_file():
        return None
    record = json.loads((folder / "ood.json").read_text(encoding="utf-8"))
    thresholds = record.get("scores") or {record["score"]: {"threshold": record["threshold"], "rule": record["source"]}}
    standardise = {part: (float(v["mean"]), float(v["sd"]))
                   for part, v in (thresholds.get("hybrid") or {}).get("standardised", {}).items()}
    scorers = {}
    arrays_match = (folder / ARRAYS).is_file() and record.get("arrays_sha256") in (None, sha256_of(folder / ARRAYS))
    if NEEDS.get(record["score"]) and arrays_match:
        from safetensors import safe_open

        with safe_open(str(folder / ARRAYS), framework="np") as f:
            metadata = f.metadata() or {}
            for name in NEEDS[record["score"]]:
                if name in metadata:
                    info = json.loads(metadata[name])
                    arrays = {key.split(".", 1)[1]: f.get_tensor(key) for key in f.keys() if key.startswith(f"{name}.")}
                    scorers[name] = ood.FeatureScorer(info["kind"], arrays, k=int(info["k"]))
    return Posthoc(float(record["temperature"]), record.get("validation_calibration") or {}, record["score"], thresholds,
                   scorers, standardise, record.get("fitted_on", "validation"))
