"""CPU fast paths: float32 linear layers through oneDNN, and a cheaper dropout mask.

PyTorch's CPU `F.linear` calls MKL's sgemm. MKL picks its kernels by CPU vendor, and on AMD
processors (this project's 2-core EPYC among them) it runs a path at about half the speed oneDNN
reaches on the same core: measured here, a (960 x 384) @ (384 x 1536) product runs at ~100 GFLOP/s
through `F.linear` and ~200-235 GFLOP/s through oneDNN, forward and backward alike. PyTorch
routes float32 matmuls to oneDNN only in reduced-precision modes, so lorafit calls oneDNN's linear
(`torch.ops.mkldnn._linear_pointwise`, the kernel PyTorch's own CPU inference compiler uses) itself,
with a backward written from the same kernel:

    y  = x W^T + b          dx = dy W          dW = dy^T x          db = sum(dy)

`use_onednn_linear(model)` turns every `nn.Linear` of a model (peft's `base_layer`, `lora_A` and
`lora_B` included: they are `nn.Linear`s) into `OneDnnLinear`, a subclass with the same parameters
and state_dict keys, so saving, merging and peft are unaffected. It falls back to `F.linear` for
anything but float32 CPU tensors (CUDA, autocast, half precision) and while torch.export/ONNX
tracing. Results equal `F.linear` up to float summation order (tests/test_kernels.py: outputs and
gradients within 1e-5 relative). `choose(...)` times both once per process and keeps oneDNN only
where it is faster, so an Intel CPU whose MKL is already fast keeps the stock path.

Dropout: `F.dropout` on CPU draws one Bernoulli variable per element (~1.1 ms for a 32 x 20 x 384
activation here: a quarter of a LoRA training step once the matmuls are fast). `FastDropout` draws
one 32-bit random number per *two* elements from the same generator and compares 16-bit halves
with a threshold: the same Bernoulli mask distribution, with the drop probability rounded to a
multiple of 1/65536 (0.1 -> 0.100006), at about half the cost. Seeding and checkpoint-resume work
as before (it uses torch's default generator); the draws differ from `F.dropout`'s.

`speed_up(model, device)` applies both on CPU; `train.cpu_kernels: stock` turns them off.
"""

from __future__ import annotations

import functools
import logging
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["OneDnnLinear", "FastDropout", "use_onednn_linear", "use_fast_dropout", "onednn_available", "choose",
           "speed_up", "fast_dropout"]

log = logging.getLogger(__name__)


# oneDNN compiles a primitive per distinct shape and keeps up to 1,024 of them. Variable-length
# batches bring new shapes nearly every step, so a full cache held ~350 MB here (one Banking77 LoRA
# epoch: peak RSS 2,012 MB with 1,024, 1,631 MB with 64, 1,601 MB with 32, at the same speed; with
# no cache 1,491 MB but 30 % slower). oneDNN reads the setting when it first runs, so it is set when
# this module is imported (on the importing thread, before any lorafit oneDNN call); a value the
# user exported under either of oneDNN's names wins.
PRIMITIVE_CACHE_CAPACITY = 64
if not {"ONEDNN_PRIMITIVE_CACHE_CAPACITY", "DNNL_PRIMITIVE_CACHE_CAPACITY"} & set(os.environ):
    os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = str(PRIMITIVE_CACHE_CAPACITY)


@functools.cache
def onednn_available() -> bool:
    try:
        op = torch.ops.mkldnn._linear_pointwise
        x, w = torch.ones(2, 3), torch.ones(4, 3)
        return bool(torch.backends.mkldnn.is_available() and torch.equal(op(x, w, None, "none", [], ""), F.linear(x, w)))
    except (AttributeError, RuntimeError):
        return False


def _mm(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a (M, K) @ b (N, K)^T + bias, on oneDNN."""
    return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")


class _OneDnnLinearFunction(torch.autograd.Function):
    """y = x W^T + b for 2-D x (M, in); the module reshapes around it, so y is no view of ours."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x if weight.requires_grad else None, weight)
        return _mm(x, weight, bias)  # (M, out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        # oneDNN reads the transposed operands through their strides: no copies.
        if ctx.needs_input_grad[0]:
            grad_x = _mm(grad, weight.t())  # (M, out) @ (out, in)
        if ctx.needs_input_grad[1]:
            grad_w = _mm(grad.t(), x.t())  # (out, M) @ (M, in)
        if ctx.needs_input_grad[2]:
            grad_b = grad.sum(0)
        return grad_x, grad_w, grad_b


class OneDnnLinear(nn.Linear):
    """`nn.Linear` computed by oneDNN on float32 CPU tensors; `F.linear` everywhere else."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type != "cpu" or x.dtype != torch.float32 or self.weight.dtype != torch.float32
                or torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling() or x.dim() < 2 or x.numel() == 0):
            return F.linear(x, self.weight, self.bias)
        x2 = x.reshape(-1, self.in_features)  # (M, in)
        # The autograd path whenever anything here needs a gradient: the bias alone trains in BitFit
        # (peft bias="all"), with a frozen weight and an input that needs none.
        needs_grad = x.requires_grad or self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad)
        if torch.is_grad_enabled() and needs_grad:
            y = _OneDnnLinearFunction.apply(x2, self.weight, self.bias)
        else:
            y = _mm(x2, self.weight, self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)


def use_onednn_linear(model: nn.Module, enable: bool = True) -> int:
    """Switch every plain `nn.Linear` of `model` to `OneDnnLinear` (or back); returns how many changed."""
    return _swap(model, nn.Linear, OneDnnLinear) if enable else _swap(model, OneDnnLinear, nn.Linear)


@functools.cache
def choose(threads: int) -> bool:
    """True when oneDNN's linear beats `F.linear` on this CPU (timed once per process and thread count)."""
    if not onednn_available():
        return False
    x, layer = torch.randn(512, 384), nn.Linear(384, 1536)
    fast = OneDnnLinear(384, 1536)
    fast.load_state_dict(layer.state_dict())

    def best(f) -> float:
        f()
        times = []
        for _ in range(5):
            start = time.perf_counter()
            f()
            times.append(time.perf_counter() - start)
        return min(times)

    with torch.no_grad():
        stock, onednn = best(lambda: layer(x)), best(lambda: fast(x))
    log.debug("linear 512x384x1536: F.linear %.2f ms, oneDNN %.2f ms", 1e3 * stock, 1e3 * onednn)
    return onednn < 0.9 * stock


def fast_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout with drop probability p rounded to k / 65536: 16 random bits per element.

    Any p in [0, 1] works: one that rounds to 65536 / 65536 (p > 1 - 1/131072) drops every element,
    like `F.dropout(x, 1.0)`, rather than scaling the survivors by 1 / 0.
    """
    if not 0 <= p <= 1:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    dropped = int(round(p * 65536))  # of every 65536 elements, on average
    if dropped == 65536:
        return x * 0
    n = x.numel()
    threshold = dropped - 32768  # int16 draws are uniform on [-32768, 32767]
    bits = torch.randint(-(2**31), 2**31 - 1, ((n + 1) // 2,), dtype=torch.int32, device=x.device)
    keep = bits.view(torch.int16)[:n].view(x.shape) >= threshold  # P(keep) = 1 - dropped / 65536
    return (x * keep).mul_(65536 / (65536 - dropped))


class FastDropout(nn.Dropout):
    """`nn.Dropout` whose CPU training mask costs half a Bernoulli draw per element (see module doc)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu" or self.inplace or not x.is_floating_point():
            return F.dropout(x, self.p, self.training, self.inplace)
        return fast_dropout(x, self.p)


def _swap(model: nn.Module, source: type, target: type) -> int:
    changed = 0
    for module in model.modules():
        if type(module) is source:
            module.__class__ = target
            changed += 1
    return changed


def use_fast_dropout(model: nn.Module, enable: bool = True) -> int:
    """Switch every plain `nn.Dropout` of `model` to `FastDropout` (or back); returns how many changed."""
    return _swap(model, nn.Dropout, FastDropout) if enable else _swap(model, FastDropout, nn.Dropout)


def speed_up(model: nn.Module, device: torch.device, dropout: bool = True) -> dict[str, int]:
    """The CPU fast paths for `model` on `device`: oneDNN linears where faster here, fast dropout masks."""
    if device.type != "cpu":
        return {}
    changed = {}
    if choose(torch.get_num_threads()):
        changed["onednn_linear"] = use_onednn_linear(model)
    if dropout:
        changed["fast_dropout"] = use_fast_dropout(model)
    return changed
