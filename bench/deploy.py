"""Deployment figures for one run: export sizes, test accuracy, latency and throughput per backend.

    python bench/deploy.py runs/b77-lora

Exports the run as adapter, merged, ONNX, ONNX int8 (dynamic) and ONNX int8-static (calibrated), each
with its parity check, then for the run itself (PyTorch + adapter), the merged model and the ONNX
exports measures: test accuracy and
macro-F1; single-text latency (p50/p99 over `--latency-texts` test texts sent one at a time,
tokenising included, after a warm-up); batch-of-64 throughput over the whole test set. The last
line is one JSON object. Keep the machine otherwise idle: latencies are wall-clock.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import lorafit
from lorafit.export import export
from lorafit.inference import run_split
from lorafit.rundir import RunDir, folder_bytes


def latency_ms(classifier, texts: list[str], warmup: int = 20) -> dict:
    for text in texts[:warmup]:
        classifier.predict([text], top_k=3)
    times = []
    for text in texts:
        start = time.perf_counter()
        classifier.predict([text], top_k=3)
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return {"p50": statistics.median(times), "p99": times[min(len(times) - 1, int(0.99 * len(times)))], "mean": statistics.fmean(times)}


def batch_throughput(classifier, texts: list[str], batch: int = 64) -> float:
    classifier.logits(texts[:batch])  # warm-up
    start = time.perf_counter()
    for i in range(0, len(texts), batch):
        classifier.predict(texts[i : i + batch], top_k=3)
    return len(texts) / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--out", default="runs/deploy", help="where the exports go (replaced)")
    parser.add_argument("--latency-texts", type=int, default=500)
    args = parser.parse_args()

    run = RunDir(args.run_dir)
    cfg = run.config()
    test = run_split(run, cfg, "test")
    out = Path(args.out)
    exports = {"adapter": ("adapter", None), "merged": ("merged", None), "onnx": ("onnx", None), "onnx-int8": ("onnx", "int8"),
               "onnx-int8-static": ("onnx", "int8-static")}
    meta = {}
    for name, (fmt, quantize) in exports.items():
        print(f"exporting {name} ...", file=sys.stderr, flush=True)
        meta[name] = export(run.path, fmt, out / name, quantize=quantize, overwrite=True)

    weights = {"adapter": "adapter_model.safetensors", "merged": "model.safetensors", "onnx": "model.onnx", "onnx-int8": "model.onnx",
               "onnx-int8-static": "model.onnx"}
    sizes = {name: {"weights_bytes": (out / name / weights[name]).stat().st_size, "folder_bytes": folder_bytes(out / name)}
             for name in exports}

    backends = {"run (torch + adapter)": run.path, "merged (torch)": out / "merged", "onnx": out / "onnx", "onnx-int8": out / "onnx-int8",
                "onnx-int8-static": out / "onnx-int8-static"}
    rng = np.random.default_rng(0)
    sample = [test.texts[i] for i in rng.choice(len(test.texts), size=min(args.latency_texts, len(test.texts)), replace=False)]
    rows = {}
    for name, path in backends.items():
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        classifier = lorafit.load(path, device="cpu")
        metrics = classifier.evaluate(test.texts, test.labels)
        rows[name] = {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"],
                      "latency_ms": latency_ms(classifier, sample), "batch64_texts_per_s": batch_throughput(classifier, test.texts)}

    print(f"\nrun {run.path} ({cfg.method.name}, {cfg.model.name}); test split: {len(test.texts)} texts\n")
    print("| export | weights on disk | folder on disk | parity (validation): max |logit diff|, top-1 agreement |")
    print("|---|---:|---:|---|")
    for name in exports:
        p = meta[name]["parity"]
        print(f"| {name} | {sizes[name]['weights_bytes'] / 2**20:.2f} MiB | {sizes[name]['folder_bytes'] / 2**20:.2f} MiB "
              f"| {p['max_abs_logit_diff']:.2e}, {p['top1_agreement']:.2%} |")
    print("\n| backend | test accuracy | macro-F1 | single text p50 | p99 | batch of 64 |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['accuracy']:.2%} | {r['macro_f1']:.4f} | {r['latency_ms']['p50']:.2f} ms "
              f"| {r['latency_ms']['p99']:.2f} ms | {r['batch64_texts_per_s']:.0f} texts/s |")
    int8, static, fp32 = rows["onnx-int8"], rows["onnx-int8-static"], rows["onnx"]
    summary = {
        "int8_p50_ms": round(int8["latency_ms"]["p50"], 3),
        "int8_p99_ms": round(int8["latency_ms"]["p99"], 3),
        "int8_batch64_texts_per_s": round(int8["batch64_texts_per_s"], 1),
        "int8_accuracy_delta_points": round(100 * (int8["accuracy"] - fp32["accuracy"]), 3),
        "int8_static_p50_ms": round(static["latency_ms"]["p50"], 3),
        "int8_static_batch64_texts_per_s": round(static["batch64_texts_per_s"], 1),
        "int8_static_accuracy_delta_points": round(100 * (static["accuracy"] - fp32["accuracy"]), 3),
        "sizes_mib": {name: round(s["weights_bytes"] / 2**20, 2) for name, s in sizes.items()},
        "accuracy": {name: round(r["accuracy"], 4) for name, r in rows.items()},
    }
    print("\n" + json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
