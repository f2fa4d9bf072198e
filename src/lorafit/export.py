"""`lorafit export`: a run folder -> a deployable folder, proven equal to the trained model.

Formats:
    merged    the adapter folded into the base weights: model.safetensors + config.json +
              modeling_lorafit.py + tokenizer; loads with transformers alone
              (`AutoModelForSequenceClassification.from_pretrained(dir, trust_remote_code=True)`)
    adapter   the peft-format adapter (plus labels and config), for serving over a shared base
    onnx      an ONNX graph (dynamic batch and sequence axes) + tokenizer; `quantize="int8"`
              applies ONNX Runtime dynamic quantisation, `quantize="int8-static"` static quantisation
              calibrated on the run's training texts (lorafit.quantization)

Every export is written to a hidden temporary folder, reloaded from its files alone, and its logits
on the run's validation split compared with the training-time model's (the parity check). Only an
export within tolerance is renamed into place, with the figures in `export.json` and its model card
in `README.md` (lorafit.modelcard); one that breaks parity is an error and leaves nothing behind.
An int8 export's tolerance can be loosened knowingly (`min_agreement`, `max_accuracy_drop`; the CLI's
--min-agreement, --max-accuracy-drop): export.json then records the values used and that the user set them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from . import __version__, atomic, fitted, kernels, modelcard, quantization
from .errors import UserError
from .evaluate import softmax
from .inference import ONNX_BATCH_SIZE, Classifier, label_indices, load, run_split
from . import methods
from .models import SequenceClassifier, hub_id, save_transformers_folder
from .rundir import RunDir, folder_bytes
from .runtime import token_budget

__all__ = ["export", "describe", "FORMATS", "TOLERANCES", "TOLERANCE_FLAGS"]

log = logging.getLogger(__name__)

FORMATS = ("merged", "adapter", "onnx")

#: Parity an export must keep against the training-time model on the parity split.
#: Float32 exports compute the same function, so only rounding may differ; int8 weights change
#: the function slightly, so we bound what matters: the predicted labels and the accuracy.
TOLERANCES = {
    "float32": {"max_abs_logit_diff": 1e-3},
    "int8": {"min_top1_agreement": 0.97, "max_accuracy_drop": 0.01},
}

#: The CLI flags that override TOLERANCES["int8"], by key.
TOLERANCE_FLAGS = {"min_top1_agreement": "--min-agreement", "max_accuracy_drop": "--max-accuracy-drop"}


def export(run_dir: str | Path, format: str, out: str | Path, quantize: str | None = None,
           overwrite: bool = False, split: str = "validation", min_agreement: float | None = None,
           max_accuracy_drop: float | None = None) -> dict:
    """Write `run_dir` as `format` to `out`; returns what export.json records (parity included).

    `quantize`: None, "int8" (dynamic) or "int8-static" (calibrated), ONNX only. `min_agreement`,
    `max_accuracy_drop` (fractions): an int8 export's parity tolerance instead of TOLERANCES["int8"].
    """
    if format not in FORMATS:
        raise UserError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    if quantize not in (None, *quantization.KINDS):
        raise UserError(f"unknown quantisation {quantize!r}; choose int8 (dynamic) or int8-static (calibrated)")
    if quantize and format != "onnx":
        raise UserError(f"--quantize {quantize} applies to --format onnx only (ONNX Runtime quantisation)")
    tolerance = _tolerance(quantize, {"min_top1_agreement": min_agreement, "max_accuracy_drop": max_accuracy_drop})
    run = RunDir(run_dir)
    if (run.path / "export.json").is_file():
        source = run.read_json("export.json")
        soup = source.get("soup")
        if not soup:
            raise UserError(f"{run.path} is already an export; export from the run folder it came from")
        if source.get("format") not in ("merged", "adapter"):
            raise UserError(f"{run.path} is an export ({source.get('format')}) of a soup; export the soup folder itself")
        allowed = ["onnx"] + (["merged"] if source.get("format") == "adapter" else [])
        if format not in allowed:  # a soup has no run folder to export from; it is one of these forms already
            raise UserError(f"{run.path} is a soup ({source.get('format')} weights): it exports to "
                            f"{' or '.join(f'--format {f}' for f in allowed)} only")
    else:
        soup = None
    cfg, labels = run.config(), run.labels()
    method = methods.build(cfg.method)
    if format == "adapter" and method.artifact != "adapter":
        raise UserError(f"{run.path} was trained with {cfg.method.name} and has no adapter; export --format merged or onnx")
    target = RunDir(out)
    target.check_new(overwrite)
    out_path, run_path = target.path.resolve(), run.path.resolve()
    if out_path == run_path or run_path in out_path.parents or out_path in run_path.parents:
        raise UserError("--out must be outside the run folder and must not contain it")

    # Parity in float32 on both sides, whatever precision the run trained in: it checks the merge and the graph,
    # and bf16 rounding differs between a merged and an unmerged model by more than float32's tolerance.
    reference = load(run.path, device="cpu", merge=False, out_of_scope=False, precision="fp32")
    if split == "validation" and cfg.data.train_on_validation:
        # lorafit train --final: its validation rows were trained on, so an int8 export's accuracy there
        # (published in its model card) would be a training figure, and static int8 calibrates on them
        log.info("this run trained on its validation rows (lorafit train --final): parity is checked on test")
        split = "test"
    parity_split = run_split(run, cfg, split)
    log.info("reference: the training-time model on %d %s examples", len(parity_split.texts), split)
    reference_logits = reference.logits(parity_split.texts)  # (N, C), before any merging

    quantized = None  # the int8 quantisation's record (lorafit.quantization), for export.json
    with atomic.folder(target.path) as tmp:  # renamed into place only if the parity check passes
        if format == "adapter":
            shutil.copytree(run.artifact(method.artifact), tmp, dirs_exist_ok=True)
        else:
            merged = _plain(reference.model, labels) if reference.kind == "merged" else method.merge(reference.model)
            if not isinstance(merged, SequenceClassifier):
                raise UserError(f"merging {cfg.method.name} did not give a plain model ({type(merged).__name__})")
            if format == "merged":
                _write_merged(merged, reference, tmp)
            else:
                quantized = _write_onnx(merged, reference, tmp, quantize, run, cfg)
        # ood.json: the temperature and OOS threshold; ood.safetensors: what the deciding OOS score reads
        for name in ("config.yaml", "labels.json", "ood.json", fitted.ARRAYS):
            if (run.path / name).is_file():  # (a run of an older version has no ood.json)
                shutil.copy2(run.path / name, tmp / name)
        meta = {
            "format": format,
            "quantize": quantize,
            "quantization": quantized,
            "source_run": str(run.path.resolve()),
            "method": cfg.method.name,
            "base_model": cfg.model.name,
            "base_model_hub_id": base_hub_id(run, cfg),
            "pooling": cfg.model.pooling,
            "max_length": cfg.data.max_length,
            "num_labels": len(labels),
            "lorafit_version": __version__,
        }
        if soup:  # what the model is: the soup's runs, not the folder it was exported from
            meta |= {"soup": soup, "method": "soup", "base_model_hub_id": run.read_json("export.json").get("base_model_hub_id")}
        RunDir(tmp).write_json("export.json", meta)

        exported = load(tmp, device="cpu", out_of_scope=False, precision="fp32")  # from the written files alone
        log.info("parity: the exported %s model on the same examples", format)
        meta["parity"] = _parity(reference_logits, exported, parity_split, split, tolerance)
        # The model card (README.md; for an adapter it replaces peft's stub), from the run's files and these
        # figures; a soup's figures are no one run's, so it has none (modelcard.render says so).
        if not soup:
            atomic.write_text(tmp / modelcard.CARD, modelcard.render(tmp, export_meta=meta, name=target.path.name))
        meta["files"] = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        meta["bytes"] = folder_bytes(tmp)
        RunDir(tmp).write_json("export.json", meta)
        if not meta["parity"]["passed"]:
            loosen = (f"; to accept a larger int8 drop knowingly, pass {' and/or '.join(TOLERANCE_FLAGS.values())}"
                      if quantize else "")
            raise UserError(f"the {format} export breaks parity ({_parity_line(meta['parity'])}; tolerance "
                            f"{meta['parity']['tolerance']}); nothing was written{loosen}")
    return meta


def _tolerance(quantize: str | None, given: dict[str, float | None]) -> dict:
    """The parity tolerance of this export: {kind, values, source (per value: default or user)}, checked
    before any work. Only int8 tolerances may be set: a float export computes the same function."""
    for key, value in given.items():
        if value is not None and not 0.0 <= value <= 1.0:  # NaN fails too
            raise UserError(f"{TOLERANCE_FLAGS[key]} must be a fraction in [0, 1], got {value}")
    user = {key: float(value) for key, value in given.items() if value is not None}
    if user and not quantize:
        raise UserError(f"{' and '.join(TOLERANCE_FLAGS.values())} apply to int8 exports (--quantize) only; a float "
                        f"export computes the trained function and must match it within max |logit diff| "
                        f"{TOLERANCES['float32']['max_abs_logit_diff']:g}")
    kind = "int8" if quantize else "float32"
    default = dict(TOLERANCES[kind])
    return {"kind": kind, "values": {**default, **user}, "default": default,
            "source": {key: "user" if key in user else "default" for key in default}}


def base_hub_id(run: RunDir, cfg) -> str:
    """The base model's hub id as decided when the run trained (compute.json), where a relative folder
    name meant what it said; a run of an older version falls back to working it out from the name here."""
    if (run.path / "compute.json").is_file():
        recorded = run.compute().base_model
        if recorded and recorded.get("hub_id"):
            return recorded["hub_id"]
    return hub_id(cfg.model.name)


def _parity(reference_logits: np.ndarray, exported: Classifier, split, split_name: str, tolerance: dict) -> dict:
    logits = exported.logits(split.texts)
    targets = label_indices(split.labels, exported.labels)
    ref_top1, exp_top1 = reference_logits.argmax(-1), logits.argmax(-1)
    result = {
        "split": split_name,
        "examples": len(targets),
        "max_abs_logit_diff": float(np.abs(reference_logits - logits).max()) if len(targets) else 0.0,
        "max_abs_prob_diff": float(np.abs(softmax(reference_logits) - softmax(logits)).max()) if len(targets) else 0.0,
        "top1_agreement": float((ref_top1 == exp_top1).mean()),
        "reference_accuracy": float((ref_top1 == targets).mean()),
        "export_accuracy": float((exp_top1 == targets).mean()),
    }
    values = tolerance["values"]
    if tolerance["kind"] == "int8":
        passed = (result["top1_agreement"] >= values["min_top1_agreement"]
                  and result["reference_accuracy"] - result["export_accuracy"] <= values["max_accuracy_drop"])
    else:
        passed = result["max_abs_logit_diff"] <= values["max_abs_logit_diff"]
    return {**result, "tolerance": values, "tolerance_source": tolerance["source"],
            "default_tolerance": tolerance["default"], "passed": bool(passed)}


def _parity_line(p: dict) -> str:
    return (f"{p['examples']} {p['split']} examples, max |logit diff| {p['max_abs_logit_diff']:.2e}, "
            f"top-1 agreement {p['top1_agreement']:.2%}, accuracy {p['export_accuracy']:.2%} "
            f"(training-time model {p['reference_accuracy']:.2%})")


def _plain(model, labels: list[str]) -> SequenceClassifier:
    """A merged-format model (LorafitForSequenceClassification, what a soup folder loads as) as lorafit's
    SequenceClassifier, the module the ONNX exporter traces: its own encoder, pooling and head weights."""
    plain = SequenceClassifier(model.encoder, len(labels), model.pooling, head_dropout=0.0)
    plain.classifier.load_state_dict(model.classifier.state_dict())
    return plain.eval()


def _write_merged(model: SequenceClassifier, reference: Classifier, folder: Path) -> None:
    save_transformers_folder(model, folder, reference.labels)
    reference.tokenizer.save_pretrained(str(folder))


def _write_onnx(model: SequenceClassifier, reference: Classifier, folder: Path, quantize: str | None,
                run: RunDir, cfg) -> dict | None:
    """The ONNX graph (quantised where asked) and tokenizer into `folder`; returns the quantisation's record."""
    model = model.eval().float()
    kernels.use_onednn_linear(model, enable=False)  # the graph holds standard MatMul/Gemm nodes
    example = reference.tokenizer(["an example sentence for the trace", "a second one"], padding=True, return_tensors="pt")
    inputs = (example["input_ids"], example["attention_mask"])  # (2, T) each: batch and length stay symbolic
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    graph = folder / ("model.float32.onnx" if quantize else "model.onnx")
    log.info("exporting the ONNX graph")
    with warnings.catch_warnings(), _quiet_logger("torch.onnx"):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model, inputs, input_names=["input_ids", "attention_mask"], output_names=["logits"],
            dynamic_shapes=({0: batch, 1: sequence}, {0: batch, 1: sequence}), dynamo=True, verbose=False,
        )
    program.save(str(graph))
    record = None
    if quantize == "int8":
        log.info("quantising to int8 (ONNX Runtime dynamic quantisation)")
        with _quiet_logger(""):  # the quantiser's advice to pre-process goes to the root logger
            record = quantization.dynamic(graph, folder / "model.onnx")
    elif quantize == "int8-static":
        # Calibrated on training texts, never on the parity split the export is then checked on; the
        # run's own rows (splits.json), without augmented ones, padded per batch as lorafit.load pads an ONNX export.
        train = run_split(run, cfg, "train")
        texts = quantization.calibration_sample(train.texts, cfg.seed)
        log.info("quantising to int8 (static, QDQ), calibrated on %d of %d training texts", len(texts), len(train))
        # The advice to pre-process is quietened as above: its symbolic shape inference fails on the dynamo
        # graph, and with it off it changed no tiny run's agreement.
        with _quiet_logger(""):
            record = quantization.static(graph, folder / "model.onnx", reference.tokenize(texts), reference.pad_id,
                                         min(ONNX_BATCH_SIZE, cfg.train.eval_batch_size),
                                         token_budget(cfg.train.max_batch_tokens, torch.device("cpu")))
        record["calibration"] = {"split": "train", **record["calibration"], "of": len(train), "seed": cfg.seed}
    if quantize:
        graph.unlink()
    reference.tokenizer.save_pretrained(str(folder))
    return record


@contextlib.contextmanager
def _quiet_logger(name: str):
    """Libraries' warnings that say nothing to a lorafit user (torchvision ops absent, say)."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def describe(meta: dict) -> str:
    """The lines `lorafit export` prints."""
    kind = meta["format"] + (f" ({meta['quantize']})" if meta.get("quantize") else "")
    parity = meta["parity"]
    lines = [f"exported {kind}: {meta['bytes'] / 2**20:.1f} MiB",
             f"parity: {_parity_line(parity)} -- within tolerance {json.dumps(parity['tolerance'])}"]
    user = [f"{TOLERANCE_FLAGS[k]} {parity['tolerance'][k]:g}" for k, v in parity.get("tolerance_source", {}).items() if v == "user"]
    if user:
        lines[-1] += f" (set by the user: {', '.join(user)}; defaults {json.dumps(parity['default_tolerance'])})"
    calibration = (meta.get("quantization") or {}).get("calibration")
    if calibration:
        lines.append(f"calibrated on {calibration['texts']} of {calibration['of']} {calibration['split']} texts "
                     f"(seed {calibration['seed']}, {calibration['method']})")
    return "\n".join(lines)
