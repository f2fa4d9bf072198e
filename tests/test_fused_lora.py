"""The fused LoRA linear (lorafit/fused_lora.py): peft's numbers, peft's random draws, peft's fallbacks."""

from __future__ import annotations

import contextlib
import copy
import importlib
import types

import peft
import pytest
import torch
from torch import nn

from lorafit import kernels
from lorafit.fused_lora import FusedLoraLinear, use_fused_lora

pytestmark = pytest.mark.skipif(not kernels.onednn_available(), reason="this PyTorch build has no oneDNN")


class Block(nn.Module):
    """Two layers named like BERT's, the second fed the first's output (so dx of the first is used)."""

    def __init__(self, width: int = 24, inner: int = 40):
        super().__init__()
        self.query = nn.Linear(width, inner)
        self.value = nn.Linear(inner, width, bias=False)

    def forward(self, x):
        return self.value(torch.tanh(self.query(x)))


def _peft_block(seed: int = 0, dropout: float = 0.1, block: type = None, alpha: int = 12, **lora) -> nn.Module:
    """A LoRA-adapted `Block` (or `block`) with non-zero B (peft starts B at zero, which would hide dB A and dh)."""
    block = block or Block
    torch.manual_seed(seed)
    targets = ["query", "key", "value"] if block is QKV else ["query", "value"]
    config = peft.LoraConfig(r=4, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, **lora)
    model = peft.get_peft_model(block(), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return model


def _fast(model: nn.Module, onednn: bool, fused: bool, dropout: bool = True) -> kernels.FastPaths:
    """The training-time switch (job.cpu_kernels): the CPU fast paths, then the fused LoRA linears when `fused`."""
    fast = kernels.use_fast_paths(model, torch.device("cpu"), onednn=onednn, dropout=dropout)
    return use_fused_lora(model, fast) if fused else fast


def _forward_backward(model: nn.Module, x: torch.Tensor, seed: int) -> tuple[torch.Tensor, ...]:
    """(y, dx, d every trainable parameter, the next number of the random stream)."""
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    y = model(x)
    g = torch.linspace(-1, 1, y.numel()).reshape(y.shape)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(y, [x, *params], g, allow_unused=True)  # merged adapters take no gradient
    grads = [torch.zeros(1) if d is None else d for d in grads]
    return (y.detach(), *grads, torch.randint(0, 2**30, (1,)).float())


def _close(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...], tol: float = 1e-5) -> None:
    assert len(a) == len(b)
    for i, (u, v) in enumerate(zip(a, b, strict=True)):
        scale = v.abs().max().clamp_min(1e-30)
        assert float((u - v).abs().max() / scale) <= tol, f"output {i} differs by {float((u - v).abs().max()):.2e}"


@pytest.mark.parametrize("onednn", [True, False])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(7, 24), (3, 5, 24)])
def test_fused_matches_peft_in_outputs_gradients_and_random_draws(onednn, training, shape):
    stock = _peft_block()
    fused = copy.deepcopy(stock)
    _fast(stock, onednn, fused=False)
    switched = _fast(fused, onednn, fused=True)
    assert switched.counts["fused_lora"] == 2
    assert all(type(m) is FusedLoraLinear for m in fused.modules() if isinstance(m, peft.tuners.lora.LoraLayer))
    stock.train(training), fused.train(training)
    x = torch.randn(shape)
    expected, got = _forward_backward(stock, x, seed=3), _forward_backward(fused, x, seed=3)
    _close(got, expected)
    # The same dropout masks: a third seed's outputs differ from seed 3's when dropout is on, and match across paths.
    if training:
        other = _forward_backward(stock, x, seed=4)
        assert not torch.allclose(other[0], expected[0])
        _close(_forward_backward(fused, x, seed=4), other)


def test_without_dropout_and_without_input_gradient():
    stock = _peft_block(dropout=0.0)
    fused = copy.deepcopy(stock)
    _fast(stock, True, fused=False), _fast(fused, True, fused=True)
    x = torch.randn(6, 24)  # no gradient wanted for x: only A and B's
    g = torch.randn(6, 24)
    out = []
    for model in (stock, fused):
        y = model(x)
        out.append((y.detach(), *torch.autograd.grad(y, [p for p in model.parameters() if p.requires_grad], g)))
    _close(out[1], out[0])
    with torch.no_grad():
        _close((fused(x),), (stock(x),))


@contextlib.contextmanager
def _fusable_calls():
    """What every `FusedLoraLinear._fusable` call returned inside the block (None: peft's path)."""
    calls = []
    original = FusedLoraLinear._fusable

    def spy(self, *args):
        calls.append(original(self, *args))
        return calls[-1]

    FusedLoraLinear._fusable = spy
    try:
        yield calls
    finally:
        FusedLoraLinear._fusable = original


@pytest.mark.parametrize("case", ["dora", "nn_dropout", "merged", "two_adapters", "disabled", "fp16_autocast",
                                  "trainable_base"])
def test_what_the_fused_path_does_not_cover_runs_peft_exactly(case):
    stock = _peft_block(use_dora=(case == "dora"))
    fused = copy.deepcopy(stock)
    dropout = case != "nn_dropout"  # without the fast dropout, peft's nn.Dropout (a Bernoulli stream) stays
    _fast(stock, False, fused=False, dropout=dropout)
    _fast(fused, False, fused=True, dropout=dropout)
    x = torch.randn(5, 24)
    for model in (stock, fused):
        if case == "merged":
            model.merge_adapter()
        elif case == "two_adapters":
            torch.manual_seed(5)  # the second adapter's A starts alike in both models
            model.add_adapter("second", peft.LoraConfig(r=2, target_modules=["query", "value"]))
            model.base_model.set_adapter(["default", "second"])
        elif case == "disabled":
            model.base_model.disable_adapter_layers()
        elif case == "trainable_base":
            for layer in (model.base_model.model.query, model.base_model.model.value):
                layer.base_layer.weight.requires_grad_(True)
    with _fusable_calls() as calls:
        if case == "fp16_autocast":  # bf16 is the one autocast dtype the fused path computes in (below)
            with torch.autocast("cpu", dtype=torch.float16):
                expected, got = _forward_backward(stock, x, 1), _forward_backward(fused, x, 1)
        else:
            expected, got = _forward_backward(stock, x, 1), _forward_backward(fused, x, 1)
    assert calls and all(c is None for c in calls), "the fused path ran where it should have left it to peft"
    for u, v in zip(got, expected, strict=True):
        assert torch.equal(u, v)


@pytest.mark.parametrize("onednn", [True, False])
@pytest.mark.parametrize("shape", [(7, 24), (3, 5, 24)])
def test_under_bf16_autocast_the_fused_path_computes_peft_in_bf16(onednn, shape):
    """train.precision=bf16 on CPU: the fused path runs (bf16 products, bf16 output as autocast's linear
    gives), with peft-under-autocast's numbers up to bf16 rounding, float32 gradients for float32
    parameters and input, and the same dropout draws. The tolerance (3% of the largest value) is
    bf16's rounding of a few operands; a missing scale, mask or term moves the outputs by far more."""
    stock = _peft_block()
    fused = copy.deepcopy(stock)
    _fast(stock, onednn, fused=False), _fast(fused, onednn, fused=True)
    x = torch.randn(shape)
    with _fusable_calls() as calls, torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = _forward_backward(stock, x, 3), _forward_backward(fused, x, 3)
        other = _forward_backward(stock, x, 4)
        got_other = _forward_backward(fused, x, 4)
        y = fused(x.clone())
    assert calls and all(c == "default" for c in calls), "the fused path left bf16 autocast to peft"
    assert y.dtype == torch.bfloat16  # as autocast's linear returns
    assert [t.dtype for t in got] == [t.dtype for t in expected]  # float32 gradients of x, A and B
    _close(got, expected, tol=3e-2)
    assert not torch.allclose(other[0].float(), expected[0].float(), atol=0.05)  # seed 4's masks differ from seed 3's...
    _close(got_other, other, tol=3e-2)  # ...and match across paths
    assert torch.equal(got[-1], expected[-1])  # the random stream's next draw: the same number of draws
    # Against float32 without autocast: bf16 rounding only (a wrong bf16 path would also pass the
    # comparison with peft above only if peft were wrong in the same way).
    _close(got[:-1], _forward_backward(copy.deepcopy(stock), x, 3)[:-1], tol=3e-2)


def test_under_bf16_autocast_the_fused_path_casts_the_frozen_base_weight_once():
    """The base weight's bf16 cast is kept between steps (frozen_casts.py); the adapter's trainable A and B are
    cast at every call, so their gradients reach them; the numbers are those of a fresh cast every step."""
    from test_frozen_casts import Casts

    from lorafit.frozen_casts import forget_casts

    fused = _peft_block()
    _fast(fused, False, fused=True)
    fresh = copy.deepcopy(fused)  # its kept casts are thrown away before every step below
    base = fused.base_model.model.query.base_layer.weight
    x = torch.randn(7, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with Casts(base.shape) as casts:
            got = [_forward_backward(fused, x, seed) for seed in (3, 4, 5)]
        assert casts.count == 1
        lora_a = fused.base_model.model.query.lora_A["default"].weight
        with Casts(lora_a.shape) as casts:
            _forward_backward(fused, x, 6)
        assert casts.count == 1 + 1  # forward, and backward's cast of the gradient back to float32
        expected = []
        for seed in (3, 4, 5):
            forget_casts(fresh)
            expected.append(_forward_backward(fresh, x, seed))
    for u, v in zip(got, expected, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(u, v, strict=True))


def test_undo_gives_peft_its_class_back_and_saved_adapters_are_unchanged(tmp_path):
    model = _peft_block()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with _fast(model, True, fused=True):
        assert sum(type(m) is FusedLoraLinear for m in model.modules()) == 2
        assert model.state_dict().keys() == before.keys()
        model.save_pretrained(str(tmp_path / "adapter"))
    assert not any(type(m) is FusedLoraLinear for m in model.modules())
    loaded = peft.PeftModel.from_pretrained(Block(), str(tmp_path / "adapter"))
    for name, value in peft.get_peft_model_state_dict(model).items():
        assert torch.equal(peft.get_peft_model_state_dict(loaded)[name], value)


def test_dropout_that_drops_everything_leaves_the_base_layer():
    stock = _peft_block(dropout=0.5)
    fused = copy.deepcopy(stock)
    for model in (stock, fused):
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 1.0
    _fast(stock, True, fused=False), _fast(fused, True, fused=True)
    x = torch.randn(4, 24)
    _close(_forward_backward(fused, x, 0), _forward_backward(stock, x, 0))


@pytest.mark.parametrize("recorded, fused, draw, shared", [
    (None, True, "pcg64", True),
    ({"onednn_linear": True, "fused_lora": True, "shared_lora_inputs": True, "dropout_draw": "pcg64"}, True, "pcg64", True),
    ({"onednn_linear": True, "fused_lora": True, "dropout_draw": "pcg64"}, True, "pcg64", False),
    ({"onednn_linear": True, "fused_lora": True, "dropout_draw": "int64"}, True, "int64", False),
    ({"onednn_linear": True, "fused_lora": True}, True, "int32", False), ({"onednn_linear": True}, False, "int32", False)])
def test_training_fuses_new_runs_and_resumes_old_ones_as_they_started(recorded, fused, draw, shared):
    """job.cpu_kernels: a new run fuses and draws PCG64 dropout numbers, and records both; a run resumed from
    a compute.json written before the fused path existed (no `fused_lora` entry) continues with peft's layers,
    the summation order it began with, one written before the PCG64 draws (`dropout_draw: int64`) with
    torch's 64-bit draws, and one written before the 64-bit draws (no `dropout_draw`) with 32-bit draws,
    the masks it began with -- through the fused path's dropout too."""
    from lorafit import job
    from lorafit.distributed import World

    model = _peft_block()
    cfg = types.SimpleNamespace(train=types.SimpleNamespace(cpu_kernels="auto"))
    counts, choice = job.cpu_kernels(cfg, model, torch.device("cpu"), World.from_env(), recorded)
    assert choice["fused_lora"] is fused and ("fused_lora" in counts) is fused
    assert any(type(m) is FusedLoraLinear for m in model.modules()) is fused
    assert choice["dropout_draw"] == draw
    assert ("attention_dropout" in counts) is (draw == "pcg64")  # older draws keep SDPA's attention masks
    assert choice["shared_lora_inputs"] is shared and ("shared_lora_inputs" in counts) is shared
    assert all(getattr(m, "share_inputs", False) is shared for m in model.modules() if type(m) is FusedLoraLinear)
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert dropouts and all(type(m).draw == draw for m in dropouts)
    if fused:  # the fused layer draws as its dropout module does: peft's forward through that module agrees
        model.train()
        layer = next(m for m in model.modules() if type(m) is FusedLoraLinear)
        x = torch.randn(5, layer.in_features)
        torch.manual_seed(7)
        y = layer(x)
        torch.manual_seed(7)
        torch.testing.assert_close(y, peft.tuners.lora.layer.Linear.forward(layer, x), rtol=1e-5, atol=1e-6)


class QKV(nn.Module):
    """Three linears reading one input, as BERT's query, key and value do."""

    def __init__(self, width: int = 24):
        super().__init__()
        self.query, self.key, self.value = (nn.Linear(width, width) for _ in range(3))

    def forward(self, x):
        return torch.cat([self.query(x), self.key(x), self.value(x)], dim=-1)


@pytest.mark.parametrize("bf16", [False, True])
def test_shared_inputs_draw_one_mask_for_query_key_and_value(bf16):
    """use_fused_lora(share_inputs=True): linears called on the same tensor share its cast and one dropout mask,
    drawn once from the random stream: the function of one LoRA of rank 3r on a fused QKV projection."""
    model = _peft_block(dropout=0.25, block=QKV, alpha=8)
    shared = copy.deepcopy(model)
    fast = _fast(shared, False, fused=False)
    use_fused_lora(shared, fast, share_inputs=True)
    assert fast.counts["shared_lora_inputs"] == 1
    shared.train()
    x = torch.randn(2, 5, 24, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        torch.manual_seed(4)
        y = shared(x)
        after = torch.rand(1)
    torch.manual_seed(4)
    keep, scale = kernels.dropout_mask(torch.empty(10, 24), 0.25)
    assert torch.equal(torch.rand(1), after)  # one mask drawn, not three
    # The same function written out with that one mask, on the same (bf16-cast) operands.
    cast = (lambda t: t.bfloat16()) if bf16 else (lambda t: t)
    x_ref = x.detach().clone().requires_grad_(True)
    dropped = cast(x_ref.reshape(10, 24)) * keep * scale
    outs = []
    for name in ("query", "key", "value"):
        layer = getattr(model.base_model.model, name)
        a, b = cast(layer.lora_A["default"].weight), cast(layer.lora_B["default"].weight)
        base = cast(x_ref.reshape(10, 24)) @ cast(layer.base_layer.weight).t() + cast(layer.base_layer.bias)
        outs.append((base + (dropped @ a.t()) @ b.t() * layer.scaling["default"]).reshape(2, 5, 24))
    ref = torch.cat(outs, dim=-1)
    tol = dict(rtol=2e-2, atol=2e-2) if bf16 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y.float(), ref.float(), **tol)
    g = torch.linspace(-1, 1, y.numel()).reshape(y.shape)
    (y.float() * g).sum().backward()
    (ref.float() * g).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, **tol)
    for name in ("query", "key", "value"):
        ours = getattr(shared.base_model.model, name).lora_A["default"].weight.grad
        theirs = getattr(model.base_model.model, name).lora_A["default"].weight.grad
        torch.testing.assert_close(ours, theirs, **tol)
    fast.undo()
    assert not any("share_inputs" in vars(m) for m in shared.modules())


def test_shared_inputs_redraw_for_another_tensor_or_an_in_place_change(monkeypatch):
    model = _peft_block(dropout=0.25, block=QKV, alpha=8)
    use_fused_lora(model, _fast(model, False, fused=False), share_inputs=True)
    model.train()
    layers = [getattr(model.base_model.model, n) for n in ("query", "key", "value")]
    draws = []
    real = kernels.dropout_mask

    def counting(x, p, draw="pcg64"):
        draws.append(x.shape)
        return real(x, p, draw)

    monkeypatch.setattr(importlib.import_module("lorafit.fused_lora"), "dropout_mask", counting)
    x = torch.randn(6, 24)
    layers[0](x), layers[1](x)
    assert len(draws) == 1
    layers[2](x.clone())  # another tensor with the same values: its own mask
    assert len(draws) == 2
    x.add_(1.0)  # changed in place since: a new mask
    layers[0](x)
    assert len(draws) == 3
    layers[1].lora_dropout["default"].p = 0.5  # other dropout: its own mask
    layers[1](x)
    assert len(draws) == 4
    x = torch.randn(6, 24, requires_grad=True)
    with torch.no_grad():  # another grad mode: what was made without grad must not feed a graph
        layers[0](x)
    assert len(draws) == 5
    layers[2](x).sum().backward()  # (layers[1]'s dropout differs now)
    assert len(draws) == 6 and x.grad is not None and x.grad.abs().sum() > 0
    unshared = _peft_block(dropout=0.25, block=QKV, alpha=8)
    use_fused_lora(unshared, _fast(unshared, False, fused=False))
    unshared.train()
    for name in ("query", "key", "value"):
        getattr(unshared.base_model.model, name)(x)
    assert len(draws) == 9  # without share_inputs (runs begun before it): one mask per linear


def test_a_run_recording_an_unknown_draw_is_refused_in_one_line():
    from lorafit import job
    from lorafit.distributed import World
    from lorafit.errors import UserError

    cfg = types.SimpleNamespace(train=types.SimpleNamespace(cpu_kernels="auto"))
    with pytest.raises(UserError, match="dropout draws 'philox9'.*resume it with the lorafit version that started it"):
        job.cpu_kernels(cfg, _peft_block(), torch.device("cpu"), World.from_env(),
                        {"onednn_linear": False, "fused_lora": True, "dropout_draw": "philox9"})
