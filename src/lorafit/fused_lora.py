"""A CPU fast path for peft's LoRA linear: the whole adapted layer as one autograd node.

peft computes an adapted linear as

    y = base(x) + lora_B(lora_A(dropout(x))) * scaling

eight autograd nodes, and three passes over the (tokens x out) output besides the GEMMs: lora_B's
product is written, scaled, then added to the base output into a fourth tensor; backward scales the
upstream gradient once more. `FusedLoraLinear` (a subclass of peft's `lora.Linear`, so the same
parameters, state_dict keys and saved adapters) computes the same function as

    h = dropout(x) A^T                     (tokens x r)
    y = x W^T + b;  y += scaling * h B^T   (one in-place addmm: the scale and the add inside the GEMM)

and its backward by hand:

    dh = scaling * dy B     dB = scaling * dy^T h     dA = dh^T dropout(x)
    dx = dy W + keep * (dh A) / (1 - p)

It saves what peft's nodes save (the dropped-out input, h and the mask) and allocates no (tokens x
out) temporary. Dropout draws its mask exactly as `kernels.FastDropout` does, from the same random
stream in the same order, so a run's random draws do not change with the switch (unless it shares
inputs, below); results equal
peft's path up to float summation order (tests/test_fused_lora.py: outputs and gradients within
1e-5). Under CPU autocast to bf16 (`train.precision=bf16` on CPU) the same node runs on bf16 casts of
x and the weights and returns bf16, as autocast's linear does (peft's path under autocast up to bf16
rounding; gradients reach the float32 parameters through the casts). Everything the fused path does not
cover runs peft's own forward: several active adapters, variants (DoRA), LoRA biases, a trainable base
layer, merged or disabled adapters, peft's stock `nn.Dropout` (its Bernoulli stream differs), tensors
other than float32 (or bf16 under bf16 autocast) on the CPU, other autocast dtypes, tracing.

`use_fused_lora(model, fast)` switches a model's LoRA linears and records them in the `kernels.FastPaths`
of the other CPU fast paths (undone with them); training calls it on CPU unless `train.cpu_kernels` is
`stock` (job.cpu_kernels). Loaded runs are merged, so prediction has no LoRA layers to switch.

With `share_inputs=True` (new training runs; compute.json `shared_lora_inputs`), linears called one after
another on the very same tensor -- BERT's query, key and value on one hidden state -- share its bf16 cast
and one dropout mask: the three adapters then compute what one LoRA of rank 3r on a fused QKV projection
computes (peft's own modules draw a mask each, as runs begun before this do when resumed).
"""

from __future__ import annotations

import threading
import weakref

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from torch import nn

from .frozen_casts import cast_once
from .kernels import FastDropout, FastPaths, OneDnnLinear, _mm, apply_mask, dropout_mask

__all__ = ["FusedLoraLinear", "use_fused_lora"]


def _matmul(onednn: bool, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a (M, K) @ b (N, K)^T + bias, through oneDNN when the layer's base runs there."""
    return _mm(a, b, bias) if onednn else F.linear(a, b, bias)


def _dropout(x: torch.Tensor, keep: torch.Tensor | None, keep_scale: float) -> torch.Tensor:
    """x with the `keep` mask applied as kernels.fast_dropout applies it; x itself without a mask."""
    return x if keep is None else apply_mask(x, keep, keep_scale)


def _fused_forward(x, weight, bias, lora_a, lora_b, scaling: float, keep, keep_scale: float, onednn: bool):
    """(y, dropout(x), h): y = x W^T + b + scaling * h B^T with h = dropout(x) A^T, for 2-D x (M, in)."""
    dropped = _dropout(x, keep, keep_scale)
    h = _matmul(onednn, dropped, lora_a)  # (M, r)
    y = _matmul(onednn, x, weight, bias)  # (M, out)
    y.addmm_(h, lora_b.t(), alpha=scaling)
    return y, dropped, h


class _FusedLoraFunction(torch.autograd.Function):
    """y = x W^T + b + scaling * (dropout(x) A^T) B^T for 2-D x (M, in); W and b frozen."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float, keep, keep_scale: float, onednn: bool):
        y, dropped, h = _fused_forward(x, weight, bias, lora_a, lora_b, scaling, keep, keep_scale, onednn)
        ctx.save_for_backward(dropped, h, weight, lora_a, lora_b, keep)
        ctx.scaling, ctx.keep_scale, ctx.onednn = scaling, keep_scale, onednn
        return y

    @staticmethod
    def backward(ctx, grad):
        dropped, h, weight, lora_a, lora_b, keep = ctx.saved_tensors
        onednn = ctx.onednn
        grad_h = _matmul(onednn, grad, lora_b.t()).mul_(ctx.scaling)  # (M, r)
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _matmul(onednn, grad, weight.t())  # (M, in)
            through_adapter = _matmul(onednn, grad_h, lora_a.t())  # (M, in)
            if keep is None:
                grad_x.add_(through_adapter)
            else:
                grad_x.add_(through_adapter.mul_(keep), alpha=ctx.keep_scale)
        if ctx.needs_input_grad[3]:
            grad_a = _matmul(onednn, grad_h.t(), dropped.t())  # (r, in)
        if ctx.needs_input_grad[4]:
            grad_b = _matmul(onednn, grad.t(), h.t()).mul_(ctx.scaling)  # (out, r)
        return grad_x, None, None, grad_a, grad_b, None, None, None, None


def _compute_dtypes() -> tuple[torch.dtype, ...]:
    """The input dtypes the fused path takes here: float32, and under CPU autocast to bf16 also bf16 (the
    output of an autocast layer below); nothing under another autocast dtype."""
    if not torch.is_autocast_enabled("cpu"):
        return (torch.float32,)
    return (torch.float32, torch.bfloat16) if torch.get_autocast_dtype("cpu") == torch.bfloat16 else ()


class FusedLoraLinear(PeftLoraLinear):
    """peft's `lora.Linear`, with plain single-adapter LoRA on float32 CPU tensors (or under bf16 autocast)
    run as one fused autograd node (module doc); peft's own forward for everything else."""

    def _fusable(self, x: torch.Tensor, args: tuple, kwargs: dict) -> str | None:
        """The one active plain LoRA adapter the fused path can compute, or None."""
        if (args or kwargs or self.disable_adapters or self.merged or x.device.type != "cpu"
                or x.dtype not in _compute_dtypes() or x.dim() < 2 or x.numel() == 0 or torch.compiler.is_compiling()):
            return None
        active = [name for name in self.active_adapters if name in self.lora_A]
        if len(active) != 1 or active[0] in self.lora_variant:
            return None
        name = active[0]
        base, lora_a, lora_b = self.base_layer, self.lora_A[name], self.lora_B[name]
        if type(base) not in (nn.Linear, OneDnnLinear) or lora_a.bias is not None or lora_b.bias is not None:
            return None
        if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
            return None
        if any(p.dtype != torch.float32 for p in (base.weight, lora_a.weight, lora_b.weight)):
            return None
        dropout = self.lora_dropout[name]
        if dropout.training and not (type(dropout) is nn.Identity or isinstance(dropout, FastDropout)):
            return None
        return name

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = self._fusable(x, args, kwargs)
        if name is None:
            return super().forward(x, *args, **kwargs)
        if not torch.is_autocast_enabled("cpu"):
            return self._fused(x, name, None)
        with torch.autocast("cpu", enabled=False):  # the products run in bf16 below, as autocast would run them
            return self._fused(x, name, torch.bfloat16)

    def _fused(self, x: torch.Tensor, name: str, dtype: torch.dtype | None) -> torch.Tensor:
        """The adapted layer on float32 tensors, or (dtype bf16, under autocast) on their bf16 casts, returning
        bf16 as autocast's linear does; gradients reach the float32 parameters and x through the casts."""
        base, lora_a, lora_b = self.base_layer, self.lora_A[name], self.lora_B[name]
        dropout, scaling = self.lora_dropout[name], float(self.scaling[name])
        weight, bias, a, b = base.weight, base.bias, lora_a.weight, lora_b.weight
        if dtype is not None:  # the frozen base weight and bias cast once (frozen_casts.py), the adapter every call
            a, b = a.to(dtype), b.to(dtype)
            weight, bias = cast_once(base, "weight", dtype), cast_once(base, "bias", dtype)
        p = dropout.p if isinstance(dropout, FastDropout) and dropout.training and dropout.p > 0 else 0.0
        x2, keep, keep_scale = self._input(x, dtype, p, dropout.draw if p else None)
        onednn = type(base) is OneDnnLinear and dtype is None  # oneDNN's private op: float32 only
        operands = (x2, weight, bias, a, b, scaling, keep, keep_scale, onednn)
        if torch.is_grad_enabled() and (x.requires_grad or lora_a.weight.requires_grad or lora_b.weight.requires_grad):
            y = _FusedLoraFunction.apply(*operands)
        else:
            y = _fused_forward(*operands)[0]
        return y.reshape(*x.shape[:-1], base.out_features)


    def _input(self, x: torch.Tensor, dtype: torch.dtype | None, p: float, draw: str | None):
        """(x as (M, in) in the compute dtype, its dropout mask or None, the kept elements' factor).

        With `share_inputs` (use_fused_lora), the fused linear called next on the very same tensor -- same
        object, not modified in place since, same compute dtype, dropout and grad mode -- takes the same three: query,
        key and value read one hidden state, so it is cast once and dropped out by one mask, as one LoRA on
        a fused QKV projection would be (peft gives each module its own mask). Inference-mode tensors,
        which keep no version counter, are not shared. The entry lives until the next sharing call (or the
        fast paths' undo); a forward pass reads fresh tensors from its first layer on, so none is reused
        across passes -- a model fed one tensor object twice, unchanged, would be (lorafit's are not)."""
        share = getattr(self, "share_inputs", False) and not x.is_inference()  # (no version counter to check)
        key = (x._version, dtype, p, draw, torch.is_grad_enabled()) if share else None
        if share:
            last = getattr(_last_input, "entry", None)
            if last is not None and last[0]() is x and last[1] == key:
                return last[2]
        x2 = x.reshape(-1, self.base_layer.in_features)
        if dtype is not None:
            x2 = x2.to(dtype)
        keep, keep_scale = dropout_mask(x2, p, draw) if p else (None, 1.0)
        if share:
            _last_input.entry = (weakref.ref(x), key, (x2, keep, keep_scale))
        return x2, keep, keep_scale


#: The last input a sharing fused linear saw, per thread: (weak reference to it, its key, what `_input` made).
_last_input = threading.local()


def use_fused_lora(model: nn.Module, fast: FastPaths, share_inputs: bool = False) -> FastPaths:
    """Switch every peft LoRA linear of `model` to `FusedLoraLinear`, recorded in `fast` as `fused_lora`
    (undone by `fast.undo()` with the other fast paths); a model without any gains no entry.

    `share_inputs`: linears called one after another on the same tensor share its cast and dropout mask
    (FusedLoraLinear._input; training turns it on for new runs, job.cpu_kernels), recorded as
    `fast.counts["shared_lora_inputs"]` (1)."""
    if any(type(module) is PeftLoraLinear for module in model.modules()):
        fast.switch(model, "fused_lora", PeftLoraLinear, FusedLoraLinear)
        if share_inputs:
            switched = [module for module in model.modules() if type(module) is FusedLoraLinear]
            for module in switched:
                module.share_inputs = True

            def unshare() -> None:
                for module in switched:
                    module.__dict__.pop("share_inputs", None)
                _last_input.__dict__.pop("entry", None)  # this thread's; others' go with their next input

            fast.on_undo(unshare)
            fast.counts["shared_lora_inputs"] = 1
    return fast
