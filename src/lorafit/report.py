"""`lorafit report`: a run or sweep folder -> one self-contained HTML page (plots embedded) plus Markdown.

For a run: the summary figures, training and validation loss over steps, validation accuracy and
macro-F1 over steps, the confusion matrix as a heatmap (row-normalised, every label named, so 77
classes stay readable), per-class F1 bars and the per-class table. For a sweep (or several runs):
the `lorafit compare` table, accuracy against trainable parameters, validation accuracy curves of
every run, misclassification proportion per class across configurations, and the best
configuration's confusion heatmap and per-class F1.

Plots are PNGs drawn with matplotlib; the HTML embeds them (one file to send), the Markdown links
the same PNGs written next to it (`report_files/`).
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import atomic
from .compare import collect, columns, compare, table_rows
from .errors import UserError
from .rundir import RunDir, make_folder

__all__ = ["report"]


@dataclass
class Figure:
    name: str
    title: str
    png: bytes


def _plt():
    try:
        import matplotlib
    except ImportError:
        raise UserError("reports need matplotlib: pip install 'lorafit[report]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 100, "font.size": 9, "axes.grid": True, "grid.alpha": 0.3})
    return plt


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buffer.getvalue()


# -- plots ---------------------------------------------------------------------------------------

def plot_losses(runs: dict[str, list[dict]], note: str = "") -> Figure:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, (name, records) in enumerate(runs.items()):
        color = f"C{i % 10}"
        steps = [r for r in records if r["type"] == "step"]
        epochs = [r for r in records if r["type"] == "epoch"]
        ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], color=color, alpha=0.6, lw=1,
                label=(f"{name}: training loss" if len(runs) > 1 else "training loss") + note)
        ax.plot([r["step"] for r in epochs], [r["val_loss"] for r in epochs], color=color, marker="o", lw=2,
                label=f"{name}: validation loss" if len(runs) > 1 else "validation loss")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("loss" + (", mean over seeds" if len(runs) > 1 else ""))
    if len(runs) > 1:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    else:
        ax.legend(fontsize=7)
    ax.set_title("Training and validation loss")
    return Figure("losses", "Training and validation loss over steps", _png(fig))


def mean_over_seeds(runs: list[list[dict]]) -> list[dict]:
    """metrics.jsonl records of several seeds of one configuration, averaged where all seeds have them."""
    out = []
    for kind, key, fields in (("step", "step", ("loss",)), ("epoch", "epoch", ("val_loss",))):
        per_seed = [{r[key]: r for r in records if r["type"] == kind} for records in runs]
        for k in sorted(set.intersection(*(set(d) for d in per_seed))):
            out.append({"type": kind, "step": per_seed[0][k]["step"],
                        **{f: float(np.mean([d[k][f] for d in per_seed])) for f in fields}})
    return out


def plot_validation(groups: dict[str, list[list[dict]]]) -> Figure:
    """Validation accuracy and macro-F1 per epoch end: one line per configuration, mean over its seeds."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    for i, (name, runs) in enumerate(groups.items()):
        epochs = [[r for r in records if r["type"] == "epoch"] for records in runs]
        n = min(len(e) for e in epochs)  # seeds that stopped early end the mean
        if n == 0:
            continue
        steps = [epochs[0][k]["step"] for k in range(n)]
        for ax, key in zip(axes, ("val_accuracy", "val_macro_f1")):
            mean = [100 * float(np.mean([e[k][key] for e in epochs])) for k in range(n)]
            ax.plot(steps, mean, color=f"C{i % 10}", marker="o", label=name or None)
    seeds = max(len(runs) for runs in groups.values())
    for ax, metric in zip(axes, ("accuracy", "macro-F1")):
        ax.set_xlabel("optimiser step")
        ax.set_ylabel(f"validation {metric} (%)" + (", mean over seeds" if seeds > 1 else ""))
        ax.grid(True, alpha=0.3)
    if len(groups) > 1 or next(iter(groups)):
        axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    fig.suptitle("Validation accuracy and macro-F1")
    return Figure("validation", "Validation accuracy and macro-F1 over steps", _png(fig))


def plot_confusion(confusion: np.ndarray, labels: list[str], title: str) -> Figure:
    plt = _plt()
    n = len(labels)
    rows = confusion.sum(axis=1, keepdims=True)
    share = np.divide(confusion, rows, out=np.zeros(confusion.shape, dtype=float), where=rows > 0)
    size = max(5.0, 0.16 * n + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    font = max(4.0, min(9.0, 420 / n))
    ax.set_xticks(range(n), labels, rotation=90, fontsize=font)
    ax.set_yticks(range(n), labels, fontsize=font)
    ax.grid(False)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.03, label="share of the true class")
    return Figure("confusion", title, _png(fig))


def plot_per_class_f1(f1: dict[str, float], title: str) -> Figure:
    """Horizontal bars of each class's F1 (`f1`: label -> F1), weakest first."""
    plt = _plt()
    items = sorted(f1.items(), key=lambda kv: kv[1])
    n = len(items)
    fig, ax = plt.subplots(figsize=(7, max(3.0, 0.15 * n + 1)))
    values = [v for _, v in items]
    ax.barh(range(n), values, color=["C3" if v < 0.8 else "C0" for v in values])
    ax.set_yticks(range(n), [k for k, _ in items], fontsize=max(4.0, min(9.0, 420 / n)))
    ax.set_xlim(0, 1)
    ax.set_xlabel("test F1 (red: below 0.8)")
    ax.set_title(title)
    return Figure("per_class_f1", title, _png(fig))


def plot_reliability(calibration: dict, title: str) -> Figure:
    """Reliability diagram (Guo et al. 2017, fig. 1): per confidence bin, accuracy against mean confidence,
    before and after the temperature; the diagonal is perfect calibration."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    for key, name, colour in (("reliability_before", "before", "C3"), ("reliability_after", "after", "C0")):
        bins = [b for b in calibration[key] if b["examples"]]
        ece = calibration[f"ece_{name}"]
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker="o", color=colour,
                label=f"{name} temperature (ECE {100 * ece:.2f}%)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("mean top-1 confidence in bin")
    ax.set_ylabel("accuracy in bin")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    return Figure("reliability", title, _png(fig))


def plot_accuracy_vs_params(rows: list[dict]) -> Figure:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, r in enumerate(rows):
        ax.errorbar(r["trainable_params"], 100 * r["accuracy"], yerr=100 * (r["accuracy_ci"] or 0), fmt="o",
                    color=f"C{i % 10}", capsize=3, label=r["configuration"])
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel("test accuracy (%), mean ± 95% CI")
    ax.legend(fontsize=7, loc="best")
    ax.set_title("Accuracy against trainable parameters")
    return Figure("accuracy_vs_params", "Accuracy against trainable parameters", _png(fig))


def plot_misclassification(per_class: dict, top: int = 30) -> Figure:
    plt = _plt()
    names = list(per_class["error"])
    index = {label: i for i, label in enumerate(per_class["labels"])}
    hardest = per_class["hardest"][:top]
    matrix = np.array([[per_class["error"][n][index[label]] for n in names] for label in hardest])  # (classes, configs)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(names) + 3), 0.28 * len(hardest) + 1.5))
    vmax = max(0.5, float(matrix.max()))
    image = ax.imshow(matrix, cmap="Reds", vmin=0, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
    ax.set_yticks(range(len(hardest)), hardest, fontsize=7)
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6, color="white" if value > 0.6 * vmax else "black")
    ax.grid(False)
    fig.colorbar(image, ax=ax, fraction=0.03, label="misclassified share")
    title = f"Misclassification proportion per class across configurations (hardest {len(hardest)})"
    ax.set_title(title, fontsize=9)
    return Figure("misclassification", title, _png(fig))


# -- pages -----------------------------------------------------------------------------------------

def _table(header: list[str], rows: list[list[str]]) -> tuple[str, str]:
    """(HTML, Markdown) of one table."""
    h = "<table><thead><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in header) + "</tr></thead><tbody>"
    h += "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows) + "</tbody></table>"
    m = "| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n"
    m += "".join("| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |\n" for row in rows)
    return h, m


def _run_section(run: RunDir) -> tuple[list[tuple[str, str]], list[Figure]]:
    cfg, summary, ev = run.config(), run.summary(), run.eval()
    labels = run.labels()
    terms = [f"label smoothing {cfg.train.label_smoothing:g}"] if cfg.train.label_smoothing else []
    terms += [f"R-Drop's KL term (alpha {cfg.train.rdrop:g})"] if cfg.train.rdrop else []
    terms += [f"the teacher's term (distillation, alpha {cfg.distill.alpha:g})"] if cfg.distill.teacher else []
    smoothing = f" (with {', '.join(terms)})" if terms else ""
    figures = [plot_losses({run.path.name: run.metrics()}, smoothing), plot_validation({"": [run.metrics()]}),
               plot_confusion(np.array(ev.confusion), labels, f"Test confusion matrix (row-normalised), {len(labels)} classes"),
               plot_per_class_f1({label: scores.f1 for label, scores in ev.per_class.items()}, "Test F1 per class")]
    facts = [["method", cfg.method.name], ["base model", cfg.model.name], ["data", cfg.data.name],
             ["test accuracy", f"{100 * ev.accuracy:.2f}%"], ["test macro-F1", f"{100 * ev.macro_f1:.2f}%"],
             ["trainable parameters", f"{summary.trainable_params:,} ({summary.trainable_percent:.2f}%)"],
             ["adapter size", f"{summary.adapter_bytes / 2**20:.2f} MiB"],
             ["seconds per epoch", f"{summary.seconds_per_epoch:.1f}"], ["peak memory", f"{summary.peak_memory_mb:,.0f} MB"],
             ["best epoch", f"{summary.best_epoch} of {summary.epochs_run}"], ["device", summary.device or ""]]
    per_class = [[k, f"{v.precision:.3f}", f"{v.recall:.3f}", f"{v.f1:.3f}", v.support]
                 for k, v in sorted(ev.per_class.items(), key=lambda kv: kv[1].f1)]
    confusions = [[c.true, c.predicted, c.count] for c in (ev.top_confusions or [])[:15]]
    tables = [("Summary", _table(["", ""], facts)), ("Most confused pairs (test)", _table(["true", "predicted", "count"], confusions)),
              ("Per class (test), weakest first", _table(["class", "precision", "recall", "F1", "support"], per_class))]
    calibration, ood = ev.calibration, ev.ood
    if calibration:
        temperature = calibration["temperature"]
        figures.append(plot_reliability(calibration, f"Reliability (test), temperature {temperature:.3f} fitted on validation"))
    if ood:
        rows = [[score + (" (decides)" if score == ood["score"] else ""), f"{100 * m['auroc']:.2f}", f"{100 * m['aupr']:.2f}",
                 f"{100 * m['fpr_at_95_recall']:.2f}", f"{100 * m['oos_recall']:.2f}", f"{100 * m['oos_precision']:.2f}",
                 f"{100 * m['in_scope_accuracy_thresholded']:.2f}", f"{100 * m['open_macro_f1']:.2f}"]
                for score, m in ood["scores"].items()]
        tables.append(("Out-of-scope detection (test; thresholds chosen on validation)",
                       _table(["score", "AUROC %", "AUPR %", "FPR@95 %", "OOS recall %", "OOS precision %",
                               "in-scope acc (thr) %", "open macro-F1 %"], rows)))
    return tables, figures


def _sweep_section(paths: list[Path]) -> tuple[list, list[Figure]]:
    runs = collect(paths)
    result = compare(runs)
    rows = sorted(result["rows"], key=lambda r: -r["accuracy"])
    curves = {r["configuration"]: [RunDir(path).metrics() for path in r["runs"]] for r in rows}
    best_paths = next(r["runs"] for r in rows if r["best"])
    best_group = [r for r in runs if str(r.path) in best_paths]
    confusion = np.sum([np.array(r.eval.confusion) for r in best_group], axis=0)
    f1_best = dict(zip(result["per_class"]["labels"], result["per_class"]["f1"][result["best"]]))
    reference = f"Reference configuration ({result['best']}, best mean validation {result['reference_metric'].replace('_', '-')})"
    figures = [plot_accuracy_vs_params(rows), plot_losses({name: mean_over_seeds(runs) for name, runs in curves.items()}),
               plot_validation(curves), plot_misclassification(result["per_class"]),
               plot_confusion(confusion, result["per_class"]["labels"], f"{reference}: test confusion, row-normalised"),
               plot_per_class_f1(f1_best, f"{reference}: test F1 per class, mean over seeds")]
    pairs = [[c["true"], c["predicted"], c["count"]] for c in result["confused_pairs"]]
    tables = [("Configurations", _table(columns(result), table_rows(result))),
              ("Most confused pairs (reference configuration)", _table(["true", "predicted", "count"], pairs))]
    return tables, figures


def report(paths: list[str | Path], out: str | Path | None = None) -> tuple[Path, Path]:
    """Write report.html and report.md (+ report_files/*.png); returns their paths."""
    folders = [Path(p) for p in paths]
    single_run = len(folders) == 1 and (folders[0] / "summary.json").is_file()
    if single_run:
        title = f"lorafit run {folders[0].name}"
        tables, figures = _run_section(RunDir(folders[0]))
    else:
        title = "lorafit comparison: " + ", ".join(f.name for f in folders)
        tables, figures = _sweep_section(folders)
    target = Path(out) if out else folders[0] if len(folders) == 1 else Path("report")
    make_folder(target)
    files = make_folder(target / "report_files")
    for fig in figures:
        (files / f"{fig.name}.png").write_bytes(fig.png)

    page = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{_CSS}</style></head>",
            f"<body data-figures='{len(figures)}'><h1>{html.escape(title)}</h1>"]
    markdown = [f"# {title}\n"]
    def add_table(heading: str, table_html: str, table_md: str) -> None:
        page.append(f"<h2>{html.escape(heading)}</h2>{table_html}")
        markdown.append(f"## {heading}\n\n{table_md}")

    add_table(tables[0][0], *tables[0][1])  # the headline table, then the plots, then the details
    for fig in figures:
        data = base64.b64encode(fig.png).decode()
        page.append(f"<h2>{html.escape(fig.title)}</h2><img class='plot' alt='{html.escape(fig.title)}' src='data:image/png;base64,{data}'>")
        markdown.append(f"## {fig.title}\n\n![{fig.title}](report_files/{fig.name}.png)\n")
    for heading, (table_html, table_md) in tables[1:]:
        add_table(heading, table_html, table_md)
    page.append(f"<script>{_CHECK}</script></body></html>")
    html_path, md_path = target / "report.html", target / "report.md"
    atomic.write_text(html_path, "\n".join(page))
    atomic.write_text(md_path, "\n".join(markdown))
    return html_path, md_path


_CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}img.plot{max-width:100%;display:block;margin:1em 0}
h2{margin-top:2em;border-bottom:1px solid #ddd}"""

# Marks the page once every plot has decoded, so a headless browser can check it rendered.
_CHECK = """window.addEventListener('load',()=>{const imgs=[...document.images];
const ok=imgs.filter(i=>i.complete&&i.naturalWidth>0).length;document.body.dataset.rendered=ok+'/'+imgs.length;});"""
