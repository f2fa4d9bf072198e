"""lorafit against the stock Hugging Face recipe on the same machine, data, model, method and seed.

    python bench/speed.py            # full: 5 epochs, seeds 0 and 1
    python bench/speed.py --quick    # 1,500 rows, 1 epoch, one seed, LoRA only: about 5 minutes on 2 cores
    python bench/speed.py --seeds 0 --skip-full --skip-default    # the headline comparison alone, full size
    LORAFIT_DATA_DIR=/path/to/mirror python bench/speed.py --smoke    # every code path; figures mean nothing

For each seed, LoRA (rank 8, lorafit's default targets: attention + FFN in every layer, batch 32)
trains three times, each in its own process: `lorafit train configs/banking77-lora.yaml ...`, and
bench/stock_recipe.py (transformers Trainer + DataCollatorWithPadding + peft get_peft_model) on the
very rows of lorafit's run, once as written by default and once with the Trainer's length grouping
(`train_sampling_strategy="group_by_length"`, one documented flag that pads less). The speed-up
against the length-grouped stock recipe is the headline; the one against the default is printed
next to it. Full fine-tuning is compared against the length-grouped stock recipe on the first seed.
lorafit's CLI runs on jemalloc where the machine has it (src/lorafit/allocator.py; its summary.json records
the allocator); the stock recipe runs on the system's malloc as a user starts it, or with `--stock-malloc
same` on lorafit's library (LD_PRELOAD), to see how much of the gap the allocator is. Both are printed.
Printed: training examples/s and the ratios, peak memory (RSS on CPU, CUDA max allocated on GPU)
and the ratios, test accuracy and macro-F1 of all three; prediction throughput of `lorafit.load(run)
.predict` against transformers `pipeline("text-classification")` on the same trained model (its
merged export) over the test set, with a check that the predictions are identical, and against ONNX
Runtime on the run's fp32 ONNX export, four ways (plain session; ORT's transformer optimizer; each fed
input-order batches of 64 or length-sorted ones), the fastest of which is the baseline a deploying user
would pick (`predict_speedup_vs_onnxruntime`; every tool on the run's training threads); and the
roofline fraction: useful training GFLOP/s on real (non-padding) tokens over this machine's
measured float32 matmul peak. Next to the measured peak: the CPU model, its vector extensions and
the theoretical peak (cores x FLOP/cycle x clock, `lorafit.hardware.theoretical_peak_gflops`, with
its assumptions). The peak is measured on the threads the lorafit run trained with (its compute.json;
`--threads`), and the theoretical peak is that many cores', not the machine's. A measured peak above
the theoretical one is refused: the measurement (or the clock the host states) is wrong, so no
roofline fraction is built on it (set LORAFIT_CPU_MAX_GHZ where the CPU boosts above the clock the
OS states). The prediction roofline puts the prediction rates on the same scale: the useful GFLOP of
one pass over the predicted texts (real tokens, the merged model's linear layers and attention) times
texts/s, for lorafit, ONNX Runtime's best float32 path and twice that path (the issue's goal), each
as a fraction of the theoretical float32 peak. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from lorafit import hardware

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"lora": "configs/banking77-lora.yaml", "full": "configs/banking77-full.yaml"}
START = time.perf_counter()


def step(message: str) -> None:
    """Progress on stderr, with the minutes since the benchmark started."""
    print(f"[{(time.perf_counter() - START) / 60:5.1f} min] {message}", file=sys.stderr, flush=True)


def run_lorafit(method: str, out: Path, epochs: float, seed: int, limit: int | None, threads: int | None,
                dataset: str | None = None, precision: str = "fp32") -> dict:
    overrides = [f"train.epochs={epochs:g}", f"seed={seed}", "train.batch_size=32", "train.patience=null"]
    if precision != "fp32":
        overrides.append(f"train.precision={precision}")
    if dataset:
        overrides.append(f"data.name={dataset}")
    if method == "lora":
        overrides += ["method.rank=8", "method.alpha=16"]
    if limit:
        overrides.append(f"data.train_limit={limit}")
    if threads:
        overrides.append(f"train.threads={threads}")
    if not (out / "summary.json").is_file():
        subprocess.run([sys.executable, "-m", "lorafit", "train", CONFIGS[method], *overrides, "--out", str(out),
                        "--overwrite", "--quiet"], check=True, cwd=ROOT)
    s = json.loads((out / "summary.json").read_text())
    return {"tool": "lorafit", "train_examples_per_second": s["train_examples_per_second"],
            "peak_memory_mb": s["peak_memory_mb"], "test_accuracy": s["test_accuracy"], "test_macro_f1": s["test_macro_f1"],
            "train_seconds": s["train_seconds"], "trainable_params": s["trainable_params"],
            "cpu_fast_paths": s.get("cpu_fast_paths"), "allocator": s.get("allocator")}


def run_stock(method: str, lorafit_run: Path, out: Path, epochs: float, seed: int, threads: int | None,
              group_by_length: bool = False, malloc: str = "system", precision: str = "fp32") -> dict:
    """The stock recipe's figures (its own process). malloc="same": with lorafit's allocator preloaded
    (LD_PRELOAD of the library lorafit's CLI picks), to see how much of the gap the allocator is."""
    import os

    from lorafit import allocator
    from lorafit.rundir import RunDir

    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    if malloc == "same":
        library = allocator.resolve(os.environ.get("LORAFIT_MALLOC", "auto").strip() or "auto")
        if library is None:
            raise SystemExit("--stock-malloc same: lorafit runs on the system's malloc here (LORAFIT_MALLOC), nothing to preload")
        env["LD_PRELOAD"] = str(library)
        out = out.with_name(out.stem + "-malloc" + out.suffix)

    cfg = RunDir(lorafit_run).config()
    if not out.is_file():
        command = [sys.executable, str(ROOT / "bench" / "stock_recipe.py"), str(lorafit_run), "--method", method,
                   "--epochs", f"{epochs:g}", "--seed", str(seed), "--lr", str(cfg.train.lr), "--out", str(out)]
        if method == "lora":
            command += ["--rank", "8", "--alpha", "16", "--dropout", str(cfg.method.dropout)]
        if threads:
            command += ["--threads", str(threads)]
        if group_by_length:
            command.append("--group-by-length")
        if precision == "bf16":
            command.append("--bf16")
        subprocess.run(command, check=True, cwd=ROOT, env=env)
    return json.loads(out.read_text())


def matmul_peak_gflops(n: int = 2048, repeats: int = 10) -> dict[str, float]:
    """float32 GFLOP/s of an n x n x n product through PyTorch's default (MKL) and through oneDNN.

    The roofline uses the larger: on AMD CPUs MKL runs a slow path, so torch.mm alone understates
    what the machine can do (and would flatter lorafit, whose linear layers use oneDNN there).
    """
    from lorafit import kernels

    a, b = torch.randn(n, n), torch.randn(n, n)
    candidates = {"torch.mm": lambda: torch.mm(a, b)}
    if kernels.onednn_available():
        bt = b.t().contiguous()
        candidates["oneDNN"] = lambda: torch.ops.mkldnn._linear_pointwise(a, bt, None, "none", [], "")
    out = {}
    for name, f in candidates.items():
        f()
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            f()
            best = min(best, time.perf_counter() - start)
        out[name] = 2 * n**3 / best / 1e9
    return out


def _encoder_shape(cfg) -> tuple[int, int, int, int]:
    """(hidden size, FFN size, layers, in*out summed over the linear layers) of the run's base model: per
    layer the q, k, v and o projections and the FFN's in and out."""
    from transformers import AutoConfig

    from lorafit.models import resolve_model_path

    mc = AutoConfig.from_pretrained(resolve_model_path(cfg.model.name))
    h, f, layers = mc.hidden_size, mc.intermediate_size, mc.num_hidden_layers
    return h, f, layers, layers * (4 * h * h + 2 * h * f)


def _real_lengths(cfg, texts: list[str]) -> np.ndarray:
    """Tokens per text (no padding), as lorafit tokenises them."""
    from lorafit import batching
    from lorafit.models import load_tokenizer

    return np.array([len(t) for t in batching.tokenize(load_tokenizer(cfg.model), texts, cfg.data.max_length)], dtype=np.float64)


def training_gflop(run: Path) -> float:
    """Useful FLOPs of the run's training on real tokens (no padding), in GFLOP.

    Per token, each frozen linear layer costs 2*in*out forward and 2*in*out backward (the input's
    gradient); a trained weight adds 2*in*out for its own gradient; a LoRA pair adds 6*r*(in+out).
    Attention scores and their use cost 4*T*H per token and layer forward, twice that backward.
    """
    from lorafit.inference import run_split
    from lorafit.rundir import RunDir

    rundir = RunDir(run)
    cfg = rundir.config()
    summary = json.loads((run / "summary.json").read_text())
    lengths = _real_lengths(cfg, run_split(rundir, cfg, "train").texts)
    h, f, layers, linear = _encoder_shape(cfg)
    per_token = 4 * linear  # forward + input gradient
    if cfg.method.name == "full":
        per_token += 2 * linear
    else:
        r = cfg.method.rank
        per_token += 6 * r * layers * (4 * (h + h) + 2 * (h + f))
    attention = 3 * 4 * h * layers  # times T per token
    flops = (lengths * per_token + lengths**2 * attention).sum() * summary["epochs_run"]
    return flops / 1e9


def predict_gflop(run: Path, texts: list[str]) -> float:
    """Useful FLOPs of one forward pass over `texts` through the merged model, real tokens only, in GFLOP:
    2*in*out per token for each linear layer, 4*T*H per token and layer for attention (the head is
    negligible). A prediction path cannot run faster than this over the CPU's peak."""
    from lorafit.rundir import RunDir

    cfg = RunDir(run).config()
    lengths = _real_lengths(cfg, texts)
    h, _, layers, linear = _encoder_shape(cfg)
    return float((lengths * 2 * linear + lengths**2 * 4 * h * layers).sum()) / 1e9


def _timed(predict, texts: list[str], repeats: int) -> tuple[float, list]:
    """Texts per second of `predict(texts)` (best of `repeats` passes after an untimed one over the same texts)
    and its output. The untimed pass builds what a tool builds once per batch shape (oneDNN's bf16 primitives
    on AMX took several passes' worth of time here; a server meets its shapes again and again)."""
    predict(texts)
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = predict(texts)
        best = min(best, time.perf_counter() - start)
    return len(texts) / best, result


def onnxruntime_paths(run: Path, out: Path, texts: list[str], threads: int, reference: list[str], repeats: int) -> dict:
    """ONNX Runtime's CPU paths on lorafit's fp32 ONNX export of `run` (the model a deploying user runs).

    Four ways, the fastest taken as the baseline: (1) a plain InferenceSession (ORT_ENABLE_ALL, `threads`
    intra-op threads) fed by the export's tokenizer in batches of 64 in input order, padded to each
    batch's longest text, as ORT's docs and the usual serving code do; (2) the same session over ORT's
    transformer optimizer (`onnxruntime.transformers.optimizer`, model_type bert: fused attention,
    layer norm, GELU; redone every time, so it follows the export); (3) `lorafit.load(export)`: the plain session fed length-sorted batches (how
    lorafit serves an ONNX export: at most 64 rows and the run's token budget per batch); (4) the optimized graph fed those batches. The baseline
    is the fastest of those whose top-1 labels agree with `reference` (lorafit's float32 ones) on at least
    99.5% of the texts: a fast path that computed something else would not be a baseline. Also ORT's
    reduced-precision path: lorafit's dynamic int8 ONNX export (ORT's quantize_dynamic) fed length-sorted batches.
    """
    from transformers import AutoTokenizer

    import lorafit
    from lorafit.export import export
    from lorafit.inference import OnnxBackend, batched_logits
    from lorafit.rundir import RunDir

    folder = out / "onnx"
    if not (folder / "export.json").is_file():
        export(run, "onnx", folder, overwrite=True)
    fused = out / "onnx-ort-optimized.onnx"
    from onnxruntime.transformers import optimizer

    optimized = optimizer.optimize_model(str(folder / "model.onnx"), model_type="bert", num_heads=0, hidden_size=0,
                                         opt_level=1)  # 0 = read heads and width from the graph
    optimized.save_model_to_file(str(fused))
    fusions = {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}
    tokenizer = AutoTokenizer.from_pretrained(folder)
    max_length = RunDir(run).config().data.max_length
    labels = json.loads((folder / "labels.json").read_text())

    # lorafit's ONNX Runtime session (OnnxBackend): ORT_ENABLE_ALL, `threads` intra-op threads, CPU provider
    plain_backend, fused_backend = OnnxBackend(folder / "model.onnx", threads), OnnxBackend(fused, threads)

    def input_order(backend):
        def predict(batch_texts: list[str]) -> list[str]:
            top = []
            for i in range(0, len(batch_texts), 64):
                enc = tokenizer(batch_texts[i:i + 64], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
                top += [labels[j] for j in backend(enc["input_ids"], enc["attention_mask"]).argmax(-1)]
            return top
        return predict

    rows = {}
    step("prediction: ONNX Runtime ...")
    rows["ort_plain"] = _timed(input_order(plain_backend), texts, repeats)
    rows["ort_transformer_optimizer"] = _timed(input_order(fused_backend), texts, repeats)
    exported = lorafit.load(folder, device="cpu", threads=threads)
    rows["ort_length_sorted"] = _timed(lambda t: [p[0][0] for p in exported.predict(t, top_k=1)], texts, repeats)

    def fused_sorted(batch_texts: list[str]) -> list[str]:
        logits = batched_logits(fused_backend, exported.tokenize(batch_texts), exported.pad_id, exported.batch_size,
                                exported.max_tokens)
        return [labels[j] for j in logits.argmax(-1)]

    rows["ort_transformer_optimizer_length_sorted"] = _timed(fused_sorted, texts, repeats)
    agree = {k: sum(a == b for a, b in zip(v[1], reference)) for k, v in rows.items()}
    faithful = [k for k in rows if agree[k] >= 0.995 * len(texts)] or list(rows)
    best = max(faithful, key=lambda k: rows[k][0])
    # ORT's reduced-precision path, the fair match for lorafit in bf16: dynamic int8, length-sorted batches.
    # Exported whatever its agreement (a --quick model is barely trained); the agreement is printed.
    int8 = out / "onnx-int8"
    if not (int8 / "export.json").is_file():
        export(run, "onnx", int8, quantize="int8", overwrite=True, min_agreement=0.0, max_accuracy_drop=1.0)
    quantized = lorafit.load(int8, device="cpu", threads=threads)
    int8_row = _timed(lambda t: [p[0][0] for p in quantized.predict(t, top_k=1)], texts, repeats)
    return {"per_s": {k: v[0] for k, v in rows.items()}, "identical": agree, "best": best, "fusions": fusions,
            "int8_per_s": int8_row[0], "int8_identical": sum(a == b for a, b in zip(int8_row[1], reference))}


def predict_comparison(run: Path, out: Path, limit: int | None, threads: int, repeats: int) -> dict:
    """lorafit predict vs transformers pipeline and ONNX Runtime on the same trained model, over the test set;
    every tool warmed up by one untimed pass over the texts, then timed as the best of `repeats` passes."""
    import lorafit
    from transformers import pipeline

    from lorafit.export import export
    from lorafit.inference import run_split
    from lorafit.rundir import RunDir

    torch.set_num_threads(threads)
    rundir = RunDir(run)
    test = run_split(rundir, rundir.config(), "test")
    texts = test.texts[:limit] if limit else test.texts
    merged = out / "merged"
    if not (merged / "export.json").is_file():
        export(run, "merged", merged, overwrite=True)
    step("prediction: transformers pipeline ...")
    classify = pipeline("text-classification", model=str(merged), trust_remote_code=True, device="cpu")
    stock_per_s, stock = _timed(lambda t: [r["label"] for r in classify(t)], texts, repeats)  # default: one text at a time
    stock_batched_per_s, stock_batched = _timed(lambda t: [r["label"] for r in classify(t, batch_size=64)], texts, repeats)
    step("prediction: lorafit ...")
    clf = lorafit.load(run, device="cpu", threads=threads, precision="fp32")  # a bf16-trained run predicts in bf16 by default
    ours_per_s, ours = _timed(lambda t: [p[0][0] for p in clf.predict(t, top_k=1)], texts, repeats)
    same = sum(s == o for s, o in zip(stock, ours))
    same_batched = sum(s == o for s, o in zip(stock_batched, ours))
    bf16 = {}
    if hardware.native_bf16():  # emulated bf16 is slower than float32: not measured there
        step("prediction: lorafit in bf16 ...")
        half = lorafit.load(run, device="cpu", threads=threads, precision="bf16")
        bf16_per_s, bf16_top = _timed(lambda t: [p[0][0] for p in half.predict(t, top_k=1)], texts, repeats)
        bf16 = {"per_s": bf16_per_s, "identical": sum(a == b for a, b in zip(bf16_top, ours))}
    ort = onnxruntime_paths(run, out, texts, threads, ours, repeats)
    return {"texts": len(texts), "gflop": predict_gflop(run, texts), "threads": threads, "repeats": repeats,
            "pipeline_per_s": stock_per_s,
            "pipeline_batch64_per_s": stock_batched_per_s, "lorafit_per_s": ours_per_s,
            "identical": same, "identical_batched": same_batched,
            "onnxruntime_per_s": ort["per_s"], "onnxruntime_best": ort["best"], "identical_onnxruntime": ort["identical"],
            "onnxruntime_fusions": ort["fusions"], "lorafit_bf16": bf16, "onnxruntime_int8_per_s": ort["int8_per_s"],
            "identical_onnxruntime_int8": ort["int8_identical"]}


def _round(value: float | None) -> float | None:
    """value to 3 decimals; None (a comparison not made) stays None."""
    return None if value is None else round(value, 3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="1,500 training rows, 1 epoch, seed 0, LoRA only (no full fine-tuning), 1,000 test texts for predict")
    parser.add_argument("--smoke", action="store_true",
                        help="every code path in a minute or two, figures meaningless: TREC-6 (500 test rows), 300 training "
                             "rows, 1 epoch, seed 0, 100 texts for predict")
    parser.add_argument("--epochs", type=float, default=5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--threads", type=int, help="torch threads for all tools (default: all cores)")
    parser.add_argument("--skip-full", action="store_true", help="skip the full fine-tuning comparison")
    parser.add_argument("--skip-default", action="store_true",
                        help="skip the stock recipe as written by default (no length grouping; the slowest run of all, "
                             "about 40 minutes of the full bench on 2 cores): only the headline comparison, against the "
                             "length-grouped stock recipe, is made")
    parser.add_argument("--stock-malloc", choices=["system", "same"], default="system",
                        help="the stock recipe's allocator: the system's malloc, as a user runs it (default), or the one "
                             "lorafit's CLI preloads (jemalloc where installed; src/lorafit/allocator.py)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="what both tools train in: float32 (default), or bf16 mixed precision for both (lorafit "
                             "train.precision=bf16, the stock Trainer's bf16=True); for CPUs with native bf16")
    parser.add_argument("--out", default="runs/speed", help="run folders and results (finished runs are reused)")
    args = parser.parse_args()
    dataset = None
    if args.smoke:
        mode, limit, epochs, seeds, predict_limit, dataset = "smoke", 300, 1, [0], 100, "trec6"
    elif args.quick:
        mode, limit, epochs, seeds, predict_limit = "quick", 1500, 1, [0], 1000
    else:
        mode, limit, epochs, seeds, predict_limit = "full", None, args.epochs, args.seeds, None
    out = ROOT / args.out / (mode if args.precision == "fp32" else f"{mode}-{args.precision}")
    bf16 = args.precision == "bf16"
    out.mkdir(parents=True, exist_ok=True)

    triples = []  # (lorafit, stock as written, stock with length grouping) per seed
    for seed in seeds:
        run = out / f"lorafit-lora-s{seed}"
        step(f"seed {seed}: lorafit LoRA ...")
        ours = run_lorafit("lora", run, epochs, seed, limit, args.threads, dataset, args.precision)
        stock = None
        if not args.skip_default:
            step(f"seed {seed}: stock LoRA ...")
            stock = run_stock("lora", run, out / f"stock-lora-s{seed}.json", epochs, seed, args.threads, malloc=args.stock_malloc,
                              precision=args.precision)
        step(f"seed {seed}: stock LoRA, group_by_length ...")
        grouped = run_stock("lora", run, out / f"stock-grouped-lora-s{seed}.json", epochs, seed, args.threads, group_by_length=True,
                            malloc=args.stock_malloc, precision=args.precision)
        triples.append((ours, stock, grouped))
    full = None
    if not (args.skip_full or args.quick):
        run = out / f"lorafit-full-s{seeds[0]}"
        step("full fine-tuning: lorafit, then stock with group_by_length ...")
        full = (run_lorafit("full", run, epochs, seeds[0], limit, args.threads, dataset, args.precision),
                run_stock("full", run, out / f"stock-grouped-full-s{seeds[0]}.json", epochs, seeds[0], args.threads,
                          group_by_length=True, malloc=args.stock_malloc, precision=args.precision))
    # The roofline compares the run's training with the matmul peak of the same threads, bounded by as
    # many cores: with --threads 1 on 16 cores, 16 cores' peak would let a wrong measurement through.
    # Prediction runs on those threads too, for every tool.
    from lorafit.rundir import RunDir

    threads = RunDir(out / f"lorafit-lora-s{seeds[0]}").compute().threads
    step("prediction throughput ...")
    predict = predict_comparison(out / f"lorafit-lora-s{seeds[0]}", out, predict_limit, threads, 2 if mode == "full" else 1)
    torch.set_num_threads(threads)
    info = hardware.cpu_info()
    theoretical = hardware.theoretical_peak_gflops(info, threads=threads)
    peaks = matmul_peak_gflops()
    peak = max(peaks.values())
    refused = hardware.check_measured_peak(peak, theoretical)
    gflop = training_gflop(out / f"lorafit-lora-s{seeds[0]}")
    achieved = gflop / triples[0][0]["train_seconds"]
    fraction = None if refused else achieved / peak
    of_theoretical = achieved / theoretical["gflops"] if theoretical["gflops"] else None

    mean = lambda rows, key: statistics.fmean(r[key] for r in rows)  # noqa: E731
    ours_rows, stock_rows, grouped_rows = ([t[i] for t in triples] for i in range(3))
    ratio = lambda key, baseline: mean(ours_rows, key) / mean(baseline, key)  # noqa: E731
    delta = lambda baseline: 100 * (mean(ours_rows, "test_accuracy") - mean(baseline, "test_accuracy"))  # noqa: E731
    speedup_grouped, memory_grouped = ratio("train_examples_per_second", grouped_rows), ratio("peak_memory_mb", grouped_rows)
    skipped = args.skip_default  # no run without length grouping: nothing against it (None in the JSON)
    speedup_default = memory_default = delta_default = None
    if not skipped:
        speedup_default, memory_default = ratio("train_examples_per_second", stock_rows), ratio("peak_memory_mb", stock_rows)
        delta_default = delta(stock_rows)
    print(f"\nLoRA r=8 on attention+FFN, batch 32, {epochs:g} epoch(s), {len(seeds)} seed(s), {mode}, {args.precision}"
          f"{' (TREC-6)' if dataset else ''}; torch threads {args.threads or torch.get_num_threads()}\n")
    print("| seed | tool | train examples/s | peak memory | test accuracy | test macro-F1 |")
    print("|---|---|---:|---:|---:|---:|")
    for seed, rows in zip(seeds, triples):
        for r in filter(None, rows):
            print(f"| {seed} | {r['tool']} | {r['train_examples_per_second']:.1f} | {r['peak_memory_mb']:,.0f} MB "
                  f"| {100 * r['test_accuracy']:.2f}% | {100 * r['test_macro_f1']:.2f} |")
    print(f"\nlorafit CPU fast paths (layers switched): {triples[0][0]['cpu_fast_paths']}")
    print(f"allocators (summary.json / the stock run's record): lorafit {triples[0][0]['allocator'] or 'not recorded'}, "
          f"stock {'not run' if skipped else triples[0][1].get('allocator', 'not recorded')}, stock grouped {triples[0][2].get('allocator', 'not recorded')}"
          + ("" if args.stock_malloc == "same" else " (--stock-malloc same gives the stock recipe lorafit's)"))
    print(f"training speed-up against the stock recipe with length grouping (the headline): {speedup_grouped:.2f}x; "
          f"peak memory ratio {memory_grouped:.2f}x; accuracy lorafit - stock {delta(grouped_rows):+.2f} points")
    if skipped:
        print("against the stock recipe as written by default (no length grouping): not run (--skip-default)")
    else:
        print(f"against the stock recipe as written by default (no length grouping): {speedup_default:.2f}x; "
              f"peak memory ratio {memory_default:.2f}x; accuracy {delta_default:+.2f} points")
    if full:
        print(f"full fine-tuning: lorafit {full[0]['train_examples_per_second']:.1f} vs stock with length grouping "
              f"{full[1]['train_examples_per_second']:.1f} examples/s ({full[0]['train_examples_per_second'] / full[1]['train_examples_per_second']:.2f}x); "
              f"accuracy {100 * full[0]['test_accuracy']:.2f}% vs {100 * full[1]['test_accuracy']:.2f}%; "
              f"memory {full[0]['peak_memory_mb']:,.0f} vs {full[1]['peak_memory_mb']:,.0f} MB")
    print(f"predict over {predict['texts']} test texts: lorafit {predict['lorafit_per_s']:.0f}/s, pipeline {predict['pipeline_per_s']:.0f}/s "
          f"({predict['lorafit_per_s'] / predict['pipeline_per_s']:.2f}x), pipeline batch_size=64 {predict['pipeline_batch64_per_s']:.0f}/s "
          f"({predict['lorafit_per_s'] / predict['pipeline_batch64_per_s']:.2f}x); identical top-1: {predict['identical']}/{predict['texts']} "
          f"(batched {predict['identical_batched']}/{predict['texts']})")
    ort_best = predict["onnxruntime_per_s"][predict["onnxruntime_best"]]
    print(f"ONNX Runtime on lorafit's fp32 ONNX export, {predict['threads']} intra-op thread(s): "
          + ", ".join(f"{k} {v:.0f}/s (identical top-1 {predict['identical_onnxruntime'][k]}/{predict['texts']})"
                      for k, v in predict["onnxruntime_per_s"].items())
          + f"; best (of those agreeing with lorafit on >= 99.5% of top-1) {predict['onnxruntime_best']}: lorafit (PyTorch) {predict['lorafit_per_s']:.0f}/s is "
          f"{predict['lorafit_per_s'] / ort_best:.2f}x it")
    n = predict["texts"]
    if predict["lorafit_bf16"]:
        half = predict["lorafit_bf16"]
        print(f"reduced precision: lorafit bf16 {half['per_s']:.0f}/s (top-1 as float32 on {half['identical']}/{n}) vs ONNX "
              f"Runtime dynamic int8, length-sorted {predict['onnxruntime_int8_per_s']:.0f}/s (top-1 as float32 on "
              f"{predict['identical_onnxruntime_int8']}/{n}): {half['per_s'] / predict['onnxruntime_int8_per_s']:.2f}x; "
              f"lorafit bf16 vs ORT's best float32 path {half['per_s'] / ort_best:.2f}x")
    else:
        print(f"reduced precision: no native bf16 on this CPU, lorafit bf16 not measured; ONNX Runtime dynamic int8 "
              f"{predict['onnxruntime_int8_per_s']:.0f}/s (top-1 as float32 on {predict['identical_onnxruntime_int8']}/{n})")
    if predict["onnxruntime_fusions"]:
        print(f"  ORT transformer optimizer fusions: {predict['onnxruntime_fusions']}")
    # Prediction's own roofline: what 2x ONNX Runtime's best float32 path would have to compute per second.
    predict_rates = {"lorafit": predict["lorafit_per_s"], "onnxruntime_best": ort_best, "2x onnxruntime_best": 2 * ort_best}
    if predict["lorafit_bf16"]:
        predict_rates["lorafit_bf16"] = predict["lorafit_bf16"]["per_s"]  # on the float32 scale (native bf16 peaks higher)
    predict_gflops = {k: predict["gflop"] * v / n for k, v in predict_rates.items()}
    if theoretical["gflops"]:
        print(f"prediction roofline: {predict['gflop']:.0f} useful GFLOP per pass over the {n} texts; "
              + ", ".join(f"{k} {g:.0f} GFLOP/s ({g / theoretical['gflops']:.2f} of the theoretical float32 peak)"
                          for k, g in predict_gflops.items()))
    print(f"CPU: {info['model']} ({info['vendor']} family {info['family']} model {info['model_id']}), "
          f"{info['cores']} usable cores, torch threads {torch.get_num_threads()}; vector extensions: {' '.join(info['flags'])}")
    print(f"theoretical float32 peak ({theoretical['microarchitecture']}): {theoretical['formula']}")
    for assumption in theoretical["assumptions"]:
        print(f"  assumed: {assumption}")
    print(f"measured float32 matmul peak on {threads} thread(s): {peak:.1f} GFLOP/s (best of 10 2048-cube products: "
          + ", ".join(f"{k} {v:.1f}" for k, v in peaks.items()) + ")")
    if refused:
        print(f"REFUSED: {refused}. No roofline fraction is computed against the measured peak.")
    print(f"roofline: {gflop:,.0f} useful GFLOP in {triples[0][0]['train_seconds']:.0f} s = {achieved:.1f} GFLOP/s; "
          + (f"fraction of the measured peak {fraction:.2f}" if fraction is not None else "fraction of the measured peak: refused")
          + (f"; of the theoretical peak {of_theoretical:.2f}" if of_theoretical is not None else ""))
    if bf16:
        print("  (both tools trained in bf16 mixed precision: the peaks above are float32's; native bf16 products can run "
              "above them, so these fractions are on the float32 scale)")
    summary = {
        "train_speedup_vs_grouped": round(speedup_grouped, 3), "train_speedup_vs_default": _round(speedup_default),
        "memory_ratio_vs_grouped": round(memory_grouped, 3), "memory_ratio_vs_default": _round(memory_default),
        "accuracy_delta_vs_grouped": round(delta(grouped_rows), 3), "accuracy_delta_vs_default": _round(delta_default),
        "stock_grouped_sampler": triples[0][2].get("sampler"),
        "predict_speedup": round(predict["lorafit_per_s"] / predict["pipeline_per_s"], 3),
        "predict_speedup_vs_batched_pipeline": round(predict["lorafit_per_s"] / predict["pipeline_batch64_per_s"], 3),
        "predict_speedup_vs_onnxruntime": round(predict["lorafit_per_s"] / ort_best, 3),
        "onnxruntime_best_path": predict["onnxruntime_best"],
        "predict_bf16_speedup_vs_onnxruntime_int8": (round(predict["lorafit_bf16"]["per_s"] / predict["onnxruntime_int8_per_s"], 3)
                                                     if predict["lorafit_bf16"] else None),
        "predict_bf16_speedup_vs_onnxruntime": (round(predict["lorafit_bf16"]["per_s"] / ort_best, 3)
                                                if predict["lorafit_bf16"] else None),
        "predict_bf16_top1_agreement": (round(predict["lorafit_bf16"]["identical"] / predict["texts"], 4)
                                        if predict["lorafit_bf16"] else None),
        "predict_threads": predict["threads"],
        "predict_gflop": round(predict["gflop"], 1),
        "predict_gflops": {k: round(v, 1) for k, v in predict_gflops.items()},
        "predict_2x_onnxruntime_fraction_of_theoretical": (
            round(predict_gflops["2x onnxruntime_best"] / theoretical["gflops"], 3) if theoretical["gflops"] else None),
        "predictions_identical": predict["identical"] == predict["texts"],
        "roofline_fraction": round(fraction, 3) if fraction is not None else None,
        "roofline_fraction_of_theoretical": round(of_theoretical, 3) if of_theoretical is not None else None,
        "achieved_gflops": round(achieved, 1), "measured_peak_gflops": round(peak, 1),
        "measured_peak_refused": refused is not None,
        "theoretical_peak_gflops": round(theoretical["gflops"], 1) if theoretical["gflops"] else None,
        "theoretical_peak_formula": theoretical["formula"], "peak_threads": threads,
        "lorafit_allocator": triples[0][0]["allocator"], "stock_allocator": triples[0][2].get("allocator"),
        "cpu_model": info["model"], "cpu_flags": info["flags"], "cpu_cores": info["cores"],
        "full_train_speedup_vs_grouped": (round(full[0]["train_examples_per_second"] / full[1]["train_examples_per_second"], 3)
                                          if full else None),
        "seeds": seeds, "epochs": epochs, "mode": mode, "quick": args.quick, "precision": args.precision,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
