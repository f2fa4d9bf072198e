"""Frozen weights cast to the autocast dtype once, not at every call.

Autocast runs a linear layer on casts of its operands to bf16 (or fp16) and keeps a cast for the next
call only for leaf tensors that require a gradient. A frozen weight -- every weight of a loaded model,
the base weights of a LoRA model in training -- is cast again at every call: on a CPU whose bf16
matmuls run on AMX tiles (a 2-core Xeon with amx_bf16 here: a (480 x 1536) @ (1536 x 384) product in
0.28 ms, its weight's cast 0.06 ms) that is a visible share of a product's time. Measured there in
alternating runs: bf16 prediction of a frozen BERT-base-sized model 11% faster, all-MiniLM-L6-v2 2%,
LoRA training within noise (a profile had put the copies at a fifth of MiniLM's prediction: overstated).

`cast_once(owner, name, dtype)` returns the cast of `owner`'s parameter `name`, made once and kept on the
module (not in its state_dict) while the parameter is the same tensor: same storage, same in-place
version, so `load_state_dict`, an optimizer step on an unfrozen weight or `.to(device)` make a new one; a write
through `.data` moves no version, so whoever writes so calls `forget_casts`.
The kept tensor is the very cast autocast would make (`Tensor.to(dtype)` of the same numbers), so
results are identical to the bit (tests/test_frozen_casts.py). A parameter that requires a gradient is
cast every call as before (its cast must stay in the autograd graph), as is one made in inference mode;
one already in `dtype` is returned as it is. A kept cast costs half the weight's float32 memory in bf16.

`CastOnceLinear` is an `nn.Linear` subclass (same parameters and state_dict keys) that hands autocast its
kept casts; a loaded model predicting under autocast runs its linear layers as this class
(inference.TorchBackend, recorded in its `FastPaths` as `cast_once_linear`), and the fused LoRA path
(fused_lora.py) takes its base weight and bias from `cast_once` under bf16 autocast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["cast_once", "forget_casts", "autocast_operands", "CastOnceLinear"]

_KEPT = "_lorafit_casts"  # the module attribute holding {name: (key, cast, the source it was cast from)}


def cast_once(owner: nn.Module, name: str, dtype: torch.dtype) -> torch.Tensor | None:
    """`getattr(owner, name).to(dtype)`, kept on `owner` for the next call while the parameter is unchanged
    and needs no gradient (module doc); None for a missing parameter (a linear without bias)."""
    param = getattr(owner, name)
    if param is None or param.dtype in (dtype, torch.float64):  # autocast leaves float64 as it is
        return param
    if param.requires_grad or param.is_inference():  # an inference tensor has no version to watch
        return param.to(dtype)
    key = (dtype, param.device, param.data_ptr(), param._version)
    kept = owner.__dict__.setdefault(_KEPT, {})
    if name not in kept or kept[name][0] != key:
        # Made outside inference mode, so the kept cast serves no-grad, inference and training calls alike. The
        # source's storage is held with it, so no other tensor can take its address while the cast is kept.
        with torch.inference_mode(False), torch.no_grad():
            kept[name] = (key, param.to(dtype), param.detach())
    return kept[name][1]


def forget_casts(model: nn.Module) -> None:
    """Drop the casts kept on `model` and its submodules: after writing weights through `.data` (which moves no
    version counter, as peft's unsafe merge does), and when the fast paths are undone."""
    for module in model.modules():
        module.__dict__.pop(_KEPT, None)


def autocast_operands(layer: nn.Linear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) for `F.linear(x, ...)`: under autocast on x's device the kept casts, else the parameters."""
    kind = x.device.type
    if not torch.is_autocast_enabled(kind) or torch.compiler.is_compiling():
        return layer.weight, layer.bias
    dtype = torch.get_autocast_dtype(kind)
    return cast_once(layer, "weight", dtype), cast_once(layer, "bias", dtype)


class CastOnceLinear(nn.Linear):
    """`nn.Linear` whose frozen weight and bias are cast to the autocast dtype once (module doc); the same
    products as autocast's linear, which casts the input as before."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, *autocast_operands(self, x))
