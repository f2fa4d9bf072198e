"""Attention-probability dropout on the CPU from lorafit's cheap masks, instead of SDPA's Bernoulli draws.

While training, transformers' encoders call `torch.nn.functional.scaled_dot_product_attention` with
`dropout_p` > 0. On the CPU SDPA then leaves its fused kernel for the math path, which computes

    P = softmax(Q K^T * scale + mask);   out = dropout(P) V

and draws the dropout mask with `bernoulli_`: one double-precision Bernoulli variable per element of
P, on one thread (0.88 ms for a 32 x 12 x 20 x 20 P on the 2-core Xeon of 2026-12-03, against 0.18 ms
for `kernels.fast_dropout`'s mask and product). `attention` is the same math with
`kernels.dropout_mask`'s mask -- 16 random bits per element from the PCG64 stream of the model's other
dropout layers, the drop probability rounded to k / 65536 -- and otherwise the very function
transformers' "sdpa" implementation is: `sdpa_attention_forward` itself runs whenever the fast path
does not apply (evaluation, dropout 0, off the CPU, anything but a plain encoder's call: causal or
grouped-query attention, position biases, soft-capping, attention weights asked for).

As the math path does, float16/bfloat16 inputs (CPU autocast) are computed in float32 and the output
cast back; rows whose keys are all masked (boolean False or additive -inf) give zeros (SDPA's safe
softmax). A module without an `is_causal` attribute counts as causal, as sdpa_attention_forward reads it. Results equal the math
path's with the same mask up to float summation order (tests/test_attention_dropout.py).

`use_attention_dropout(model, fast)` registers `attention` with transformers' `AttentionInterface` as
"lorafit_sdpa" (and sdpa's mask builder under the same name in its `AttentionMaskInterface`: for a name
missing there, transformers silently builds no padding mask) and points every config of `model` that says "sdpa" at it; the config changes are
recorded in `fast` (a `kernels.FastPaths`) and undone with it. The config's attention setting is not
serialised (`to_dict` leaves it out), so saved models and adapters are unchanged. It applies to
modules whose own `dropout` is a `kernels.FastDropout` drawing PCG64 numbers: a run resumed with an
older draw (`FastDropoutInt64`/`Int32`) keeps SDPA's masks, as it began.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface, PretrainedConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from .kernels import FastDropout, FastPaths, apply_mask, dropout_mask

__all__ = ["NAME", "attention", "use_attention_dropout"]

#: The name `attention` is registered under in transformers' AttentionInterface.
NAME = "lorafit_sdpa"


def _applies(module: nn.Module, query: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float,
             is_causal: bool | None, kwargs: dict) -> bool:
    """Whether `attention` computes this call itself: a training call on the CPU with dropout from a
    PCG64 FastDropout, on a plain bidirectional encoder's attention."""
    drop = getattr(module, "dropout", None)
    return (dropout > 0 and module.training and query.device.type == "cpu" and type(drop) is FastDropout
            and drop.p == dropout and not (is_causal if is_causal is not None else getattr(module, "is_causal", True))
            and getattr(module, "num_key_value_groups", 1) == 1 and kwargs.get("position_bias") is None
            and kwargs.get("softcap") is None and not kwargs.get("output_attentions", False)
            and (attention_mask is None or attention_mask.dim() == 4) and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling())


def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
              is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' sdpa attention, with the training dropout mask drawn by `kernels.dropout_mask`.

    query, key, value: (batch, heads, tokens, head size); attention_mask: None, or a boolean (True: take
    part) or additive float mask broadcastable to (batch, heads, tokens, tokens). Returns (output of
    shape (batch, tokens, heads, head size), None), as `sdpa_attention_forward` does.
    """
    if not _applies(module, query, attention_mask, dropout, is_causal, kwargs):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    dtype = query.dtype
    if dtype in (torch.float16, torch.bfloat16):  # the math path's upcast on the CPU
        query, key, value = query.float(), key.float(), value.float()
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    with torch.autocast("cpu", enabled=False):
        scores = torch.matmul(query, key.transpose(-2, -1)).mul_(scale)
        if attention_mask is not None:
            if attention_mask.dtype == torch.bool:
                scores = scores.masked_fill(~attention_mask, float("-inf"))
            else:
                scores = scores + attention_mask.to(scores.dtype)
        probs = torch.softmax(scores, dim=-1)
        if attention_mask is not None:  # SDPA's safe softmax: a row with no key to attend to gives zeros
            empty = torch.isneginf(scores).all(-1, keepdim=True)
            if empty.any():
                probs = probs.masked_fill(empty, 0.0)
        keep, keep_scale = dropout_mask(probs, dropout, module.dropout.draw)
        output = torch.matmul(apply_mask(probs, keep, keep_scale), value)
    return output.to(dtype).transpose(1, 2).contiguous(), None


def use_attention_dropout(model: nn.Module, fast: FastPaths) -> int:
    """Point every config of `model` whose attention is "sdpa" at `attention`, recorded in `fast` (its
    `undo()` points them back) under `attention_dropout`; returns how many configs changed."""
    AttentionInterface.register(NAME, attention)
    # ... and its masks built as for "sdpa": transformers builds no padding mask at all for a name its mask
    # registry does not know.
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    configs = {id(c): c for m in model.modules() if isinstance(c := getattr(m, "config", None), PretrainedConfig)}
    changed = [c for c in configs.values() if getattr(c, "_attn_implementation", None) == "sdpa"]
    for config in changed:
        config._attn_implementation = NAME
        fast.on_undo(lambda config=config: setattr(config, "_attn_implementation", "sdpa"))
    fast.counts["attention_dropout"] = len(changed)
    return len(changed)
