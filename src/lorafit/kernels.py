"""CPU fast paths: float32 linear layers through oneDNN, and a cheaper dropout mask.

PyTorch's CPU `F.linear` calls MKL's sgemm. MKL picks its kernels by CPU vendor, and on some AMD
processors it runs a slow path: on this project's 2-core EPYC a (960 x 384) @ (384 x 1536) product
ran at ~100 GFLOP/s through `F.linear` and ~200-235 GFLOP/s through oneDNN, forward and backward
alike. That gain is host-dependent: on another 2-core EPYC of the same kind `torch.mm` measured
159 GFLOP/s against oneDNN's 139 for a 2048-cube product, and an Intel CPU's MKL is fast anyway.
PyTorch routes float32 matmuls to oneDNN only in reduced-precision modes, so lorafit calls oneDNN's
linear (`torch.ops.mkldnn._linear_pointwise`, the private op PyTorch's own CPU inference compiler
uses) itself, with a backward written from the same kernel:

    y  = x W^T + b          dx = dy W          dW = dy^T x          db = sum(dy)

`OneDnnLinear` is an `nn.Linear` subclass with the same parameters and state_dict keys, so saving,
merging and peft are unaffected; switching a layer to it changes only the layer's class (peft's
`base_layer`, `lora_A` and `lora_B` are `nn.Linear`s too). It falls back to `F.linear` for anything
but float32 CPU tensors (CUDA, autocast, half precision) and while torch.export/ONNX tracing.
Results equal `F.linear` up to float summation order (tests/test_kernels.py: outputs and gradients
within 1e-5 relative, for any of input/weight/bias trainable and strided operands).

`decide(threads)` makes the choice once per process and thread count, and returns it as a record
(for summary.json): oneDNN is used only when the private op exists, its forward and backward agree
with `F.linear` within 1e-4 relative on the model's layer shapes, and it is clearly faster there
(`MARGIN`) in interleaved, repeated timings of forward+backward; otherwise PyTorch's kernel. So a
PyTorch without the op, or a CPU where MKL is as fast, simply keeps the stock path.

Dropout: `F.dropout` on CPU draws one Bernoulli variable per element (~1.1 ms for a 32 x 20 x 384
activation here: a quarter of a LoRA training step once the matmuls are fast). `FastDropout` draws
one 64-bit random number per *four* elements and compares its 16-bit
quarters with a threshold: the same Bernoulli mask distribution, with the drop probability rounded
to a multiple of 1/65536 (0.1 -> 0.100006), at a fraction of the cost (torch's CPU `randint` costs
per number drawn more than per bit: 64-bit draws for n / 4 numbers took 1.3 ms where 32-bit draws
for n / 2 took 2.7 ms, n = 640 x 1536, Zen 5). The 64-bit numbers come from numpy's PCG64DXSM generator,
seeded for each mask by a 128-bit draw from torch's default generator (`random_bits`): 2-4x cheaper
per number than torch's Mersenne Twister here (0.41 against 0.87 ms for a 640 x 1536 mask, 4.1 against
16.6 ms for 3 million numbers), and seeding and checkpoint-resume work as before, since
the stream depends on torch's generator alone; the draws differ from `F.dropout`'s. Runs whose
compute.json records an older draw replay it: `FastDropoutInt64` (torch's 64-bit numbers, before the
PCG64 draws) and `FastDropoutInt32` (one 32-bit number per two elements, before the 64-bit draws), so
their masks stay theirs. (Attention probabilities drop out by the same masks: attention_dropout.py.)

The switch is an explicit step of whoever loads or trains a model: `fast = use_fast_paths(model,
device)` switches the layers on CPU (`onednn=` replays a recorded decision, e.g. the one of a run
being resumed, without timing) and returns a `FastPaths` record: `fast.counts` (layers switched, by
kind) and `fast.undo()` (also on leaving `with fast:`), which gives every switched module its stock
class back. train.py's `_cpu_kernels` and inference's `TorchBackend` call it; `train.cpu_kernels:
stock` keeps the stock layers. Importing this module changes nothing, not even the environment:
oneDNN's primitive cache is capped (`PRIMITIVE_CACHE_CAPACITY`, in the environment, which oneDNN
reads once per process) by the check that precedes lorafit's first oneDNN call.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lorafit.frozen_casts import forget_casts
from lorafit.hardware import cpu_info

__all__ = ["OneDnnLinear", "FastDropout", "FastDropoutInt64", "FastDropoutInt32", "DROPOUT_BY_DRAW", "random_bits", "FastPaths", "use_fast_paths", "use_onednn_linear",
           "use_fast_dropout", "onednn_available", "decide", "fast_dropout", "dropout_mask", "apply_mask", "MODEL_SHAPES",
           "MARGIN", "TOLERANCE", "PRIMITIVE_CACHE_CAPACITY"]

log = logging.getLogger(__name__)


# oneDNN compiles a primitive per distinct shape and keeps up to 1,024 of them. Variable-length
# batches bring new shapes nearly every step, so a full cache held ~350 MB here (one Banking77 LoRA
# epoch: peak RSS 2,012 MB with 1,024, 1,631 MB with 64, 1,601 MB with 32, at the same speed; with
# no cache 1,491 MB but 30 % slower).
PRIMITIVE_CACHE_CAPACITY = 64
_PRIMITIVE_CACHE_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "DNNL_PRIMITIVE_CACHE_CAPACITY")  # oneDNN's two names


def _cap_primitive_cache() -> None:
    """Ask oneDNN to keep at most `PRIMITIVE_CACHE_CAPACITY` primitives, unless the user exported a
    capacity under either of oneDNN's names (theirs wins).

    oneDNN reads the variable once per process, when it builds its first primitive; later changes
    are ignored. So `_problem`, the check that `decide`, `use_fast_paths` and `onednn_available` run
    before they make lorafit's first oneDNN call, calls this first.
    """
    if not any(name in os.environ for name in _PRIMITIVE_CACHE_VARIABLES):
        os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = str(PRIMITIVE_CACHE_CAPACITY)


def onednn_available() -> bool:
    """True when oneDNN's linear can be used here: the private op exists and agrees with `F.linear`."""
    return _problem() is None


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
    """Switch every plain `nn.Linear` of `model` to `OneDnnLinear` (or every `OneDnnLinear` back);
    returns how many changed. The unchecked, unrecorded switch: loading and training use `use_fast_paths`;
    export uses `enable=False` to hand a merged model to the ONNX exporter with stock layers."""
    return len(_swap(model, nn.Linear, OneDnnLinear) if enable else _swap(model, OneDnnLinear, nn.Linear))


#: (in, out, layers of this shape per encoder block) of the linear layers the default model
#: (all-MiniLM-L6-v2, BERT-small widths) runs: query/key/value/output projections, the feed-forward
#: up and down projections. The timings are weighted by these counts, as a training step is.
MODEL_SHAPES = ((384, 384, 4), (384, 1536, 1), (1536, 384, 1))
ROWS = 256  # tokens in a timed batch: a few hundred, as train.max_batch_tokens cuts batches on CPU
REPEATS = 5  # timed rounds (after one warm-up round, in which oneDNN builds its primitives)
MARGIN = 1.1  # oneDNN is kept only when at least 10 % faster: near a tie the stock kernel is the safer one
TOLERANCE = 1e-4  # largest difference from F.linear, relative to the largest value, in y, dx, dW and db


def _shape_name(n_in: int, n_out: int) -> str:
    return f"{ROWS}x{n_in}->{n_out}"


def _pair(n_in: int, n_out: int) -> tuple[nn.Linear, OneDnnLinear, torch.Tensor, torch.Tensor]:
    """A stock and a oneDNN layer with the same weights, an input needing a gradient and an upstream gradient."""
    stock = nn.Linear(n_in, n_out)
    fast = OneDnnLinear(n_in, n_out)
    fast.load_state_dict(stock.state_dict())
    return stock, fast, torch.randn(ROWS, n_in, requires_grad=True), torch.randn(ROWS, n_out)


def _step(layer: nn.Linear, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One forward and backward: (y, dx, dW, db)."""
    y = layer(x)
    return (y.detach(), *torch.autograd.grad(y, (x, layer.weight, layer.bias), g))


def _isolated(fn):
    """Run `fn` with gradients on, autocast off and torch's random state restored afterwards, so that
    deciding (which draws random test data) leaves a seeded run's random stream as it found it."""

    @functools.wraps(fn)
    def wrapper(*args):
        with torch.random.fork_rng(devices=[]), torch.enable_grad(), torch.autocast("cpu", enabled=False):
            torch.manual_seed(0)
            return fn(*args)

    return wrapper


@functools.cache
@_isolated
def _problem() -> str | None:
    """Why oneDNN's linear must not be used here (one short sentence), or None when it may."""
    _cap_primitive_cache()  # before the checks below make this process's first oneDNN call
    if not torch.backends.mkldnn.is_available():
        return "this PyTorch build has no oneDNN"
    try:
        torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return "private op missing"
    worst = 0.0
    try:
        for n_in, n_out, _ in MODEL_SHAPES:
            stock, fast, x, g = _pair(n_in, n_out)
            for a, b in zip(_step(fast, x, g), _step(stock, x, g), strict=True):
                worst = max(worst, float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)))
    except Exception as exc:  # a private op may change its signature or fail on some CPUs
        log.debug("oneDNN linear check raised", exc_info=True)
        return f"private op raised {type(exc).__name__}"
    if not worst <= TOLERANCE:  # also catches NaN
        return f"oneDNN disagrees with F.linear (relative error {worst:.1e})"
    return None


@_isolated
def _time_linears() -> dict[str, dict[str, float]]:
    """Median milliseconds of forward+backward per model shape: {shape: {"stock": ms, "onednn": ms}}.

    Both kernels are timed in turn within each round (order alternating), so a load that comes and
    goes slows both alike rather than the one that happened to run during it.
    """
    pairs = [(_shape_name(n_in, n_out), *_pair(n_in, n_out)) for n_in, n_out, _ in MODEL_SHAPES]
    seconds: dict[str, dict[str, list[float]]] = {name: {"stock": [], "onednn": []} for name, *_ in pairs}
    for round_ in range(REPEATS + 1):
        for name, stock, fast, x, g in pairs:
            order = [("stock", stock), ("onednn", fast)]
            for kind, layer in order if round_ % 2 else order[::-1]:
                start = time.perf_counter()
                _step(layer, x, g)
                if round_:
                    seconds[name][kind].append(time.perf_counter() - start)
    return {name: {kind: round(1e3 * statistics.median(t), 3) for kind, t in by_kind.items()}
            for name, by_kind in seconds.items()}


@functools.cache
def _decide(threads: int) -> dict:
    record = {"onednn_linear": False, "reason": "", "timings_ms": {}, "threads": threads, "cpu": cpu_info(),
              "torch": torch.__version__}
    problem = _problem()
    if problem is not None:
        record["reason"] = problem
        return record
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        record["timings_ms"] = timings = _time_linears()
    except Exception as exc:
        log.debug("timing oneDNN's linear raised", exc_info=True)
        record["reason"] = f"private op raised {type(exc).__name__} while timed"
        return record
    finally:
        torch.set_num_threads(previous)
    total = {kind: sum(count * timings[_shape_name(n_in, n_out)][kind] for n_in, n_out, count in MODEL_SHAPES)
             for kind in ("stock", "onednn")}
    speedup = total["stock"] / total["onednn"]
    record["onednn_linear"] = speedup >= MARGIN
    record["reason"] = (f"oneDNN {speedup:.2f}x faster on {len(MODEL_SHAPES)} model shapes, forward+backward"
                        if record["onednn_linear"] else f"not faster ({speedup:.2f}x, needs {MARGIN:.2f}x)")
    log.debug("CPU linear kernel: %s; %s", "oneDNN" if record["onednn_linear"] else "F.linear", record["reason"])
    return record


def decide(threads: int) -> dict:
    """Whether `use_fast_paths` uses oneDNN's linear with `threads` threads, and why, as a JSON-ready record:

    {"onednn_linear": bool, "reason": one short sentence, "timings_ms": {shape: {"stock": ms,
    "onednn": ms}} (empty when not timed), "threads": int, "cpu": hardware.cpu_info(), "torch": version}.

    Decided once per process and thread count: the private op must exist and agree with `F.linear`
    (forward and backward within `TOLERANCE`) and be at least `MARGIN` times faster on `MODEL_SHAPES`.
    """
    return copy.deepcopy(_decide(threads))


def fast_dropout(x: torch.Tensor, p: float, draw: str = "pcg64") -> torch.Tensor:
    """Inverted dropout with drop probability p rounded to k / 65536: 16 random bits per element.

    Any p in [0, 1] works: one that rounds to 65536 / 65536 (p > 1 - 1/131072) drops every element,
    like `F.dropout(x, 1.0)`, rather than scaling the survivors by 1 / 0.
    """
    return apply_mask(x, *dropout_mask(x, p, draw))


def apply_mask(x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
    """x times `dropout_mask`'s mask and the kept elements' factor: inverted dropout's arithmetic."""
    return (x * keep).mul_(scale)


#: How dropout_mask draws its 16-bit numbers, by name: (dtype of the drawn numbers, 16-bit numbers per draw).
#: "pcg64" is the default (numpy's generator seeded from torch's, see `random_bits`); "int64" and "int32"
#: (torch's generator) replay older runs' masks.
DRAWS = {"pcg64": (torch.int64, 4), "int64": (torch.int64, 4), "int32": (torch.int32, 2)}


def random_bits(count: int, draw: str = "pcg64") -> torch.Tensor:
    """`count` uniform random 64-bit (or, for draw "int32", 32-bit) integers on the CPU, reproducible from
    torch's default generator.

    "int64"/"int32": drawn by `torch.randint` from torch's CPU generator (Mersenne Twister, one thread:
    ~5.5 ns per 64-bit number here). "pcg64": torch's generator draws one 128-bit seed, and numpy's
    PCG64DXSM generator seeded with it fills the tensor (~1.4 ns per 64-bit number, measured on the
    2-core Xeon of 2026-12-03: 4.1 ms against torch's 16.6 ms for 3 million). Either way the stream
    depends only on torch's generator state, so `torch.manual_seed` and a checkpoint's saved RNG state
    reproduce the masks exactly, whatever the thread count.
    """
    dtype, _ = DRAWS[draw]
    # The whole range, so every 16-bit part is uniform (torch draws v % (2^k - 1) + low: one value never,
    # one twice; a bias of 2^-k).
    low = torch.iinfo(dtype).min
    if draw != "pcg64":
        return torch.randint(low, -low - 1, (count,), dtype=dtype)
    words = torch.randint(low, -low - 1, (2,), dtype=torch.int64).tolist()
    seed = ((words[0] & (2**64 - 1)) << 64) | (words[1] & (2**64 - 1))
    return torch.from_numpy(np.random.PCG64DXSM(seed).random_raw(count).view(np.int64))


def dropout_mask(x: torch.Tensor, p: float, draw: str = "pcg64") -> tuple[torch.Tensor, float]:
    """`fast_dropout`'s mask for `x` and the factor of the kept elements: (keep, 1 / (1 - p')), a uint8
    tensor of x's shape holding 1 (kept) or 0 and p' = p rounded to k / 65536. A p' of 1 gives an all-zero
    mask and factor 0 without drawing; otherwise ceil(n / 4) 64-bit numbers (`draw="int32"`: ceil(n / 2)
    32-bit numbers, as before the 64-bit draws) come from `random_bits`, each split in 16-bit parts. The
    mask is the comparison's bool result viewed as uint8 (no copy): a float tensor times a uint8 one runs
    vectorised, times a bool one converts the bool to float first -- 3.4x slower for a (640, 1536) float32
    product on 2 Zen 5 threads, the same numbers -- and both beat `masked_fill` and `torch.where` here."""
    if not 0 <= p <= 1:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    dropped = int(round(p * 65536))  # of every 65536 elements, on average
    if dropped == 65536:
        return torch.zeros(x.shape, dtype=torch.uint8, device=x.device), 0.0
    n = x.numel()
    threshold = dropped - 32768  # int16 draws are uniform on [-32768, 32767]
    _, per_draw = DRAWS[draw]
    bits = random_bits((n + per_draw - 1) // per_draw, draw).to(x.device)
    keep = bits.view(torch.int16)[:n].view(x.shape) >= threshold  # P(keep) = 1 - dropped / 65536
    return keep.view(torch.uint8), 65536 / (65536 - dropped)


class FastDropout(nn.Dropout):
    """`nn.Dropout` whose CPU training mask costs a quarter of a 64-bit PCG64 draw per element (see module doc)."""

    draw = "pcg64"  # dropout_mask's draw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu" or self.inplace or not x.is_floating_point():
            return F.dropout(x, self.p, self.training, self.inplace)
        return fast_dropout(x, self.p, self.draw)


class FastDropoutInt64(FastDropout):
    """`FastDropout` drawing its 64-bit numbers from torch's generator, as lorafit did before the PCG64 draws:
    a run whose compute.json records `dropout_draw: int64` resumes with it (job.cpu_kernels), keeping its masks."""

    draw = "int64"


class FastDropoutInt32(FastDropout):
    """`FastDropout` drawing one 32-bit number per two elements, as lorafit did before its 64-bit draws: a
    run whose compute.json predates them resumes with it (job.cpu_kernels), keeping its dropout masks."""

    draw = "int32"


#: The FastDropout class of each draw: a resumed run replays the one its compute.json records.
DROPOUT_BY_DRAW = {cls.draw: cls for cls in (FastDropout, FastDropoutInt64, FastDropoutInt32)}


def _swap(model: nn.Module, source: type, target: type) -> list[nn.Module]:
    """Give every module of exactly class `source` the class `target`; returns the modules switched.
    `source` and `target` are an `nn` class and its lorafit subclass: the same parameters, buffers and
    state_dict keys, so only the forward changes."""
    switched = [module for module in model.modules() if type(module) is source]
    for module in switched:
        module.__class__ = target
    return switched


def use_fast_dropout(model: nn.Module, enable: bool = True) -> int:
    """Switch every plain `nn.Dropout` of `model` to `FastDropout` (or every `FastDropout`, of any draw, back);
    returns how many changed. The unrecorded switch: loading and training use `use_fast_paths`."""
    if enable:
        return len(_swap(model, nn.Dropout, FastDropout))
    return sum(len(_swap(model, cls, nn.Dropout)) for cls in DROPOUT_BY_DRAW.values())


@dataclass(eq=False)
class FastPaths:
    """The CPU fast paths `use_fast_paths` switched on in one model, and the way back.

    `counts`: layers switched, by kind (`onednn_linear`, `fast_dropout`; `fused_lora` from
    fused_lora.use_fused_lora, with `shared_lora_inputs` (1) where it shares inputs; `attention_dropout`, configs switched, from
    attention_dropout.use_attention_dropout, present with 0 for a model without "sdpa" attention); a kind
    is present when it was asked for and usable here,
    even if the model had no such layer -- except `fused_lora`, present only for a model with peft LoRA
    linears. summary.json records it as `cpu_fast_paths`. `undo()` (or leaving `with fast:`) gives every
    switched module its stock class back and runs what `on_undo` was given, latest first; parameters,
    buffers and state_dict keys were never touched, so the model computes exactly as before the switch.
    Undoing twice does nothing.
    """

    counts: dict[str, int] = field(default_factory=dict)
    switched: list[tuple[nn.Module, type]] = field(default_factory=list, repr=False)  # (module, its stock class)
    undos: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def on_undo(self, action: Callable[[], None]) -> None:
        """Run `action` when the fast paths are undone (a switch that is not a class change)."""
        self.undos.append(action)

    def switch(self, model: nn.Module, kind: str, source: type, target: type) -> None:
        """Give every module of exactly class `source` the class `target` (its subclass), recorded under `kind`."""
        modules = _swap(model, source, target)
        self.switched += [(module, source) for module in modules]
        self.counts[kind] = len(modules)

    def undo(self) -> None:
        while self.switched:
            module, stock = self.switched.pop()
            module.__class__ = stock
            forget_casts(module)  # what CastOnceLinear and the fused LoRA path kept
        while self.undos:
            self.undos.pop()()

    def __enter__(self) -> FastPaths:
        return self

    def __exit__(self, *exc) -> None:
        self.undo()


def use_fast_paths(model: nn.Module, device: torch.device, dropout: bool = True,
                   onednn: bool | None = None) -> FastPaths:
    """Switch `model` to the CPU fast paths on `device`; returns what was switched, to log or undo.

    oneDNN linears where `decide` finds them correct and faster here, or, when `onednn` is given (the
    decision a run being resumed recorded), as told, without timing: asked for but unusable here
    (op missing, or disagreeing with F.linear), PyTorch's linear is kept with a warning. Fast dropout
    masks when `dropout`. Nothing is switched off the CPU. (Training adds the fused LoRA linears,
    lorafit/fused_lora.py's `use_fused_lora`, to the same record.) Before any oneDNN call, oneDNN's
    primitive cache is capped (`PRIMITIVE_CACHE_CAPACITY`; see `_cap_primitive_cache`).
    """
    fast = FastPaths()
    if device.type != "cpu":
        return fast
    if onednn is None:
        onednn = decide(torch.get_num_threads())["onednn_linear"]
    elif onednn and (problem := _problem()) is not None:
        log.warning("oneDNN linear layers were asked for, but %s here: PyTorch's F.linear is used instead "
                    "(the same results up to float rounding)", problem)
        onednn = False
    if onednn:
        fast.switch(model, "onednn_linear", nn.Linear, OneDnnLinear)
    if dropout:
        fast.switch(model, "fast_dropout", nn.Dropout, FastDropout)
    return fast
