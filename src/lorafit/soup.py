"""`lorafit soup`: one model from several finished runs, by averaging their weights (a uniform "model
soup", Wortsman et al. 2022).

Each run's adapter is folded into the base weights first (the method's own `merge`), so runs of any
method over the same base model average as full weight sets; the heads are averaged too. The soup
costs what one run costs at prediction, unlike a logit ensemble (N forward passes). Measured on
Banking77 with the shipped LoRA config, seeds 0-2 (bench/soup.py): the runs alone 93.67 / 93.28 /
93.15% on test, their soup 93.80%, the logit ensemble 93.86%.

The result is a folder in the `merged` export format (export.json records the runs): `lorafit.load`,
`predict`, `eval`, `serve` and `export --format onnx` take it. Plain LoRA runs can instead be written as
one LoRA adapter of rank sum(r_i) computing exactly the same average (`adapter=True`, `--adapter`: a few
MB, served on a shared base beside other adapters). Its calibration (ood.json: temperature and top-probability
threshold) is fitted on validation when every run held out the same validation examples (a dataset
with its own validation split, or runs of one seed); runs whose validation splits differ (carved from
train with different seeds: one run's validation is another's training data) give a soup without a
temperature or threshold, and the log and export.json say why. A soup decides out of scope by the top
probability (msp), with the threshold that keeps ood.target_recall of the in-scope validation examples,
whatever score its runs decided by (their fitted arrays belong to their own weights).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import __version__, atomic, calibration, fitted, methods, ood
from .errors import UserError
from .export import base_hub_id
from .inference import label_indices, load, load_model, run_split
from .models import SequenceClassifier, load_tokenizer, save_transformers_folder
from .rundir import RunDir, folder_bytes

__all__ = ["soup", "PLAIN_LORA"]

#: The methods whose adapters `soup(adapter=True)` concatenates: peft LoRA without DoRA or per-module ranks.
PLAIN_LORA = ("lora", "rslora", "loraplus")

log = logging.getLogger(__name__)


def soup(run_dirs: list[str | Path], out: str | Path, overwrite: bool = False, adapter: bool = False) -> dict:
    """Average `run_dirs` into one model at `out`; returns its export.json.

    By default their merged weights are averaged into a merged-format folder (any method). `adapter=True`
    (plain LoRA runs only) writes the same function as one LoRA adapter instead (`_lora_concat`): small, and
    servable on a shared base beside other adapters."""
    if len(run_dirs) < 2:
        raise UserError("a soup needs at least two runs")
    runs = [RunDir(r) for r in run_dirs]
    configs = [_check_finished(run) for run in runs]
    first, labels = configs[0], runs[0].labels()
    for run, cfg in zip(runs[1:], configs[1:]):
        if run.labels() != labels:
            raise UserError(f"{run.path} has other labels than {runs[0].path} (labels.json): only runs of one label set average")
        if (cfg.model.name, cfg.model.pooling) != (first.model.name, first.model.pooling):
            raise UserError(f"{run.path} builds on {cfg.model.name} ({cfg.model.pooling} pooling), {runs[0].path} on "
                            f"{first.model.name} ({first.model.pooling}): only runs of one base model average")
        if cfg.data.max_length != first.data.max_length:
            raise UserError(f"{run.path} reads {cfg.data.max_length} tokens, {runs[0].path} {first.data.max_length}: "
                            "only runs of one data.max_length average")
    target = RunDir(out)
    target.check_new(overwrite)
    out_path = target.path.resolve()
    if any(out_path == r or r in out_path.parents or out_path in r.parents for r in (run.path.resolve() for run in runs)):
        raise UserError("--out must be outside the runs' folders and must not contain them")

    factors = _lora_concat(runs, configs) if adapter else None  # refuses what it cannot average before any work
    validation, why_none = _shared_validation(runs, configs)
    with atomic.folder(target.path) as tmp:
        if factors is not None:
            tensors, peft_config = factors
            (tmp / "adapter_config.json").write_text(json.dumps(peft_config, indent=2), encoding="utf-8")
            save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        else:
            save_transformers_folder(_mean_model(runs, configs), tmp, labels)
            load_tokenizer(first.model).save_pretrained(str(tmp))
        # the first run's settings (max_length, batch sizes, token budget); an adapter soup's method is its own
        RunDir(tmp).write_config(_adapter_config(first, factors[1]["r"]) if factors is not None else first)
        RunDir(tmp).write_json("labels.json", labels)
        meta = {
            "format": "adapter" if adapter else "merged", "quantize": None, "quantization": None,
            "source_run": str(runs[0].path.resolve()),
            "soup": {"runs": [str(run.path.resolve()) for run in runs], "weights": "uniform",
                     "form": "LoRA factors concatenated, one adapter" if adapter else "merged weights averaged",
                     "methods": [cfg.method.name for cfg in configs], "seeds": [cfg.seed for cfg in configs]},
            "method": "soup", "base_model": first.model.name, "base_model_hub_id": base_hub_id(runs[0], first),
            "pooling": first.model.pooling,
            "max_length": first.data.max_length, "num_labels": len(labels), "lorafit_version": __version__,
        }
        RunDir(tmp).write_json("export.json", meta)  # what `load` reads to know the folder's format
        if validation is None:
            meta["calibration"] = (f"none: {why_none}; probabilities are uncalibrated and there is no out-of-scope "
                                   "threshold")
            log.warning("soup: %s", meta["calibration"])
        else:
            meta["calibration"] = _calibrate(load(tmp, device="cpu", out_of_scope=False), RunDir(tmp), first, validation)
        meta["bytes"] = folder_bytes(tmp)
        RunDir(tmp).write_json("export.json", meta)
    return meta


def _lora_concat(runs: list[RunDir], configs: list) -> tuple[dict[str, torch.Tensor], dict]:
    """The runs' LoRA adapters as one adapter computing their average: for every adapted module, A' stacks
    the runs' A (r_i x in) and B' the runs' B (out x r_i), each B scaled by its run's s_i / N (s_i its
    lora_alpha / r, or / sqrt(r) with rsLoRA), so that B'A' = (1/N) sum_i s_i B_i A_i with scaling 1
    (lora_alpha' = r' = sum r_i); the heads are averaged. Exactly the merged soup's function, at rank sum r_i."""
    from safetensors.torch import load_file

    settings, states = [], []
    for run, cfg in zip(runs, configs):
        folder = run.artifact(methods.build(cfg.method).artifact)
        config_file = folder / "adapter_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        if (cfg.method.name not in PLAIN_LORA or config.get("peft_type") != "LORA" or config.get("use_dora")
                or config.get("rank_pattern") or config.get("alpha_pattern") or config.get("lora_bias")
                or not {"r", "lora_alpha"} <= set(config) or not (folder / "adapter_model.safetensors").is_file()):
            raise UserError(f"{run.path} ({cfg.method.name}) is not a plain LoRA adapter ({', '.join(PLAIN_LORA)} without "
                            "per-module ranks; DoRA, AdaLoRA and the rest do not concatenate): leave out --adapter for "
                            "a merged soup")
        settings.append(config)
        states.append(load_file(str(folder / "adapter_model.safetensors")))
    keys = set(states[0])
    for run, config, state in zip(runs[1:], settings[1:], states[1:]):
        if set(state) != keys or config.get("modules_to_save") != settings[0].get("modules_to_save"):
            raise UserError(f"{run.path} adapts other modules than {runs[0].path}: their adapters do not concatenate")
    n = len(runs)
    scale = [c["lora_alpha"] / (math.sqrt(c["r"]) if c.get("use_rslora") else c["r"]) for c in settings]
    tensors = {}
    for key in sorted(keys):
        if key.endswith(".lora_A.weight"):
            tensors[key] = torch.cat([state[key].float() for state in states], dim=0)  # (sum r_i, in)
        elif key.endswith(".lora_B.weight"):
            tensors[key] = torch.cat([state[key].float() * s / n for state, s in zip(states, scale)], dim=1)  # (out, sum r_i)
        elif ".lora_" not in key:  # the head (modules_to_save), averaged
            tensors[key] = torch.stack([state[key].float() for state in states]).mean(0)
        else:
            raise UserError(f"{runs[0].path}'s adapter holds {key}, which a concatenated LoRA adapter cannot")
    rank = sum(c["r"] for c in settings)
    config = {**settings[0], "r": rank, "lora_alpha": float(rank), "use_rslora": False, "inference_mode": True,
              "rank_pattern": {}, "alpha_pattern": {}, "init_lora_weights": True}  # the factors are given: no init runs
    return {k: v.contiguous() for k, v in tensors.items()}, config


def _adapter_config(first, rank: int):
    """The soup adapter's config.yaml: the first run's settings with its method as plain LoRA of the summed
    rank and scaling 1 (what adapter_config.json says), so every reader builds the adapter it holds."""
    from .config import validate

    recorded = first.model_dump(mode="json")
    method = {"name": "lora", "targets": recorded["method"]["targets"], "layers": recorded["method"]["layers"],
              "rank": rank, "alpha": float(rank), "dropout": recorded["method"]["dropout"]}
    return validate({**recorded, "method": method})


def _check_finished(run: RunDir):
    cfg = run.config()  # a missing folder or config.yaml says so
    if (run.path / "export.json").is_file():
        raise UserError(f"{run.path} is an export; a soup averages run folders")
    if not (run.path / "summary.json").is_file():
        raise UserError(f"{run.path} has not finished training (no summary.json)")
    return cfg


def _mean_model(runs: list[RunDir], configs: list) -> SequenceClassifier:
    """The runs' merged models, averaged parameter by parameter in float32 (one model in memory at a time
    besides the running sum)."""
    total, model = None, None
    for i, (run, cfg) in enumerate(zip(runs, configs)):
        log.info("soup: merging %s (%d of %d)", run.path, i + 1, len(runs))
        model = methods.build(cfg.method).merge(load_model(run, cfg, run.labels()))
        if not isinstance(model, SequenceClassifier):
            raise UserError(f"merging {run.path} ({cfg.method.name}) did not give a plain model ({type(model).__name__})")
        state = model.state_dict()
        if total is None:
            total = {k: v.detach().float().clone() for k, v in state.items()}
        elif set(state) != set(total) or any(state[k].shape != total[k].shape for k in total):
            raise UserError(f"{run.path}'s merged weights do not match {runs[0].path}'s: not the same architecture")
        else:
            for k in total:
                total[k] += state[k].detach().float()
    model.load_state_dict({k: (v / len(runs)).to(state[k].dtype) for k, v in total.items()})
    return model.eval()


def _shared_validation(runs: list[RunDir], configs: list):
    """(the validation split every run held out (splits.json rows equal), None), or (None, why there is none)."""
    def held_out(run: RunDir):  # the validation rows and a hash of their texts and labels
        splits = run.read_json("splits.json") if (run.path / "splits.json").is_file() else {}
        return splits.get("validation"), (splits.get("content_sha256") or {}).get("validation")

    if any(cfg.data.train_on_validation for cfg in configs):
        return None, "a run trained on its validation rows (lorafit train --final), so no split is unseen by all of them"
    recorded = [held_out(run) for run in runs]
    if recorded[0][0] is None or any(r != recorded[0] for r in recorded[1:]) or \
            any(cfg.data.name != configs[0].data.name for cfg in configs[1:]):
        return None, "the runs held out different validation examples, so no split is unseen by all of them"
    return run_split(runs[0], configs[0], "validation"), None


def _calibrate(classifier, folder: RunDir, cfg, validation) -> dict:
    """ood.json for the soup (`classifier`, loaded from its folder): temperature and top-probability threshold
    fitted on the shared validation split, as training fits a run's (posthoc.fit with ood.score msp)."""
    logits = classifier.logits(validation.texts)
    targets = label_indices(validation.labels, classifier.labels)
    temperature = calibration.fit_temperature(logits, targets) if cfg.ood.calibrate else 1.0
    scores = ood.logit_score("msp", logits, temperature)
    chosen = ood.choose_threshold(scores, None, logits.argmax(-1) == targets, cfg.ood.target_recall)
    post = fitted.Posthoc(temperature, calibration.calibration_record(logits, targets, temperature), "msp", {"msp": chosen})
    fitted.save(folder, post)
    accuracy = float((logits.argmax(-1) == targets).mean())
    log.info("soup: validation accuracy %.4f, temperature %.3f; out of scope by msp (%s)", accuracy, temperature, chosen["rule"])
    return {"split": "validation", "examples": len(targets), "accuracy": accuracy, "temperature": temperature,
            "ood_score": "msp", "threshold_rule": chosen["rule"]}
