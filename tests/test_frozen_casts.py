"""Frozen weights cast to the autocast dtype once (lorafit/frozen_casts.py): autocast's numbers, one cast."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lorafit.frozen_casts import CastOnceLinear

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


class Casts:
    """Counts the dtype casts (aten::_to_copy, autocast's own included) of tensors shaped `shape` run inside it."""

    def __init__(self, shape: torch.Size):
        self.shape, self.count = list(shape), 0

    def __enter__(self) -> Casts:
        self.profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True)
        self.profile.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.profile.__exit__(*exc)
        self.count = sum(e.name == "aten::_to_copy" and e.input_shapes[:1] == [self.shape] for e in self.profile.events())


def _layers(bias: bool = True) -> tuple[nn.Linear, CastOnceLinear]:
    """A frozen nn.Linear and a copy of it switched to CastOnceLinear."""
    torch.manual_seed(0)
    stock = nn.Linear(24, 40, bias=bias).requires_grad_(False)
    once = copy.deepcopy(stock)
    once.__class__ = CastOnceLinear
    return stock, once


@pytest.mark.parametrize("bias", [True, False])
def test_under_bf16_autocast_a_frozen_weight_is_cast_once_and_the_outputs_are_autocasts_to_the_bit(bias):
    stock, once = _layers(bias)
    x = torch.randn(3, 5, 24)
    with torch.autocast(**BF16), torch.inference_mode():
        with Casts(stock.weight.shape) as casts:
            expected = [stock(x), stock(x)]
        assert casts.count == 2  # autocast alone casts the frozen weight at every call
        with Casts(once.weight.shape) as casts:
            got = [once(x), once(x), once(x)]
        assert casts.count == 1
    for u in got:
        assert u.dtype == torch.bfloat16 and torch.equal(u, expected[0])


def test_a_weight_changed_in_place_replaced_or_loaded_is_cast_again():
    stock, once = _layers()
    x = torch.randn(7, 24)

    def same() -> bool:
        with torch.autocast(**BF16):
            return torch.equal(once(x), stock(x))

    assert same()
    with torch.no_grad():
        for layer in (stock, once):
            layer.weight.mul_(-2)  # in place: the parameter's version moves
            layer.bias.add_(1)
    assert same()
    new = {k: torch.randn_like(v) for k, v in stock.state_dict().items()}
    stock.load_state_dict(new), once.load_state_dict(new)
    assert same()
    stock.weight.data, once.weight.data = new["weight"] * 3, new["weight"] * 3  # another tensor (as .to(device) makes)
    assert same()


def test_a_trainable_weight_is_cast_at_every_call_and_trains_as_with_autocast():
    stock, once = _layers()
    stock.requires_grad_(True), once.requires_grad_(True)
    x = torch.randn(7, 24)
    with torch.autocast(**BF16):
        stock(x).float().square().sum().backward()
        once(x).float().square().sum().backward()
    assert "_lorafit_casts" not in once.__dict__ or "weight" not in once.__dict__["_lorafit_casts"]
    assert torch.equal(once.weight.grad, stock.weight.grad) and torch.equal(once.bias.grad, stock.bias.grad)


def test_a_cast_kept_in_inference_mode_serves_a_training_forward_and_float32_is_untouched():
    """Prediction (inference mode) may make the kept cast; a later forward whose input needs a gradient saves
    it for backward, which an inference-mode tensor would refuse."""
    stock, once = _layers()
    x = torch.randn(7, 24)
    with torch.autocast(**BF16), torch.inference_mode():
        once(x)
    grads = []
    for layer in (stock, once):
        xx = x.clone().requires_grad_(True)
        with torch.autocast(**BF16):
            layer(xx).float().square().sum().backward()
        grads.append(xx.grad)
    assert torch.equal(*grads)
    with Casts(once.weight.shape) as casts:  # no autocast: float32, no cast at all
        assert torch.equal(once(x), stock(x)) and once(x).dtype == torch.float32
    assert casts.count == 0


def test_weights_made_in_inference_mode_are_cast_per_call_and_undoing_the_switch_forgets_the_casts():
    """A model built inside inference mode has inference tensors (no version counter to watch): cast at every
    call, as autocast does. FastPaths.undo drops what the switched layers kept (kernels.FastPaths)."""
    from lorafit.kernels import FastPaths

    x = torch.randn(7, 24)
    with torch.inference_mode():
        stock, once = _layers()
        with torch.autocast(**BF16):
            assert torch.equal(once(x), stock(x))
    assert "_lorafit_casts" not in once.__dict__
    stock = _layers()[0]
    plain = copy.deepcopy(stock)
    model = nn.Sequential(plain)
    fast = FastPaths()
    fast.switch(model, "cast_once_linear", nn.Linear, CastOnceLinear)
    with torch.autocast(**BF16):
        assert torch.equal(model(x), stock(x))
    assert "_lorafit_casts" in plain.__dict__
    fast.undo()
    assert type(plain) is nn.Linear and "_lorafit_casts" not in plain.__dict__
