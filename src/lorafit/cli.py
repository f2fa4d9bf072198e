"""Thin verbs: parse, call the library, print. A user error is one line on stderr and exit status 2.
Just over 400 lines: one parser holds every verb's flags, so `--help` and the code list them in one place."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .errors import UserError

__all__ = ["main"]


def _split_config_and_overrides(items: list[str]) -> tuple[str | None, list[str]]:
    """`[CONFIG.yaml] [key=value ...]`: the first item without '=' is the config file."""
    config = None
    overrides = []
    for item in items:
        if "=" not in item and config is None and not overrides:
            config = item
        elif "=" not in item:
            raise UserError(f"unexpected argument {item!r}: overrides are written key=value (e.g. train.lr=3e-4)")
        else:
            overrides.append(item)
    return config, overrides


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        import datasets

        datasets.utils.logging.set_verbosity_error()
    except ImportError:
        pass


def _add_precision(p: argparse.ArgumentParser, cuda: bool = True) -> None:
    """--precision; `cuda=False` for the server, which computes on CPU."""
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", *(["fp16"] if cuda else [])],
                   help="arithmetic of a PyTorch model: auto = float32 on CPU" + (", the run's train.precision on CUDA" if cuda else "")
                        + "; bf16 is faster on CPUs with native bf16 (AVX-512 BF16, AMX), with scores a little off float32's"
                        + ("; fp16 on CUDA only" if cuda else ""))


# -- verbs --------------------------------------------------------------------------------------

def cmd_train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .train import resume, train, train_final

    if args.resume:
        if args.items or args.out or args.data or args.final:
            raise UserError("--resume takes only the run folder: its config.yaml holds the settings")
        result = resume(args.resume)
        if result.summary:
            print(f"run saved to {result.path}")
        return 0
    if args.final_epochs is not None and not args.final:
        raise UserError("--final-epochs goes with --final RUN")
    if args.final:
        if args.items or args.data:
            raise UserError("--final takes the finished run and --out: the run's config.yaml holds the settings")
        if not args.out:
            raise UserError("--out RUN_DIR is required: the final model is a run folder of its own")
        result = train_final(args.final, args.out, overwrite=args.overwrite, progress=False if args.quiet else None,
                             epochs=args.final_epochs or "best")
        if result.summary:
            print(f"run saved to {result.path}")
        return 0
    if not args.out:
        raise UserError("--out RUN_DIR is required (or --resume RUN_DIR)")
    config, overrides = _split_config_and_overrides(args.items)
    if args.data is not None:
        if any(item.startswith("data.name=") for item in overrides):
            raise UserError("--data and data.name= both name the dataset; give one")
        overrides = [f"data.name={args.data}", *overrides]
    cfg = load_config(config, overrides)
    if args.quiet:
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"progress": False})})
    result = train(cfg, args.out, overwrite=args.overwrite)
    if result.summary:  # data-parallel: only rank 0 wrote the run
        print(f"run saved to {result.path}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .inference import check_probability, load

    if args.file:
        path = Path(args.file)
        try:
            found = path.is_file()
        except OSError as e:  # a name too long for the file system, say
            raise UserError(f"--file {str(path)[:80]!r}: {e.strerror or e}") from None
        if not found:
            raise UserError(f"--file {path} not found")
        try:
            content = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"--file {path} is not valid UTF-8 (byte {e.start}); re-save it as UTF-8") from None
        except OSError as e:
            raise UserError(f"--file {path}: cannot read: {e.strerror or e}") from None
        texts = [line.rstrip("\n") for line in content.splitlines() if line.strip()]
        if not texts:
            raise UserError(f"--file {path} holds no text (one text per line)")
    else:
        texts = args.texts
    if not texts:
        raise UserError("give texts to classify, or --file with one text per line")
    for i, text in enumerate(texts, start=1):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # bytes that were not UTF-8 reach argv as lone surrogates
            raise UserError(f"text {i} is not valid UTF-8: {text[:40]!r}; pass texts in UTF-8") from None
    if args.top_k < 1:
        raise UserError("--top-k must be at least 1")
    check_probability(args.threshold, "--threshold")
    classifier = load(args.run_dir, device=args.device, threshold=args.threshold, precision=args.precision)
    oos = classifier.oos
    results, scores, outside = classifier.classify(texts, top_k=args.top_k)
    for text, preds, score, out in zip(texts, results, scores, outside):
        if args.file or args.json:
            print(json.dumps({"text": text, "out_of_scope": bool(out), "in_scope_score": round(float(score), 6),
                              "predictions": [{"label": l, "probability": round(p, 6)} for l, p in preds]}, ensure_ascii=False))
            continue
        if len(texts) > 1 or out:
            print(text + (f"  -> out of scope ({oos.score} {score:.4f} under {oos.threshold:.4f})" if out else ""))
        for label, prob in preds:
            print(f"  {prob:7.2%}  {label}")
    return 0


def _refit(args: argparse.Namespace) -> int:
    """eval --refit: the post-hoc stage again (lorafit.posthoc.refit), then the OOS table it wrote."""
    from .config import parse_overrides
    from .posthoc import refit

    settings = parse_overrides([f"ood.{item.removeprefix('ood.')}" for item in args.ood or []]).get("ood", {})
    evaluated = refit(args.run_dir, settings)
    calibration = evaluated.get("calibration") or {}
    if calibration:
        print(f"test ECE {calibration['ece_before']:.4f} -> {calibration['ece_after']:.4f} after the temperature")
    table = (evaluated.get("ood") or {}).get("scores") or {}
    for kind, row in table.items():
        print(f"{kind:12s} AUROC {row['auroc']:.4f}  FPR@95 {row['fpr_at_95_recall']:.4f}  open macro-F1 {row['open_macro_f1']:.4f}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from . import data
    from .inference import load, run_split
    from . import atomic
    from .rundir import RunDir

    if args.refit:
        if args.precision != "auto":
            raise UserError("--precision is for evaluating; --refit fits in the run's own precision")
        return _refit(args)
    run = RunDir(args.run_dir)
    cfg = run.config()
    if args.data:
        try:
            other = Path(args.data).expanduser()
        except RuntimeError:  # "~user/..." for an unknown user
            other = Path(args.data)
        data_cfg = cfg.data.model_copy(update={
            "name": args.data, "train_limit": None,
            "text_column": args.text_column or cfg.data.text_column,
            "label_column": args.label_column or cfg.data.label_column,
        })
        try:
            is_file = other.is_file()
        except OSError:  # a name too long, say: data.load says so
            is_file = False
        if is_file:
            split, _ = data.read_split(other, data_cfg.text_column, data_cfg.label_column)
        else:
            dataset, _ = data.load(data_cfg, cfg.seed)
            split = dataset.splits[args.split]
        source = f"{args.data} ({args.split})" if not is_file else str(other)
    else:
        split = run_split(run, cfg, args.split)
        source = f"{cfg.data.name} ({args.split})"
    classifier = load(args.run_dir, device=args.device, precision=args.precision)
    result = {"split": args.split, "data": source, "precision": classifier.precision,
              **classifier.evaluate(split.texts, split.labels)}
    print(f"{source}: accuracy {result['accuracy']:.4f}  macro-F1 {result['macro_f1']:.4f}  "
          f"weighted-F1 {result['weighted_f1']:.4f}  loss {result['loss']:.4f}  ({result['examples']} examples)")
    if result["top_confusions"]:
        print("most confused (true -> predicted: count):")
        for c in result["top_confusions"][:10]:
            print(f"  {c['true']} -> {c['predicted']}: {c['count']}")
    if args.output:
        atomic.write_text(Path(args.output), json.dumps(result, indent=2) + "\n")
        print(f"metrics written to {args.output}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import describe, export

    meta = export(args.run_dir, args.format, args.out, quantize=args.quantize, overwrite=args.overwrite, split=args.split,
                  min_agreement=args.min_agreement, max_accuracy_drop=args.max_accuracy_drop)
    print(describe(meta))
    print(f"written to {args.out}")
    return 0


def cmd_soup(args: argparse.Namespace) -> int:
    from .soup import soup

    meta = soup(args.runs, args.out, overwrite=args.overwrite, adapter=args.adapter)
    calibrated = meta["calibration"]
    print(f"soup of {len(meta['soup']['runs'])} runs ({meta['soup']['form']}), {meta['format']} format, "
          f"{meta['bytes'] / 2**20:.1f} MB, written to {args.out}")
    if isinstance(calibrated, dict):
        print(f"validation ({calibrated['examples']} examples, held out by every run): accuracy "
              f"{calibrated['accuracy']:.4f}, temperature {calibrated['temperature']:.3f}")
    else:
        print(f"calibration {calibrated}")
    return 0


def cmd_card(args: argparse.Namespace) -> int:
    from .modelcard import write

    print(f"model card written: {write(args.folder)}")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from .push import push

    pushed = push(args.folder, args.repo_id, private=args.private, token=args.token)
    print(f"pushed {pushed['files']} files of {args.folder} to {args.repo_id}: {pushed['commit_url']}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from .serve import Limits, check_can_listen, create_app, parse_adapter_spec, run
    except ImportError as e:
        raise UserError(f"the server needs its extra ({e.name} is missing): pip install 'lorafit[serve]'") from None

    if not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port}: a port is 0..65535")
    if args.threads is not None and args.threads < 1:
        raise UserError("--threads must be at least 1")
    check_can_listen(args.host, args.port)  # before loading any model
    thresholds = {}
    for item in args.threshold or []:
        name, _, value = item.partition("=")
        try:
            thresholds[name] = float(value)
        except ValueError:
            raise UserError(f"--threshold {item!r}: write NAME=PROBABILITY, e.g. banking=0.5") from None
    adapters = [parse_adapter_spec(spec) for spec in args.paths]
    unknown = set(thresholds) - {name for name, _ in adapters}
    if unknown:
        raise UserError(f"--threshold names {', '.join(sorted(unknown))}, which is not served")
    limits = Limits(max_texts=args.max_texts, max_chars=args.max_chars, max_body_bytes=args.max_body_bytes,
                    max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queued=args.max_queued)
    app = create_app([(name, path, thresholds.get(name)) for name, path in adapters], limits,
                     api_key=args.api_key, adapter_root=args.adapter_root, threads=args.threads, precision=args.precision)
    print(f"serving {', '.join(name for name, _ in adapters)} on http://{args.host}:{args.port}", flush=True)
    run(app, args.host, args.port)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from .sweep import run_sweep

    if args.workers < 1:
        raise UserError("--workers must be at least 1")
    results = run_sweep(args.sweep_file, args.out, workers=args.workers, executor=args.executor,
                        report=lambda line: print(line, flush=True))
    failed = [r["name"] for r in results if r["outcome"].startswith("failed")]
    print(f"{len(results) - len(failed)} of {len(results)} trials finished in {args.out}"
          + (f"; failed: {', '.join(failed)} (logs in {args.out}/logs; run the sweep again to redo them)" if failed else ""))
    return 1 if failed else 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import collect, compare, to_markdown, write

    result = compare(collect(args.paths))
    print(to_markdown(result))
    single_sweep = len(args.paths) == 1 and (Path(args.paths[0]) / "sweep.json").is_file()
    folder = Path(args.out) if args.out else Path(args.paths[0]) if single_sweep else Path("compare")
    written = write(result, folder)
    print("written: " + ", ".join(str(p) for p in written))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import report

    html_path, md_path = report(args.paths, args.out)
    print(f"report written: {html_path} (self-contained) and {md_path}")
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    from .config import dump, load_config

    config, overrides = _split_config_and_overrides(args.items)
    print(dump(load_config(config, overrides)), end="")
    return 0


def cmd_config_keys(args: argparse.Namespace) -> int:
    from .config import describe_keys

    for key, default, text in describe_keys():
        print(f"{key} = {default}\n    {text}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .config import load_config
    from .inspection import format_inspection, inspect_config

    items = list(args.items)
    config = None
    if items and "=" not in items[0]:
        first = items.pop(0)
        if first.endswith((".yaml", ".yml")):
            config = first
        else:  # a model name or path
            items.insert(0, f"model.name={first}")
    cfg = load_config(config, items)
    print(format_inspection(inspect_config(cfg, num_labels=args.num_labels)))
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from .methods import registry

    for method in registry.all_methods():
        paragraph = " ".join((sys.modules[method.__module__].__doc__ or "").strip().split("\n\n")[0].split())
        head = f"{method.default_head_lr:g}" if method.default_head_lr else "lr"
        print(f"{method.name:12} lr {method.default_lr:<6g} head {head:<6} {paragraph}")
    return 0


# -- parser -------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorafit", description="Fine-tune encoders for text classification.")
    verbs = parser.add_subparsers(dest="verb", required=True)

    p = verbs.add_parser("train", help="train a model; writes a run folder")
    p.add_argument("items", nargs="*", metavar="[CONFIG.yaml] [key=value ...]",
                   help="a YAML config and/or dotted overrides (see `lorafit config keys`)")
    p.add_argument("--out", help="run folder to create")
    p.add_argument("--data", metavar="NAME_OR_PATH", help="the dataset (data.name): a built-in name (banking77, emotion, "
                   "snips, trec6), a CSV/JSONL/Parquet file, a folder of split files or hf:<hub id>; without a config "
                   "file the defaults pick the rest (README: One recipe for every dataset)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped or killed run from its last checkpoint")
    p.add_argument("--final", metavar="RUN_DIR", help="the final model of a finished run: its recipe trained again on "
                   "train + validation for its best epoch count, with the temperature and threshold its validation chose")
    p.add_argument("--final-epochs", choices=["best", "recipe"],
                   help="with --final: train the run's best epoch count (default) or its whole train.epochs")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)

    p = verbs.add_parser("predict", help="top-k labels for texts, from a run folder or an export")
    p.add_argument("run_dir")
    p.add_argument("texts", nargs="*")
    p.add_argument("--file", help="one text per line; prints JSON lines")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--json", action="store_true", help="JSON lines output")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--threshold", type=float, help="out of scope below this top probability; default: the run's own "
                   "score and threshold (ood.score, chosen on validation: ood.json)")
    _add_precision(p)
    p.set_defaults(func=cmd_predict)

    p = verbs.add_parser("eval", help="re-evaluate a saved run")
    p.add_argument("run_dir")
    p.add_argument("--split", default="test", choices=["test", "validation"])
    p.add_argument("--data", help="another dataset (built-in name, file, folder or hf:<id>)")
    p.add_argument("--text-column")
    p.add_argument("--label-column")
    p.add_argument("--output", help="also write the metrics as JSON here")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--refit", action="store_true",
                   help="fit the temperature and out-of-scope scores of the finished run again with this version "
                        "(rewrites ood.json and eval.json's calibration and ood sections; weights untouched)")
    p.add_argument("--ood", action="append", metavar="KEY=VALUE", help="with --refit: an ood.* setting to use "
                   "instead of the run's (e.g. k=1); config.yaml records it")
    _add_precision(p)
    p.set_defaults(func=cmd_eval)

    p = verbs.add_parser("export", help="merged model, adapter or ONNX (int8) from a run, with a parity check")
    p.add_argument("run_dir")
    p.add_argument("--format", required=True, choices=["merged", "adapter", "onnx"])
    p.add_argument("--quantize", choices=["int8", "int8-static"],
                   help="with --format onnx: int8, ONNX Runtime dynamic quantisation (activations scaled per batch at "
                   "run time, so scores move a little with batch-mates); int8-static, activation scales fixed at "
                   "export, calibrated on 256 of the run's training texts (QDQ), so a text scores the same in any batch")
    p.add_argument("--out", required=True, help="folder to create")
    p.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    p.add_argument("--split", default="validation", choices=["validation", "test"], help="split for the parity check")
    p.add_argument("--min-agreement", type=float, metavar="FRACTION",
                   help="int8 only: the least top-1 agreement with the trained model the parity check accepts "
                   "(default 0.97); recorded in export.json as set by the user")
    p.add_argument("--max-accuracy-drop", type=float, metavar="FRACTION",
                   help="int8 only: the largest accuracy drop the parity check accepts, as a fraction "
                   "(default 0.01, one point); recorded in export.json as set by the user")
    p.set_defaults(func=cmd_export)

    p = verbs.add_parser("soup", help="one model from several finished runs (seeds of a config): their merged weights "
                         "averaged; predicts at one run's cost")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", required=True, help="folder to create (merged export format)")
    p.add_argument("--adapter", action="store_true", help="plain LoRA runs: write the same average as one LoRA adapter "
                   "(rank: the runs' ranks summed) instead of merged weights")
    p.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    p.set_defaults(func=cmd_soup)

    p = verbs.add_parser("card", help="(re)write the model card (README.md) of a run folder or export from its files")
    p.add_argument("folder", metavar="RUN_OR_EXPORT")
    p.set_defaults(func=cmd_card)

    p = verbs.add_parser("push", help="upload a run folder or export, with its model card, to the Hugging Face hub")
    p.add_argument("folder", metavar="RUN_OR_EXPORT")
    p.add_argument("--repo-id", required=True, metavar="ORG/NAME", help="the model repository (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--token", help="a write token (default: $HF_TOKEN, else a saved `hf auth login`); the hub "
                                   "is $HF_ENDPOINT if set")
    p.set_defaults(func=cmd_push)

    p = verbs.add_parser("serve", help="HTTP inference server: many adapters over one base model")
    p.add_argument("paths", nargs="+", metavar="[NAME=]PATH", help="run folders or exports; NAME defaults to the folder name")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="enables the admin endpoint (default: $LORAFIT_API_KEY)")
    p.add_argument("--adapter-root", help="folder that adapters added at run time must lie in (default: the current folder)")
    p.add_argument("--threshold", action="append", metavar="NAME=P", help="answer out_of_scope below this top-1 probability")
    p.add_argument("--max-texts", type=int, default=64, help="texts per request")
    p.add_argument("--max-chars", type=int, default=2000, help="characters per text")
    p.add_argument("--max-body-bytes", type=int, default=1_000_000)
    p.add_argument("--max-batch", type=int, default=64, help="texts per micro-batch")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a request waits to share a batch")
    p.add_argument("--max-queued", type=int, default=4096,
                   help="texts that may wait for the model; a request over it gets 503 with Retry-After")
    p.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    _add_precision(p, cuda=False)
    p.set_defaults(func=cmd_serve)

    p = verbs.add_parser("sweep", help="a grid / random search of runs from a sweep file")
    p.add_argument("sweep_file")
    p.add_argument("--out", required=True, help="sweep folder (re-running skips finished trials)")
    p.add_argument("--workers", type=int, default=1, help="trials at once (each gets cores/workers threads)")
    p.add_argument("--executor", default="local", choices=["local", "ray"], help="ray: trials as Ray tasks ($RAY_ADDRESS)")
    p.set_defaults(func=cmd_sweep)

    p = verbs.add_parser("compare", help="configurations over seeds: mean ± CI, paired tests, per-class analysis")
    p.add_argument("paths", nargs="+", metavar="SWEEP_DIR|RUN_DIR")
    p.add_argument("--out", help="where compare.md/.csv and per_class.csv go (default: the sweep folder, else ./compare)")
    p.set_defaults(func=cmd_compare)

    p = verbs.add_parser("report", help="HTML (self-contained) and Markdown report with plots for a run or a sweep")
    p.add_argument("paths", nargs="+", metavar="RUN_DIR|SWEEP_DIR")
    p.add_argument("--out", help="folder for report.html, report.md, report_files/ (default: the run or sweep folder)")
    p.set_defaults(func=cmd_report)

    p = verbs.add_parser("config", help="inspect configs")
    sub = p.add_subparsers(dest="config_verb", required=True)
    s = sub.add_parser("show", help="print the fully resolved config")
    s.add_argument("items", nargs="*", metavar="[CONFIG.yaml] [key=value ...]")
    s.set_defaults(func=cmd_config_show)
    s = sub.add_parser("keys", help="every setting with its default and help")
    s.set_defaults(func=cmd_config_keys)

    p = verbs.add_parser("inspect", help="what a method would adapt and train, without training")
    p.add_argument("items", nargs="*", metavar="[MODEL|CONFIG.yaml] [key=value ...]",
                   help="a model name or path, or a config file, then overrides (method.name=dora method.rank=16 ...)")
    p.add_argument("--num-labels", type=int, default=77, help="classes of the head to count (default 77, Banking77)")
    p.set_defaults(func=cmd_inspect)

    p = verbs.add_parser("methods", help="list the fine-tuning methods")
    p.set_defaults(func=cmd_methods)
    return parser


class _StderrHandler(logging.StreamHandler):
    """A handler writing to sys.stderr as it is when a record comes, not as it was when the CLI started
    (tests and host programs swap it; a closed old stream would turn every later log line into an error)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _log_to_stderr() -> None:
    """The library logs; the CLI shows lorafit's INFO lines (the epoch table) on stderr."""
    logger = logging.getLogger("lorafit")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        if getattr(handler, "_lorafit_cli", False):
            logger.removeHandler(handler)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler._lorafit_cli = True  # type: ignore[attr-defined]
    logger.addHandler(handler)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # argparse takes a verb's positionals in one run: `lorafit train CONFIG --out DIR key=value` would
        # leave the overrides after --out unrecognised. Overrides are overrides wherever they stand.
        if hasattr(args, "items") and all("=" in item and not item.startswith("-") for item in extra):
            args.items = [*args.items, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _log_to_stderr()
    try:
        _quiet_libraries()  # imports transformers: seconds in which Ctrl-C must not print a traceback
        return args.func(args)
    except UserError as e:
        from .train import Interrupted

        if isinstance(e, Interrupted):
            print(f"lorafit: {e}", file=sys.stderr)
            return 128 + e.signum
        print(f"lorafit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lorafit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
