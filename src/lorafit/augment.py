"""Training-data augmentation (`data.augment`): new training examples made from the training split.

`apply(dataset, cfg, seed)` runs after `data.load` (so after a few-shot draw) and touches the training split
only: validation and test are never augmented. Each training example gives up to `n_per_example` new
texts with its label, appended to train after the original examples; a new text identical to its source
or to an earlier one from the same source is dropped. Two augmenters:
  eda         Easy Data Augmentation's word edits over WordNet (lorafit.eda)
  paraphrase  texts sampled from a sequence-to-sequence model (a hub id or a local folder), batched,
              seeded per batch
The new texts are cached in `<lorafit cache>/augment/<key>.json`; the key is a sha256 of the augmenter's
kind and settings, the seed, what it draws on (the WordNet version; the model's hub revision or a digest
of its folder's files) and the source texts, so a second run with the same settings reads them instead
of augmenting again, and any change augments anew.

What was done is `Dataset.augmentation`, which splits.json keeps under `augmented`: kind, settings, seed,
cache key, and the source row of every augmented example (`source_rows`, in the order they follow the
original rows), so a reader tells original from augmented rows and a resume checks it gets the same ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

from . import atomic, eda
from .config import AugmentConfig
from .data import Dataset, Split
from .errors import UserError
from .sources import cache_dir, sha256_of

__all__ = ["apply", "cache_key", "settings_of", "VERSION"]

log = logging.getLogger(__name__)

#: Bumped whenever a change to an augmenter changes what it makes, so older cache entries are not reused.
VERSION = 1

_EDA_KEYS = ("n_per_example", "alpha_sr", "alpha_ri", "alpha_rs", "p_rd")
# batch_size counts: padding and the random stream are per batch, so other batches sample other texts.
_PARAPHRASE_KEYS = ("n_per_example", "model", "prefix", "temperature", "top_p", "max_new_tokens", "batch_size")


def settings_of(cfg: AugmentConfig) -> dict:
    """The settings the augmenter of `cfg.kind` uses (the others cannot change what it makes)."""
    keys = _EDA_KEYS if cfg.kind == "eda" else _PARAPHRASE_KEYS
    return {key: getattr(cfg, key) for key in keys}


def cache_key(kind: str, settings: dict, seed: int, identity: dict, texts: list[str]) -> str:
    """sha256 of everything the augmented texts depend on."""
    what = {"version": VERSION, "kind": kind, "settings": settings, "seed": seed, "identity": identity,
            "texts": hashlib.sha256(json.dumps(texts, ensure_ascii=False).encode("utf-8")).hexdigest()}
    return hashlib.sha256(json.dumps(what, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def apply(dataset: Dataset, cfg: AugmentConfig, seed: int, device: str = "cpu", progress: bool = True) -> Dataset:
    """`dataset` with augmented training examples appended (cfg.kind none: `dataset` itself).

    seed: the run's seed, used when data.augment.seed is null. device: where a paraphrase model runs.
    Fails with a UserError, before anything is written, when WordNet or the model is missing.
    """
    if cfg.kind == "none":
        return dataset
    seed = seed if cfg.seed is None else cfg.seed
    train = dataset.splits["train"]
    augmenter = _Eda(cfg) if cfg.kind == "eda" else _Paraphraser(cfg, device)
    settings = settings_of(cfg)
    key = cache_key(cfg.kind, settings, seed, augmenter.identity, train.texts)
    path = cache_dir() / "augment" / f"{key}.json"
    made = _read_cache(path, len(train))
    if made is None:
        made = [_kept(text, new) for text, new in zip(train.texts, augmenter.augment(train.texts, seed, progress))]
        record = {"kind": cfg.kind, "settings": settings, "seed": seed, "identity": augmenter.identity, "made": made}
        atomic.write_text(path, json.dumps(record, ensure_ascii=False) + "\n")
    else:
        log.info("augmented texts read from the cache: %s", path)

    texts, labels, rows = list(train.texts), list(train.labels), list(train.rows)
    source_rows = []
    for i, new in enumerate(made):
        texts += new
        labels += [train.labels[i]] * len(new)
        source_rows += [train.rows[i]] * len(new)
    rows += source_rows
    dropped = cfg.n_per_example * len(train) - len(source_rows)
    augmentation = {"kind": cfg.kind, "settings": settings, "seed": seed, **augmenter.identity, "cache_key": key,
                    "examples": len(source_rows), "dropped": dropped, "source_rows": source_rows}
    provenance = dict(dataset.provenance)
    provenance["train"] = (f"{provenance.get('train', 'file')}; plus {len(source_rows)} {cfg.kind} augmentations "
                           f"(up to {cfg.n_per_example} per example, seed {seed}; {dropped} identical ones dropped)")
    log.info("augmentation (%s): %d training examples -> %d", cfg.kind, len(train), len(texts))
    return dataclasses.replace(dataset, splits={**dataset.splits, "train": Split(texts, labels, rows)},
                               provenance=provenance, augmentation=augmentation)


def _kept(source: str, new: list[str]) -> list[str]:
    """`new` without empty texts, texts equal to `source` and repeats (whitespace does not count)."""
    seen = {" ".join(source.split())}
    kept = []
    for text in new:
        norm = " ".join(text.split())
        if norm and norm not in seen:
            seen.add(norm)
            kept.append(text)
    return kept


def _read_cache(path: Path, n: int) -> list[list[str]] | None:
    """The cached texts, or None when there are none (a damaged file is made again)."""
    try:
        made = json.loads(path.read_text(encoding="utf-8"))["made"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not (isinstance(made, list) and len(made) == n and all(isinstance(m, list) for m in made)):
        return None
    return made


# -- the augmenters -----------------------------------------------------------------------------

class _Eda:
    def __init__(self, cfg: AugmentConfig):
        reader = eda.wordnet()
        self.cfg = cfg
        self.identity = {"wordnet": eda.wordnet_version(reader)}
        self.eda = eda.Eda(reader, cfg.alpha_sr, cfg.alpha_ri, cfg.alpha_rs, cfg.p_rd)

    def augment(self, texts: list[str], seed: int, progress: bool) -> list[list[str]]:
        from tqdm.auto import tqdm

        return [self.eda.augment(text, self.cfg.n_per_example, seed)
                for text in tqdm(texts, desc="eda", unit="text", disable=not progress)]


class _Paraphraser:
    """A seq2seq model's sampled paraphrases. Its identity is known before it loads (a local folder's
    file digest, or the hub revision in the local hub cache), so a cached run needs no model load. The
    identity holds the kind of device too: CPU and CUDA draw other random numbers, so other paraphrases."""

    def __init__(self, cfg: AugmentConfig, device: str):
        assert cfg.model is not None
        self.cfg, self.device = cfg, device
        self.path = _model_path(cfg.model)
        identity = _model_identity(self.path)  # its name is one of the settings
        self.loaded = None
        if not identity:  # a hub model not downloaded yet: load it now, so the key holds its revision
            self.loaded = self._load()
            identity = _model_identity(self.path)
        self.identity = {**identity, "device": str(device).split(":")[0]}  # cuda:1 and cuda draw alike

    def _load(self):
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        folder = Path(self.path)
        if folder.is_dir() and not self.cfg.trust_pickle and not list(folder.glob("*.safetensors")) \
                and (list(folder.glob("*.bin")) or list(folder.glob("*.pt"))):
            raise UserError(f"data.augment.model {folder} holds only pickle weights (.bin/.pt), which can run arbitrary code "
                            "when loaded; convert them to safetensors, or set data.augment.trust_pickle=true if you trust them")
        try:
            tokenizer = AutoTokenizer.from_pretrained(self.path)
            model = AutoModelForSeq2SeqLM.from_pretrained(self.path, use_safetensors=None if self.cfg.trust_pickle else True)
        except Exception as e:  # noqa: BLE001 - transformers and the hub raise many kinds for a model that will not load
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise UserError(f"cannot load data.augment.model {self.cfg.model!r} as a sequence-to-sequence model ({first}); give "
                            "a local folder or a reachable hub id of a seq2seq model (e.g. a T5 or BART paraphraser)") from None
        return tokenizer, model

    def augment(self, texts: list[str], seed: int, progress: bool) -> list[list[str]]:
        import torch
        from tqdm.auto import tqdm

        tokenizer, model = self.loaded or self._load()
        device = torch.device(self.device)
        model.to(device).eval()
        cfg = self.cfg
        limit = min(tokenizer.model_max_length, getattr(model.config, "max_position_embeddings", None) or 512)
        starts = range(0, len(texts), cfg.batch_size)
        made: list[list[str]] = []
        # The training's random state is left as it was; each batch draws from a seed of its own.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
            for batch, start in enumerate(tqdm(starts, desc="paraphrase", unit="batch", disable=not progress)):
                chunk = texts[start:start + cfg.batch_size]
                torch.manual_seed(int.from_bytes(hashlib.sha256(f"{seed}\0{batch}".encode()).digest()[:8], "big") % 2**63)
                inputs = tokenizer([cfg.prefix + t for t in chunk], return_tensors="pt", padding=True, truncation=True,
                                   max_length=limit, return_token_type_ids=False).to(device)
                out = model.generate(**inputs, do_sample=True, num_beams=1, temperature=cfg.temperature, top_p=cfg.top_p,
                                     max_new_tokens=cfg.max_new_tokens, num_return_sequences=cfg.n_per_example)
                decoded = [t.strip() for t in tokenizer.batch_decode(out, skip_special_tokens=True)]
                made += [decoded[i * cfg.n_per_example:(i + 1) * cfg.n_per_example] for i in range(len(chunk))]
        return made


def _model_path(name: str) -> str:
    """A local folder (resolved) or a hub id, as transformers loads it."""
    from .models import looks_like_hub_id

    try:
        folder = Path(name).expanduser()
        exists = folder.exists()
    except (OSError, RuntimeError) as e:
        raise UserError(f"data.augment.model {name[:300]!r}: {getattr(e, 'strerror', None) or e}") from None
    if exists:
        if not (folder / "config.json").is_file():
            raise UserError(f"data.augment.model {folder} has no config.json: point it at a Hugging Face model folder")
        return str(folder.resolve())
    if not looks_like_hub_id(name):
        raise UserError(f"data.augment.model {name[:300]!r} is not an existing folder and not a hub id (org/name)")
    return name


def _model_identity(path: str) -> dict:
    """What the model's outputs depend on besides its name: a digest of a folder's files, or the revision a
    hub id has in the local hub cache ({} when it is not there yet)."""
    folder = Path(path)
    if folder.is_dir():
        digest = hashlib.sha256()
        for file in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
            digest.update(file.name.encode("utf-8") + b"\0" + sha256_of(file).encode("ascii"))
        return {"sha256": digest.hexdigest()}
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(path, "config.json")
    if isinstance(found, str):
        return {"revision": Path(found).parent.name}  # .../snapshots/<commit>/config.json
    return {}
