"""Model cards: the README.md of every run folder and export, in the Hugging Face model-card format.

YAML front matter (library, base model by hub id, pipeline tag, datasets, metrics, the test figures as
`model-index`), then what was trained and how, the data splits, the weakest classes and most confused
pairs, the efficiency figures, intended use and limits, and how to load it. Everything comes from the
folder's own files (config.yaml, labels.json, splits.json, eval.json, summary.json; an export's
export.json and the run it came from), so the card is never edited by hand: `write` (and
`lorafit card FOLDER`) regenerates it, and `lorafit train` / `lorafit export` write it.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from . import atomic
from .errors import UserError
from .methods import registry
from .models import hub_id, looks_like_hub_id
from .rundir import Compute, RunDir, Splits

__all__ = ["render", "write", "DATASET_HUB_IDS", "CARD"]

#: The file name the hub shows as a repository's card.
CARD = "README.md"

#: Built-in datasets by their hub ids (the card's `datasets`; other data is described, not linked).
DATASET_HUB_IDS = {"banking77": "PolyAI/banking77", "emotion": "dair-ai/emotion"}

#: The hub's library for each kind of folder (what loads it).
_LIBRARY = {"adapter": "peft", "model": "transformers", "merged": "transformers", "onnx": "onnx"}

_WEAK = 5  # classes and pairs listed as weak spots


def write(folder: str | Path, repo_id: str | None = None) -> Path:
    """(Re)write FOLDER/README.md from the folder's files; `repo_id` names where it is published."""
    path = RunDir(folder).path
    text = render(path, repo_id)
    card = path / CARD
    atomic.write_text(card, text)
    return card


def render(folder: str | Path, repo_id: str | None = None, export_meta: dict | None = None, name: str | None = None) -> str:
    """The card's text. `export_meta`: an export's export.json before it is written (lorafit export
    writes the card inside its temporary folder); read from the folder otherwise. `name`: the folder's
    name where it will end up, if not its present one (that temporary folder's)."""
    folder = RunDir(folder)
    folder.config()  # a folder that is not there, not lorafit's, or corrupt: its one-line error
    if export_meta is None and (folder.path / "export.json").is_file():
        export_meta = folder.read_json("export.json")
    if export_meta is not None and export_meta.get("soup"):
        raise UserError(f"{folder.path} is a soup of {len(export_meta['soup']['runs'])} runs: its figures are not any one "
                        "run's, and lorafit does not write a card for it yet; evaluate it with `lorafit eval` and "
                        "write the card by hand")
    if export_meta is not None:
        source = RunDir(export_meta["source_run"])
        if not (source.path / "eval.json").is_file():
            raise UserError(f"{folder.path} is an export of {source.path}, which is not here: the card is made "
                            "from that run's evaluation; regenerate it where the run is")
    else:
        source = folder
    facts = _Facts(folder.path, source, export_meta, repo_id, name or folder.path.name)
    return f"---\n{facts.front_matter()}---\n\n{facts.body()}"


class _Facts:
    """What the card says, read once from the folder's files."""

    def __init__(self, folder: Path, run: RunDir, export_meta: dict | None, repo_id: str | None, folder_name: str):
        run.config()
        for name in ("labels.json", "eval.json", "summary.json"):
            if not (run.path / name).is_file():
                raise UserError(f"{run.path} has no {name}: the run did not finish, so there is nothing to describe")
        self.folder, self.run, self.export, self.repo_id, self.name = folder, run, export_meta, repo_id, folder_name
        self.config_text = (run.path / "config.yaml").read_text()
        self.config = yaml.safe_load(self.config_text)
        self.labels = run.labels()
        self.eval = run.eval()
        self.summary = run.summary()
        self.splits: Splits | None = run.splits() if (run.path / "splits.json").is_file() else None
        self.compute: Compute | None = run.compute() if (run.path / "compute.json").is_file() else None
        method = registry.get(self.config["method"]["name"])
        self.kind = export_meta["format"] if export_meta else method.artifact  # adapter, model, merged, onnx
        self.quantize = (export_meta or {}).get("quantize")
        self.base = self._base_model()
        data_name = str(self.config["data"]["name"])
        self.dataset_hub = DATASET_HUB_IDS.get(data_name) or (data_name[3:] if data_name.startswith("hf:") else None)
        self.dataset = data_name[3:] if data_name.startswith("hf:") else data_name if data_name in DATASET_HUB_IDS \
            else Path(data_name).name or data_name  # a local folder by its name only
        self.title = repo_id.split("/")[-1] if repo_id else folder_name

    def _base_model(self) -> str:
        """The hub id the adapter or export records (models.hub_id), else worked out from the name."""
        if self.export and self.export.get("base_model_hub_id"):
            return self.export["base_model_hub_id"]
        for adapter in (self.folder, self.run.path / "adapter"):
            if (adapter / "adapter_config.json").is_file():
                recorded = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
                if recorded:
                    return recorded
        return hub_id(str(self.config["model"]["name"]))

    @property
    def keeps_last(self) -> bool:
        """train.keep=last: the final epoch was kept, validation chose nothing."""
        return self.config["train"].get("keep") == "last"

    @property
    def base_on_hub(self) -> bool:
        """Whether the base is a hub id: as decided at training time (compute.json), where the name was
        resolved; a folder name tested here would depend on where the card is rendered."""
        recorded = self.compute.base_model if self.compute else None
        if recorded and recorded.get("hub_id") == self.base:
            return bool(recorded["on_hub"])
        return looks_like_hub_id(self.base) and not Path(self.base).expanduser().exists()

    # -- front matter ----------------------------------------------------------------------
    def front_matter(self) -> str:
        from huggingface_hub import EvalResult, ModelCardData

        task = dict(task_type="text-classification", task_name="Text classification",
                    dataset_type=self.dataset_hub or self.dataset, dataset_name=self.dataset)
        if self.quantize:  # int8 weights: the figure measured on them is the parity check's (validation)
            parity = self.export["parity"]
            results = [EvalResult(**task, dataset_split=parity["split"], metric_type="accuracy",
                                  metric_value=round(parity["export_accuracy"], 4), metric_name="Accuracy")]
        else:
            results = [EvalResult(**task, dataset_split=self.eval.split, metric_type=kind, metric_value=round(value, 4),
                                  metric_name=name, metric_args=args)
                       for kind, value, name, args in (
                           ("accuracy", self.eval.accuracy, "Accuracy", None),
                           ("f1", self.eval.macro_f1, "Macro F1", {"average": "macro"}),
                           ("f1", self.eval.weighted_f1, "Weighted F1", {"average": "weighted"}))]
        tags = ["lorafit", "text-classification", self.config["method"]["name"]]
        if self.kind in ("merged", "onnx", "model"):
            tags.append("custom_code" if self.kind != "onnx" else "onnx")
        data = ModelCardData(
            library_name=_LIBRARY[self.kind],
            base_model=self.base if self.base_on_hub else None,
            pipeline_tag="text-classification",
            datasets=[self.dataset_hub] if self.dataset_hub else None,
            language="en" if self.dataset_hub in DATASET_HUB_IDS.values() else None,
            metrics=["accuracy", "f1"],
            model_name=self.title,
            eval_results=results,
            tags=tags,
        )
        return data.to_yaml() + "\n"

    # -- body -------------------------------------------------------------------------------
    def body(self) -> str:
        parts = [self._intro(), self._training(), self._data(), self._results(), self._weak_spots(),
                 self._efficiency(), self._use(), self._loading()]
        return "\n\n".join(p.strip() for p in parts) + "\n"

    def _intro(self) -> str:
        method = self.config["method"]["name"]
        what = {"adapter": f"a {method} adapter (peft format, classification head included)",
                "model": "a fully fine-tuned model (transformers folder)",
                "merged": f"the {method} adapter merged into the base weights (one transformers model)",
                "onnx": "an ONNX graph" + (" with int8 weights" if self.quantize else "")
                        + (" and calibrated int8 activations" if self.quantize == "int8-static" else "")
                        + " of the fine-tuned model"}[self.kind]
        base = f"[{self.base}](https://huggingface.co/{self.base})" if self.base_on_hub else f"`{self.base}` (a local model folder)"
        return (f"# {self.title}\n\n"
                "<!-- Generated by lorafit from this folder's files (`lorafit card`); edits are overwritten. -->\n\n"
                f"A text classifier into {len(self.labels)} classes of {self._dataset_link()}: {what}, fine-tuned "
                f"from {base} with lorafit. Test accuracy "
                f"**{_pct(self.eval.accuracy)}**, macro F1 **{_pct(self.eval.macro_f1)}** on "
                f"{self.eval.examples:,} held-out examples.")

    def _dataset_link(self) -> str:
        if self.dataset_hub:
            return f"[{self.dataset}](https://huggingface.co/datasets/{self.dataset_hub})"
        return f"`{self.dataset}`"

    def _training(self) -> str:
        c, s = self.config, self.summary
        method = {k: v for k, v in c["method"].items() if k != "name"}
        t = c["train"]
        rows = [("method", f"`{c['method']['name']}` " + ", ".join(f"{k}={_short(v)}" for k, v in method.items())),
                ("base model", f"`{self.base}`, {c['model']['pooling']} pooling, head dropout {c['model']['head_dropout']}"),
                ("epochs", f"{t['epochs'] if s.epochs_run is None else s.epochs_run} run of {t['epochs']}, "
                           + (f"kept the last, epoch {s.best_epoch} (train.keep=last), " if self.keeps_last
                              else f"best epoch {s.best_epoch} (by validation {t['metric']}), ")
                           + f"{'?' if s.steps is None else s.steps} optimiser steps"),
                ("batch", f"{t['batch_size']} (gradient accumulation {t['grad_accum']}), texts cut at {c['data']['max_length']} tokens"),
                ("optimiser", f"AdamW, lr {t['lr']}" + (f", head lr {t['head_lr']}" if t.get("head_lr") else "")
                              + f", {t['schedule']} schedule, warmup {t['warmup']}, weight decay {t['weight_decay']}, "
                              f"label smoothing {t['label_smoothing']}, gradient clipping {t['max_grad_norm']}"),
                ("seed", str(c["seed"]))]
        extras = [f"R-Drop alpha {t['rdrop']}"] if t.get("rdrop") else []
        d = c.get("distill") or {}
        if d.get("teacher"):
            extras.append(f"distilled from `{d['teacher']}` (alpha {d['alpha']}, temperature {d['temperature']})")
        if extras:
            rows.insert(-1, ("regularisation", "; ".join(extras)))
        return ("## Training\n\n| setting | value |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)
                + "\n<details><summary>The full resolved configuration (config.yaml)</summary>\n\n"
                + f"```yaml\n{self.config_text.rstrip()}\n```\n\n</details>")

    def _data(self) -> str:
        lines = [f"## Data\n\n{self._dataset_link()}, {len(self.labels)} classes.\n"]
        if self.splits is not None:
            provenance = self.splits.provenance or {}
            hashes = self.splits.content_sha256 or {}
            dropped = self.splits.dropped_rows or {}
            lines.append("| split | examples | from | sha256 of its content |\n|---|---|---|---|")
            for split in ("train", "validation", "test"):
                count = self.splits.rows.get(split)
                if count is None:
                    continue
                count = len(count) if isinstance(count, list) else count
                extra = f" ({dropped[split]} rows dropped)" if dropped.get(split) else ""
                lines.append(f"| {split} | {count:,} | {provenance.get(split, '')}{extra} | "
                             f"`{hashes.get(split, '')[:16]}` |")
        counts = self.summary.train_label_counts
        if counts:
            low, high = min(counts.items(), key=lambda kv: (kv[1], kv[0])), max(counts.items(), key=lambda kv: (kv[1], kv[0]))
            spread = f"{low[1]} each" if low[1] == high[1] else f"{low[1]} (`{low[0]}`) to {high[1]} (`{high[0]}`)"
            lines.append(f"\nTraining examples per class: {spread}.")
        shown = ", ".join(f"`{label}`" for label in self.labels[:20])
        more = f" and {len(self.labels) - 20} more (labels.json)" if len(self.labels) > 20 else ""
        lines.append(f"\nClasses, in the order of the model's outputs: {shown}{more}.")
        return "\n".join(lines)

    def _results(self) -> str:
        e = self.eval
        best = self.summary.best_validation or {}
        rows = [f"| {e.split} | {e.examples:,} | {_pct(e.accuracy)} | {_pct(e.macro_f1)} | "
                f"{_pct(e.weighted_f1)} | {e.loss:.4f} |"]
        last = self.keeps_last
        kept = "the last epoch (train.keep=last: validation chose nothing)" if last else "the best epoch (chosen on validation)"
        if self.config["data"].get("train_on_validation"):  # lorafit train --final: validation's rows were trained on
            kept = ("the last epoch of a run on train + validation, its epoch count, temperature and threshold set "
                    "beforehand (`lorafit train --final` takes them from an earlier run's held-out validation)")
            best = {}  # figures on rows it trained on
        text = (f"## Results\n\nThe model of {kept}, evaluated once on test.\n\n"
                "| split | examples | accuracy | macro F1 | weighted F1 | loss |\n|---|---|---|---|---|---|\n" + "\n".join(rows))
        if best:
            text += ("\n\nValidation of the last epoch: " if last else "\n\nBest validation: ") + \
                ", ".join(f"{k} {_pct(v)}" for k, v in best.items()) + "."
        if self.export:
            p = self.export["parity"]
            text += (f"\n\nThis {self.kind} export against the training-time model on {p['examples']} {p['split']} examples: "
                     f"max |logit difference| {p['max_abs_logit_diff']:.2e}, top-1 agreement {_pct(p['top1_agreement'])}, "
                     f"accuracy {_pct(p['export_accuracy'])} (training-time model {_pct(p['reference_accuracy'])}); "
                     f"tolerance {json.dumps(p['tolerance'])}"
                     + (f", set by the user (defaults {json.dumps(p['default_tolerance'])})"
                        if "user" in p.get("tolerance_source", {}).values() else "") + ".")
            if self.quantize:
                text += " The test figures above are the float model's; the int8 weights were checked on the split named here."
        return text

    def _weak_spots(self) -> str:
        per_class = self.eval.per_class
        weakest = sorted(per_class.items(), key=lambda kv: (kv[1].f1, kv[0]))[:_WEAK]
        lines = ["## Weak spots\n\nLowest F1 on test:\n\n| class | precision | recall | F1 | support |\n|---|---|---|---|---|"]
        lines += [f"| `{name}` | {_pct(m.precision)} | {_pct(m.recall)} | {_pct(m.f1)} | {m.support} |"
                  for name, m in weakest]
        pairs = self.eval.top_confusions or []
        if pairs:
            lines.append("\nMost frequent confusions on test:\n\n| true class | predicted as | texts | share of the class |\n|---|---|---|---|")
            for pair in pairs[:_WEAK]:
                scores = per_class.get(pair.true)
                support = (scores.support if scores else 0) or 0
                share = _pct(pair.count / support) if support else ""
                lines.append(f"| `{pair.true}` | `{pair.predicted}` | {pair.count} | {share} |")
        return "\n".join(lines)

    def _efficiency(self) -> str:
        s = self.summary
        cpu = ((s.compute.cpu_kernels if s.compute else None) or {}).get("cpu") or {}
        threads = s.threads
        where = ("?" if s.device is None else s.device) + (
            f" ({cpu['model']}, {threads} thread{'s' if threads != 1 else ''})" if cpu.get("model") else "")
        rows = [("trainable parameters", f"{s.trainable_params:,} of {s.total_params:,} ({s.trainable_percent:.2f}%)"),
                ("trained weights on disk", _mib(s.adapter_bytes) + (" (the adapter, head included)" if self.kind == "adapter" else "")),
                ("training time", f"{s.train_seconds:.0f} s ({s.seconds_per_epoch:.0f} s per epoch, "
                                  f"{s.train_examples_per_second:.0f} examples/s)"),
                ("peak memory", f"{s.peak_memory_mb:,.0f} MB"),
                ("trained on", where + (f", {s.processes} processes" if (s.processes or 1) > 1 else ""))]
        if self.export:
            weights = sum(p.stat().st_size for p in self.folder.iterdir()
                          if p.is_file() and p.suffix in (".safetensors", ".onnx"))
            rows.append(("this export's weights", _mib(weights)))
        versions = s.versions or {}
        if versions:
            rows.append(("versions", ", ".join(f"{k} {v}" for k, v in versions.items())))
        return "## Efficiency\n\n| | |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)

    def _use(self) -> str:
        c = self.config
        weakest = sorted(self.eval.per_class.items(), key=lambda kv: kv[1].f1)[:1]
        return ("## Intended use and limitations\n\n"
                f"- Intended for sorting short texts like those of {self._dataset_link()} into its {len(self.labels)} "
                "classes, and as a baseline to compare other runs with.\n"
                "- Its top class is always one of these, even for a text that belongs to none: `lorafit predict` and "
                "`lorafit serve` answer out of scope under the threshold of ood.json (chosen on held-out validation), or one you "
                "set (`--threshold`); check it on your own data.\n"
                f"- The figures above were measured on {self.eval.examples:,} test examples from the same source as the "
                "training data; on texts of another style, domain or language expect them to drop.\n"
                f"- Texts longer than {c['data']['max_length']} tokens are cut; the base model's language coverage and "
                "biases carry over.\n"
                + (f"- Weakest class: `{weakest[0][0]}` (F1 {_pct(weakest[0][1].f1)}); see Weak spots before relying on "
                   "the classes listed there.\n" if weakest else "")
                + "- Not evaluated for decisions about people; do not use it for them without your own evaluation.")

    def _loading(self) -> str:
        where = (f'from huggingface_hub import snapshot_download\n\nfolder = snapshot_download("{self.repo_id}")'
                 if self.repo_id else f'folder = "path/to/{self.name}"  # this folder')
        n, c = len(self.labels), self.config
        blocks = ["## How to load",
                  "With lorafit installed (it loads any of its run folders and exports):",
                  f'```python\nimport lorafit\n{where}\n\nclassifier = lorafit.load(folder)\n'
                  'print(classifier.predict(["a text to classify"], top_k=3))  # [[(label, probability), ...]]\n```']
        if self.kind == "adapter":
            adapter = 'f"{folder}/adapter"' if not self.export else "folder"
            blocks += ["With plain peft on lorafit's base classifier (the adapter's module names are those of "
                       "`lorafit.models.SequenceClassifier`: encoder, mean pooling, linear head):",
                       "```python\nfrom peft import PeftModel\nfrom lorafit.config import ModelConfig\n"
                       f"from lorafit.models import build_classifier, load_tokenizer\n{where}\n\n"
                       f'model_cfg = ModelConfig(name="{self.base}", pooling="{c["model"]["pooling"]}")\n'
                       f"base = build_classifier(model_cfg, num_labels={n}, seed=0)  # its head is replaced by the adapter's\n"
                       f"model = PeftModel.from_pretrained(base, {adapter}).eval()\n"
                       "tokenizer = load_tokenizer(model_cfg)\n"
                       f'batch = tokenizer(["a text to classify"], padding=True, truncation=True, max_length={c["data"]["max_length"]}, '
                       'return_tensors="pt")\n'
                       f'logits = model(batch["input_ids"], batch["attention_mask"])  # (texts, {n}), classes as in labels.json\n```']
        if self.kind in ("merged", "model"):
            path, tokenizer = ("folder", "folder") if self.kind == "merged" else ('f"{folder}/model"', f'"{self.base}"')
            blocks += ["With transformers alone (the model's code, modeling_lorafit.py, comes with it: "
                       "`trust_remote_code=True`):",
                       "```python\nfrom transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline\n"
                       f"{where}\n\n"
                       f"model = AutoModelForSequenceClassification.from_pretrained({path}, trust_remote_code=True)\n"
                       f"tokenizer = AutoTokenizer.from_pretrained({tokenizer})\n"
                       'classify = pipeline("text-classification", model=model, tokenizer=tokenizer)\n'
                       'print(classify("a text to classify"))\n```']
        if self.kind == "onnx":
            blocks += ["With ONNX Runtime and a tokenizer:",
                       "```python\nimport onnxruntime as ort\nfrom transformers import AutoTokenizer\n"
                       f"{where}\n\ntokenizer = AutoTokenizer.from_pretrained(folder)\n"
                       'session = ort.InferenceSession(f"{folder}/model.onnx")\n'
                       f'batch = tokenizer(["a text to classify"], padding=True, truncation=True, max_length={c["data"]["max_length"]}, '
                       'return_tensors="np")\n'
                       'logits = session.run(["logits"], {"input_ids": batch["input_ids"].astype("int64"),\n'
                       '                                  "attention_mask": batch["attention_mask"].astype("int64")})[0]\n```']
        blocks.append("The classes are in `labels.json`, in the order of the model's outputs.")
        return "\n\n".join(blocks)


def _pct(value: float) -> str:
    return f"{100 * value:.2f}%"


def _mib(size: int) -> str:
    return f"{size / 2**20:.2f} MiB"


def _short(value) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."
