"""What is fitted after training, on the best epoch's weights, without touching test.

- the temperature (calibration.fit_temperature) on the in-scope validation examples;
- the out-of-scope scores (ood.py): the feature-space ones fitted on the training set's sentence
  vectors (base_knn on those of the pre-trained encoder, rebuilt from model.name for the purpose);
  hybrid's standardisation on the in-scope validation scores; each score's threshold chosen on
  validation (with OOS validation examples by accuracy over in-scope + OOS, else by in-scope recall
  `ood.target_recall`).

`fit` returns a `Posthoc` (fitted.py: what ood.json and ood.safetensors record); `evaluate_test` applies it
to the test split once, for eval.json's `calibration` and `ood` sections. `refit` does both again on a
finished run folder.
"""

from __future__ import annotations

import numpy as np

from . import calibration, ood
from .config import Config
from .fitted import ARRAYS, Posthoc, load, save
from .inference import features_and_logits
from .models import build_classifier

__all__ = ["Posthoc", "fit", "evaluate_test", "save", "load", "ARRAYS", "refit"]

def _split(job, name: str, oos: bool) -> tuple[np.ndarray, np.ndarray]:
    tokens = job.oos_tokens[name] if oos else job.tokens[name]
    return features_and_logits(job.model, tokens, job.pad_id, job.cfg.train.eval_batch_size, job.device, job.amp,
                               job.max_tokens, len(job.dataset.label_names))


def _base_vectors(job, tokens: list[list[int]]) -> np.ndarray:
    """The pre-trained encoder's sentence vectors (N, H) of `tokens`: model.name rebuilt without the method
    (what base_knn reads), kept on the job for the next call."""
    if job.pretrained is None:
        job.pretrained = build_classifier(job.cfg.model, len(job.dataset.label_names), job.cfg.seed).to(job.device).eval()
    features, _ = features_and_logits(job.pretrained, tokens, job.pad_id, job.cfg.train.eval_batch_size, job.device,
                                      job.amp, job.max_tokens, len(job.dataset.label_names))
    return features


def _needs_base(kinds) -> bool:
    return any(k in ood.BASE_SCORES for k in kinds)


def fit(job) -> Posthoc:
    """Fit the temperature and every OOS score's threshold on validation (and train, for feature scores)."""
    cfg: Config = job.cfg
    val_features, val_logits = _split(job, "validation", oos=False)
    val_targets = job.targets["validation"]
    if not cfg.ood.calibrate:
        temperature, fitted_on = 1.0, "none (ood.calibrate=false)"
    elif cfg.ood.temperature is not None:  # fixed (a final model's: chosen where validation was held out)
        temperature, fitted_on = cfg.ood.temperature, "ood.temperature (fixed)"
    else:
        temperature, fitted_on = calibration.fit_temperature(val_logits, val_targets), "validation"
    has_oos = bool(job.oos_tokens["validation"] or job.oos_tokens["test"])
    kinds = list(ood.SCORES) if has_oos else [cfg.ood.score]  # with OOS data: every score, for the table
    scorers = {}
    k = min(cfg.ood.k, len(job.tokens["train"]))
    if any(kind in ood.FEATURE_SCORES for kind in kinds):
        train_features, _ = features_and_logits(job.model, job.tokens["train"], job.pad_id, cfg.train.eval_batch_size,
                                                job.device, job.amp, job.max_tokens, len(job.dataset.label_names))
        for kind in (kind for kind in kinds if kind in ood.FEATURE_SCORES):
            scorers[kind] = ood.fit_feature_scorer(kind, train_features, job.targets["train"], k=k)
    base = {}
    if _needs_base(kinds):
        scorers["base_knn"] = ood.fit_feature_scorer("knn", _base_vectors(job, job.tokens["train"]), job.targets["train"], k=k)
        base = {oos: _base_vectors(job, job.oos_tokens["validation"] if oos else job.tokens["validation"])
                for oos in (False, True)}
    post = Posthoc(temperature, calibration.calibration_record(val_logits, val_targets, temperature), cfg.ood.score, {}, scorers,
                   fitted_on=fitted_on)
    if "hybrid" in kinds:  # each part standardised on the in-scope validation examples
        for part in ood.HYBRID_PARTS:
            values = post.scores(part, val_features, val_logits, base.get(False))
            post.standardise[part] = (float(values.mean()), float(max(values.std(), 1e-12)))
    oos_features, oos_logits = _split(job, "validation", oos=True)
    correct = val_logits.argmax(-1) == val_targets
    for kind in kinds:
        in_scope = post.scores(kind, val_features, val_logits, base.get(False))
        outside = post.scores(kind, oos_features, oos_logits, base.get(True)) if len(oos_logits) else None
        if kind == cfg.ood.score and cfg.ood.threshold is not None:
            post.thresholds[kind] = {"threshold": float(cfg.ood.threshold), "rule": "fixed (ood.threshold)",
                                     "validation_recall": float((in_scope >= cfg.ood.threshold).mean())}
        else:
            post.thresholds[kind] = ood.choose_threshold(in_scope, outside, correct, cfg.ood.target_recall)
    if "hybrid" in kinds:
        post.thresholds["hybrid"]["standardised"] = {part: {"mean": m, "sd": sd} for part, (m, sd) in post.standardise.items()}
    return post


def evaluate_test(job, post: Posthoc, test_logits: np.ndarray) -> dict:
    """eval.json's `calibration` (test, before/after the temperature) and, with OOS test examples, `ood`."""
    targets = job.targets["test"]
    result = {"calibration": calibration.calibration_record(test_logits, targets, post.temperature), "ood": None}
    if not job.oos_tokens["test"]:
        return result  # no out-of-scope test examples: nothing to score
    features, _ = _split(job, "test", oos=False)
    oos_features, oos_logits = _split(job, "test", oos=True)
    logits = np.concatenate([test_logits, oos_logits])
    all_features = np.concatenate([features, oos_features])
    base = _base_vectors(job, job.tokens["test"] + job.oos_tokens["test"]) if _needs_base(post.thresholds) else None
    is_oos = np.r_[np.zeros(len(targets), bool), np.ones(len(oos_logits), bool)]
    full_targets = np.r_[targets, -np.ones(len(oos_logits), int)]
    table = {kind: ood.oos_metrics(post.scores(kind, all_features, logits, base), is_oos, logits.argmax(-1), full_targets,
                                   len(job.dataset.label_names), chosen["threshold"])
             for kind, chosen in post.thresholds.items()}
    return result | {"ood": {"score": post.score, "scores": table}}


def refit(run_dir, ood_settings: dict | None = None) -> dict:
    """Fit the post-hoc stage of a finished run again with this version of lorafit (scores added since it
    trained, say): the temperature and every OOS score on validation and train as `fit` does, then the test
    split once for eval.json's `calibration` and `ood` sections. Rewrites ood.json and those two sections;
    the weights, the classification figures and summary.json stay as trained. `ood_settings` ({"k": 1},
    say) replace the run's ood.* settings, and config.yaml records them. Returns the new eval.json."""
    from .config import validate
    from .errors import UserError
    from .inference import load_model
    from .job import check_same_data, prepare
    from .rundir import Eval, RunDir

    run = RunDir(run_dir)
    cfg = run.config()  # a missing folder or config.yaml says so first
    if not (run.path / "summary.json").is_file():
        raise UserError(f"{run.path} has not finished training (no summary.json); nothing to re-fit")
    if ood_settings and cfg.ood.threshold is not None and ood_settings.get("score", cfg.ood.score) != cfg.ood.score \
            and "threshold" not in ood_settings:
        raise UserError(f"{run.path} has a fixed threshold for {cfg.ood.score} (ood.threshold), which means nothing on "
                        f"{ood_settings['score']}; give ood threshold=null or a threshold for it too")
    if ood_settings:
        recorded = cfg.model_dump(mode="json")
        cfg = validate({**recorded, "ood": {**recorded["ood"], **ood_settings}})  # a bad setting fails before any work
    job = prepare(cfg, run, run.compute() if (run.path / "compute.json").is_file() else None, teacher="skip")
    check_same_data(job, run)
    job.model = load_model(run, cfg, job.dataset.label_names).to(job.device).eval()
    post = fit(job)
    _, test_logits = _split(job, "test", oos=False)
    evaluated = run.read_json("eval.json") | evaluate_test(job, post, test_logits)
    if ood_settings:
        run.write_config(cfg, derived=run.derived())
    save(run, post)
    run.write_record(Eval.from_json(evaluated))
    return evaluated
