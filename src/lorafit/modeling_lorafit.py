"""lorafit's classifier as a transformers model: encoder -> pooled sentence vector -> linear head.

`lorafit export --format merged` copies this file, unchanged, next to the merged weights, so the
folder loads anywhere transformers is installed (lorafit not needed):

    AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)
    pipeline("text-classification", model=folder, trust_remote_code=True)

Why not a stock `BertForSequenceClassification`: that class classifies from the [CLS] state passed
through a tanh pooler, while lorafit's head reads the *mean* of the token states (the way sentence
encoders such as all-MiniLM-L6-v2 were trained) with no pooler. Loading our weights into the stock
class would silently give a different model, so the folder declares its own model type and refuses
to load without this code.

Depends only on torch and transformers.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

__all__ = ["LorafitConfig", "LorafitForSequenceClassification"]


class LorafitConfig(PretrainedConfig):
    """The base encoder's own config (a dict, as in its config.json) plus how to pool."""

    model_type = "lorafit-classifier"

    def __init__(self, encoder: dict | None = None, pooling: str = "mean", **kwargs):
        self.encoder = dict(encoder or {})
        self.pooling = pooling
        super().__init__(**kwargs)

    def encoder_config(self) -> PretrainedConfig:
        settings = dict(self.encoder)
        return AutoConfig.for_model(settings.pop("model_type"), **settings)


class LorafitForSequenceClassification(PreTrainedModel):
    config_class = LorafitConfig
    base_model_prefix = "lorafit"

    def __init__(self, config: LorafitConfig):
        super().__init__(config)
        self.encoder = AutoModel.from_config(config.encoder_config())
        if getattr(self.encoder, "pooler", None) is not None:  # unused: the head pools by itself
            self.encoder.pooler = None
        self.pooling = config.pooling
        self.dropout = nn.Dropout(0.0)  # kept so the weight names match lorafit's training model
        self.classifier = nn.Linear(self.encoder.config.hidden_size, config.num_labels)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        pass  # every weight comes from the checkpoint

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The pooled sentence vector the head reads (B, H) (what feature-space out-of-scope scores read)."""
        # token_type_ids are deliberately not passed: lorafit trained with the encoder's default (zeros).
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        if self.pooling == "mean":
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (B, H)
        return hidden[:, 0]  # (B, H)

    def forward(self, input_ids=None, attention_mask=None, labels=None, **unused) -> SequenceClassifierOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        logits = self.classifier(self.dropout(self.features(input_ids, attention_mask)))  # (B, num_labels)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)
