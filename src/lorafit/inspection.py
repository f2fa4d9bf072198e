"""`lorafit inspect`: what a config would adapt and train, counted on the real model, without training.

Counts come from applying the method to the model and reading `requires_grad`, not from formulas,
so they are what training would see (the contract suite checks them against the closed forms).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from . import methods
from .config import Config
from .models import build_classifier
from .train import count_parameters

#: `encoder.encoder.layer.3.attention.self.query` -> `attention.self.query`: the module's role.
_LAYER_PREFIX = re.compile(r"^.*\.(layer|layers|h|block)\.\d+\.")

__all__ = ["ModuleType", "Inspection", "inspect_config", "format_inspection"]


@dataclass
class ModuleType:
    """Adapted modules that share a leaf name (query, value, ...) and shape."""

    name: str
    count: int
    shape: tuple[int, int]  # (out, in)
    base_weights: int  # per module (weight matrix, bias excluded)
    adapter_weights: int  # per module, trainable


@dataclass
class Inspection:
    model: str
    model_type: str
    method: str
    settings: dict
    modules: list[ModuleType]
    head_weights: int
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100 * self.trainable / self.total

    @property
    def reduction(self) -> float:
        """Total parameters over trainable ones: how many times fewer weights train."""
        return self.total / self.trainable


def inspect_config(cfg: Config, num_labels: int = 2, total_steps: int = 1000) -> Inspection:
    """Build the model, apply the method and count. `total_steps` only feeds step-budgeted methods
    (AdaLoRA); it does not change any count."""
    model = build_classifier(cfg.model, num_labels, cfg.seed)
    modules = dict(model.named_modules())  # before apply: the adapted modules are still the bare linears
    head_weights = sum(p.numel() for p in model.classifier.parameters())
    method = methods.build(cfg.method)
    adapted = method.apply(model, total_steps=total_steps)
    targets = method.adapted
    shapes = {t: (modules[t].out_features, modules[t].in_features) for t in targets}

    per_target = dict.fromkeys(targets, 0)
    for name, p in adapted.named_parameters():
        if not p.requires_grad:
            continue
        for t in targets:  # the adapter's parameters live under the adapted module's path
            if name.startswith(f"{t}.") or f".{t}." in name:
                per_target[t] += p.numel()
                break
    groups: dict[tuple, list[str]] = {}
    for t in targets:
        groups.setdefault((_LAYER_PREFIX.sub("", t), shapes[t], per_target[t]), []).append(t)
    types = [ModuleType(name, len(ts), shape, shape[0] * shape[1], weights) for (name, shape, weights), ts in groups.items()]
    trainable, total = count_parameters(adapted)
    settings = cfg.method.model_dump(exclude={"name"})
    return Inspection(cfg.model.name, model.encoder.config.model_type, cfg.method.name, settings, types, head_weights,
                      trainable, total)


def format_inspection(r: Inspection) -> str:
    shown = ", ".join(f"{k}={v}" for k, v in r.settings.items())
    lines = [f"model {r.model} ({r.model_type}); method {r.method}: {shown}", ""]
    if r.modules:
        header = f"{'module':<26}{'count':>6}{'shape (out x in)':>18}{'base weights':>14}{'adapter weights':>17}{'reduction':>11}"
        lines += [header, "-" * len(header)]
        for m in r.modules:
            reduction = f"{m.base_weights / m.adapter_weights:,.1f}x" if m.adapter_weights else "-"
            lines.append(f"{m.name:<26}{m.count:>6}{f'{m.shape[0]} x {m.shape[1]}':>18}{m.base_weights:>14,}"
                         f"{m.adapter_weights:>17,}{reduction:>11}")
        adapted_base = sum(m.count * m.base_weights for m in r.modules)
        adapter = sum(m.count * m.adapter_weights for m in r.modules)
        lines.append(f"{'all adapted modules':<26}{sum(m.count for m in r.modules):>6}{'':>18}{adapted_base:>14,}"
                     f"{adapter:>17,}{(f'{adapted_base / adapter:,.1f}x' if adapter else '-'):>11}")
        lines.append("")
        m = r.modules[0]
        lines.append(f"e.g. a {m.shape[0]}x{m.shape[1]} {m.name} gets {m.adapter_weights:,} adapter weights instead of "
                     f"{m.base_weights:,}.")
    lines.append(f"classification head: {r.head_weights:,} weights (always trains)")
    lines.append(f"trainable: {r.trainable:,} of {r.total:,} parameters ({r.percent:.3f}%), "
                 f"{r.reduction:,.1f}x fewer than full fine-tuning")
    return "\n".join(lines)
