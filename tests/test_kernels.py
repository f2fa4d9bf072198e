"""CPU fast paths (lorafit/kernels.py): the same numbers as PyTorch's own layers, within stated tolerances."""

from __future__ import annotations

import json
import logging
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

import lorafit
from conftest import build_tiny_encoder, tiny_overrides
from lorafit import hardware, kernels
from lorafit.config import load_config
from lorafit.batching import collate
from lorafit.inference import load_model
from lorafit.rundir import RunDir
from lorafit.train import train

pytestmark = pytest.mark.skipif(not kernels.onednn_available(), reason="this PyTorch build has no oneDNN")


def _layout(shape: tuple[int, ...], layout: str, requires_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(leaf, view): random values of `shape` laid out as `layout` in memory; gradients are taken at the leaf."""
    if layout == "transposed":  # every stride reversed: (1, ..., rows*...) like x.t() of a row-major block
        leaf = torch.randn(shape[::-1], requires_grad=requires_grad)
        return leaf, leaf.permute(*reversed(range(len(shape))))
    if layout == "sliced":  # every other column, starting at an offset: not dense in memory
        leaf = torch.randn(*shape[:-1], 2 * shape[-1] + 1, requires_grad=requires_grad)
        return leaf, leaf[..., 1::2]
    if layout == "expanded":  # one row repeated by stride 0, as `y.sum().backward()` sends upstream
        leaf = torch.randn(*(1,) * (len(shape) - 1), shape[-1], requires_grad=requires_grad)
        return leaf, leaf.expand(shape)
    leaf = torch.randn(shape, requires_grad=requires_grad)
    return leaf, leaf


def _forward_backward(layer: nn.Module, leaf: torch.Tensor, x: torch.Tensor, g: torch.Tensor) -> list[torch.Tensor | None]:
    """[y, d leaf, d every trainable parameter] (gradients None where nothing needs one)."""
    y = layer(x)
    wanted = [leaf] + [p for p in layer.parameters()]
    wanted = [t for t in wanted if t.requires_grad]
    if not wanted:
        assert not y.requires_grad
        return [y.detach()]
    assert y.requires_grad, "a tensor needs a gradient but the output has no autograd history"
    return [y.detach(), *torch.autograd.grad(y, wanted, g)]


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 70), extra=st.integers(0, 3), n_in=st.integers(1, 96), n_out=st.integers(1, 96),
       bias=st.booleans(), trains=st.sampled_from(["nothing", "bias", "weight", "all"]), x_grad=st.booleans(),
       x_layout=st.sampled_from(["contiguous", "transposed", "sliced"]),
       g_layout=st.sampled_from(["contiguous", "transposed", "sliced", "expanded"]), seed=st.integers(0, 2**16))
# BitFit / peft bias="all": frozen weight, an input without gradient, a trainable bias.
@example(rows=5, extra=0, n_in=7, n_out=3, bias=True, trains="bias", x_grad=False, x_layout="contiguous",
         g_layout="contiguous", seed=0)
@example(rows=6, extra=2, n_in=9, n_out=4, bias=True, trains="bias", x_grad=False, x_layout="transposed",
         g_layout="expanded", seed=1)
def test_onednn_linear_matches_f_linear_forward_and_backward(rows, extra, n_in, n_out, bias, trains, x_grad, x_layout,
                                                            g_layout, seed):
    torch.manual_seed(seed)
    stock = nn.Linear(n_in, n_out, bias=bias)
    stock.weight.requires_grad_(trains in ("weight", "all"))
    if bias:
        stock.bias.requires_grad_(trains in ("bias", "all"))
    fast = nn.Linear(n_in, n_out, bias=bias)
    fast.load_state_dict(stock.state_dict())
    for a, b in zip(stock.parameters(), fast.parameters(), strict=True):
        b.requires_grad_(a.requires_grad)
    assert kernels.use_onednn_linear(fast) == 1 and type(fast) is kernels.OneDnnLinear
    shape = (rows, extra, n_in) if extra else (rows, n_in)
    leaf, x = _layout(shape, x_layout, requires_grad=x_grad)
    _, g = _layout((*shape[:-1], n_out), g_layout)
    expected, got = _forward_backward(stock, leaf, x, g), _forward_backward(fast, leaf, x, g)
    assert len(got) == len(expected)
    for a, b in zip(expected, got, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * max(1.0, float(a.abs().max())))
    with torch.no_grad():  # the inference branch (no autograd function)
        torch.testing.assert_close(fast(x), stock(x), rtol=1e-5, atol=1e-5)


def test_onednn_linear_falls_back_where_it_does_not_apply():
    layer = nn.Linear(8, 4).double()
    kernels.use_onednn_linear(layer)
    x = torch.randn(3, 8, dtype=torch.float64)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))  # float64: PyTorch's own kernel
    assert kernels.use_onednn_linear(layer, enable=False) == 1 and type(layer) is nn.Linear


def test_fast_dropout_has_the_dropout_distribution():
    torch.manual_seed(0)
    x = torch.ones(1_000_000)
    for p in (0.1, 0.25, 0.5):
        y = kernels.fast_dropout(x, p)
        dropped = float((y == 0).float().mean())
        assert abs(dropped - p) < 0.003, (p, dropped)  # binomial sd at 1e6 draws: 0.0005
        assert float(y.mean()) == pytest.approx(1.0, abs=0.005)  # inverted dropout keeps the mean
        values = torch.unique(y).tolist()
        assert len(values) == 2 and values[0] == 0.0 and values[1] == pytest.approx(1 / (1 - p), rel=1e-4)
    # Same seed, same mask; the module is the identity in eval mode and passes gradients through the mask.
    layer = nn.Dropout(0.3)
    kernels.use_fast_dropout(layer)
    torch.manual_seed(1)
    a = layer(torch.ones(64, 32))
    torch.manual_seed(1)
    assert torch.equal(layer(torch.ones(64, 32)), a)
    x = torch.randn(64, 32, requires_grad=True)
    torch.manual_seed(2)
    y = layer(x)
    y.sum().backward()
    torch.testing.assert_close(x.grad, (y != 0).float() / 0.7, rtol=1e-4, atol=0)
    layer.eval()
    assert torch.equal(layer(x), x)
    # Masks at different positions are independent: neighbouring elements drop together at rate p^2.
    torch.manual_seed(3)
    kept = kernels.fast_dropout(torch.ones(1_000_000), 0.5) != 0
    both = float((~kept[0::2] & ~kept[1::2]).float().mean())
    assert abs(both - 0.25) < 0.004


def _torch_or_pcg64_bits(draw: str, count: int) -> torch.Tensor:
    """What dropout_mask should draw, written out: torch.randint for the replayed draws; for "pcg64", two
    int64 words from torch's generator as a 128-bit seed of numpy's PCG64DXSM, which fills the tensor."""
    if draw != "pcg64":
        dtype = torch.int64 if draw == "int64" else torch.int32
        low = torch.iinfo(dtype).min
        return torch.randint(low, -low - 1, (count,), dtype=dtype)
    low = torch.iinfo(torch.int64).min
    high, low_word = (w % 2**64 for w in torch.randint(low, -low - 1, (2,), dtype=torch.int64).tolist())
    return torch.from_numpy(np.random.PCG64DXSM((high << 64) | low_word).random_raw(count).view(np.int64))


@pytest.mark.parametrize("draw, per_draw", [("pcg64", 4), ("int64", 4), ("int32", 2)])
def test_dropout_mask_is_a_uint8_view_of_the_drawn_comparison(draw, per_draw):
    # uint8, not bool: a float tensor times a bool one converts the bool to float first (a copy per use,
    # forward and backward); times uint8 it runs vectorised with the same numbers. The mask compares the
    # 16-bit parts of ceil(n / per_draw) full-range draws (PCG64 by default; int64 or int32 from torch's
    # generator for runs begun before).
    x = torch.randn(37, 21)  # 777 elements: not a multiple of 4 or 2
    torch.manual_seed(4)
    keep, scale = kernels.dropout_mask(x, 0.1, draw)
    assert keep.dtype == torch.uint8 and keep.shape == x.shape and set(keep.unique().tolist()) <= {0, 1}
    assert scale == pytest.approx(65536 / (65536 - 6554))
    after = torch.rand(3)
    torch.manual_seed(4)
    bits = _torch_or_pcg64_bits(draw, -(-x.numel() // per_draw))
    assert torch.equal(keep.bool(), bits.view(torch.int16)[: x.numel()].view(x.shape) >= 6554 - 32768)
    assert torch.equal(torch.rand(3), after)  # no other draw from the generator
    assert torch.equal(x * keep, x * keep.bool())
    everything, zero = kernels.dropout_mask(x, 1.0, draw)
    assert everything.dtype == torch.uint8 and not everything.any() and zero == 0.0


def test_the_default_draw_is_pcg64_seeded_from_torchs_generator():
    # Reproducible from torch's generator alone (manual_seed, a checkpoint's RNG state), whatever the
    # thread count, and each call takes a fresh seed: two calls never repeat a mask.
    assert kernels.FastDropout.draw == "pcg64" and kernels.DROPOUT_BY_DRAW["pcg64"] is kernels.FastDropout
    x = torch.ones(257, 33)
    masks = []
    for threads in (1, 2):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            torch.manual_seed(8)
            masks.append((kernels.dropout_mask(x, 0.5)[0], kernels.dropout_mask(x, 0.5)[0]))
        finally:
            torch.set_num_threads(previous)
    assert torch.equal(masks[0][0], masks[1][0]) and torch.equal(masks[0][1], masks[1][1])
    assert not torch.equal(masks[0][0], masks[0][1])
    torch.manual_seed(9)
    assert not torch.equal(kernels.dropout_mask(x, 0.5)[0], masks[0][0])


@pytest.mark.parametrize("draw", ["pcg64", "int64"])
def test_64_bit_draws_give_independent_uniform_16_bit_parts(draw):
    torch.manual_seed(5)
    x = torch.ones(4_000_000)
    keep, _ = kernels.dropout_mask(x, 0.25, draw)
    kept = keep.view(-1, 4).float()  # the four 16-bit parts of each 64-bit draw
    assert torch.allclose(kept.mean(0), torch.full((4,), 0.75), atol=0.002)  # binomial sd 0.0004
    both = (kept[:, :, None] * kept[:, None, :]).mean(0)  # P(part i and part j kept)
    off = both[~torch.eye(4, dtype=torch.bool)]
    assert torch.allclose(off, torch.full_like(off, 0.75**2), atol=0.003)
    # and consecutive 64-bit draws are independent too: part 0 of draw k with part 0 of draw k + 1
    neighbours = (kept[:-1, 0] * kept[1:, 0]).mean()
    assert abs(float(neighbours) - 0.75**2) < 0.003


@pytest.mark.parametrize("draw, cls, pinned", [
    # The masks lorafit drew after manual_seed(11) for a (3, 7) input at p 0.3: 72f6fb7 (before the
    # 64-bit draws) and c16c639 (before the PCG64 draws).
    ("int32", kernels.FastDropoutInt32, [[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 1, 1]]),
    ("int64", kernels.FastDropoutInt64, [[0, 1, 1, 0, 1, 0, 1], [0, 0, 1, 1, 1, 1, 1], [1, 1, 0, 1, 1, 1, 1]])])
def test_fast_dropout_replays_the_old_masks(draw, cls, pinned):
    torch.manual_seed(11)
    keep, scale = kernels.dropout_mask(torch.zeros(3, 7), 0.3, draw)
    assert keep.tolist() == pinned
    assert scale == 65536 / (65536 - 19661)
    assert kernels.DROPOUT_BY_DRAW[draw] is cls
    layer, old = nn.Dropout(0.3), nn.Dropout(0.3)
    kernels.use_fast_dropout(layer)
    kernels.use_fast_dropout(old)
    old.__class__ = cls
    x = torch.randn(64, 33)
    torch.manual_seed(6)
    a = old(x)
    torch.manual_seed(6)
    assert torch.equal(a, kernels.fast_dropout(x, 0.3, draw))
    torch.manual_seed(6)
    assert not torch.equal(layer(x), a)  # the default draws differ
    assert kernels.use_fast_dropout(old, enable=False) == 1 and type(old) is nn.Dropout  # any draw switches back


@pytest.mark.parametrize("p", [1 - 0.4 / 65536, 0.999999, 1 - 1e-12, 1.0])
def test_fast_dropout_with_p_that_rounds_to_one_drops_everything(p):
    # The config allows any p below 1; p within 1/131072 of 1 rounds to a keep probability of 0/65536.
    x = torch.randn(64, 32, requires_grad=True)
    y = kernels.fast_dropout(x, p)
    assert torch.equal(y, F.dropout(x, 1.0)) and torch.equal(y, torch.zeros_like(x))
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    layer = nn.Dropout(p)
    kernels.use_fast_dropout(layer)
    assert torch.equal(layer(torch.ones(8, 4)), torch.zeros(8, 4))


@settings(max_examples=40, deadline=None)
@given(p=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_fast_dropout_is_inverted_dropout_for_every_p(p, seed):
    torch.manual_seed(seed)
    x = torch.rand(4096) + 0.5
    y = kernels.fast_dropout(x, p)
    kept = y != 0
    rounded = round(p * 65536) / 65536  # the drop probability actually used
    assert torch.isfinite(y).all()
    if rounded == 1:
        assert not kept.any()
    else:
        torch.testing.assert_close(y[kept], x[kept] / (1 - rounded), rtol=1e-6, atol=0)
    if rounded == 0:
        assert kept.all()


@pytest.fixture
def fresh_decisions():
    """This test's kernel checks and decisions are made afresh and forgotten after it: a monkeypatched
    private op must not leak into (or out of) the process-wide cache."""
    kernels._problem.cache_clear()
    kernels._decide.cache_clear()
    yield
    kernels._problem.cache_clear()
    kernels._decide.cache_clear()


def _timings(stock_ms: float, onednn_ms: float):
    """A stand-in for the timing: every model shape takes these milliseconds."""
    return lambda: {kernels._shape_name(n_in, n_out): {"stock": stock_ms, "onednn": onednn_ms}
                    for n_in, n_out, _ in kernels.MODEL_SHAPES}


def _no_timing():
    raise AssertionError("the kernels were timed")


def _small_model() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.1), nn.Linear(16, 4))


def _linear_kinds(model: nn.Module) -> list[type]:
    return [type(m) for m in model.modules() if isinstance(m, nn.Linear)]


def _replace_private_op(monkeypatch, op) -> None:
    """torch.ops.mkldnn as a PyTorch would have it with `_linear_pointwise` = op (None: no such op)."""
    torch.ops.mkldnn  # noqa: B018 -- resolved lazily; monkeypatch needs the attribute to exist
    namespace = types.SimpleNamespace() if op is None else types.SimpleNamespace(_linear_pointwise=op)
    monkeypatch.setattr(torch.ops, "mkldnn", namespace)


def _raise(*args):
    raise RuntimeError("no oneDNN kernel for this CPU")


@pytest.mark.parametrize(("op", "reason"), [(None, "private op missing"), (_raise, "private op raised RuntimeError")])
def test_a_missing_or_raising_private_op_keeps_pytorchs_linear(op, reason, monkeypatch, fresh_decisions, caplog):
    _replace_private_op(monkeypatch, op)
    monkeypatch.setattr(kernels, "_time_linears", _no_timing)
    record = kernels.decide(1)
    assert record == {"onednn_linear": False, "reason": reason, "timings_ms": {}, "threads": 1,
                      "cpu": hardware.cpu_info(), "torch": torch.__version__}
    assert json.loads(json.dumps(record)) == record
    assert not kernels.onednn_available()
    model = _small_model()
    assert kernels.use_fast_paths(model, torch.device("cpu")).counts == {"fast_dropout": 1}
    assert _linear_kinds(model) == [nn.Linear, nn.Linear]
    # A resumed run whose first part used oneDNN: warned, PyTorch's linear, and it still computes.
    with caplog.at_level(logging.WARNING, logger="lorafit.kernels"):
        assert kernels.use_fast_paths(model, torch.device("cpu"), onednn=True).counts == {"fast_dropout": 0}
    assert reason in caplog.text and _linear_kinds(model) == [nn.Linear, nn.Linear]
    assert model(torch.randn(3, 8)).shape == (3, 4)


@pytest.mark.parametrize("wrong_in", ["forward", "backward"])
def test_a_private_op_that_disagrees_with_f_linear_is_refused(wrong_in, monkeypatch, fresh_decisions, caplog):
    real = torch.ops.mkldnn._linear_pointwise

    def wrong(a, b, bias, *args):
        # The backward alone passes transposed operands: so "backward" is off only in the gradients.
        off = wrong_in == "forward" or not (a.is_contiguous() and b.is_contiguous())
        return real(a, b, bias, *args) * (1.01 if off else 1.0)

    _replace_private_op(monkeypatch, wrong)
    monkeypatch.setattr(kernels, "_time_linears", _no_timing)
    record = kernels.decide(1)
    assert not record["onednn_linear"] and record["reason"].startswith("oneDNN disagrees with F.linear"), record
    model = _small_model()
    with caplog.at_level(logging.WARNING, logger="lorafit.kernels"):
        assert kernels.use_fast_paths(model, torch.device("cpu"), onednn=True, dropout=False).counts == {}
    assert "disagrees" in caplog.text and _linear_kinds(model) == [nn.Linear, nn.Linear]


@pytest.mark.parametrize(("stock_ms", "onednn_ms", "chosen", "reason"), [
    (2.0, 1.0, True, "oneDNN 2.00x faster on 3 model shapes, forward+backward"),
    (1.05, 1.0, False, "not faster (1.05x, needs 1.10x)"),
    (0.93, 1.0, False, "not faster (0.93x, needs 1.10x)"),
])
def test_decide_keeps_onednn_only_when_clearly_faster(stock_ms, onednn_ms, chosen, reason, monkeypatch, fresh_decisions):
    calls = []
    timings = _timings(stock_ms, onednn_ms)
    monkeypatch.setattr(kernels, "_time_linears", lambda: calls.append(torch.get_num_threads()) or timings())
    record = kernels.decide(1)
    assert (record["onednn_linear"], record["reason"]) == (chosen, reason)
    assert record["timings_ms"] == timings() and len(record["timings_ms"]) == 3
    record["onednn_linear"] = not chosen  # the caller's copy; the process's decision stays
    assert kernels.decide(1)["onednn_linear"] is chosen
    kernels.decide(2)
    assert calls == [1, 2]  # once per thread count, timed with that many threads
    model = _small_model()
    assert (kernels.use_fast_paths(model, torch.device("cpu"), dropout=False).counts
            == ({"onednn_linear": 2} if chosen else {}))


@pytest.mark.parametrize("onednn", [True, False])
def test_use_fast_paths_replays_a_recorded_decision_without_timing(onednn, monkeypatch, fresh_decisions):
    monkeypatch.setattr(kernels, "_time_linears", _no_timing)
    model = _small_model()
    changed = kernels.use_fast_paths(model, torch.device("cpu"), onednn=onednn).counts
    assert changed == ({"onednn_linear": 2, "fast_dropout": 1} if onednn else {"fast_dropout": 1})
    assert _linear_kinds(model) == [kernels.OneDnnLinear if onednn else nn.Linear] * 2
    assert kernels._decide.cache_info().currsize == 0
    assert kernels.use_fast_paths(_small_model(), torch.device("cuda"), onednn=onednn).counts == {}


def test_deciding_leaves_the_random_stream_alone(fresh_decisions):
    # A run seeds, then builds its model and decides: the decision's test data must not shift the
    # run's dropout masks and shuffles (or a resumed run, which does not decide, would differ).
    torch.manual_seed(0)
    record = kernels.decide(torch.get_num_threads())  # the real timing
    after = torch.rand(4)
    torch.manual_seed(0)
    assert torch.equal(torch.rand(4), after)
    assert set(record["timings_ms"]) == {kernels._shape_name(i, o) for i, o, _ in kernels.MODEL_SHAPES}
    assert all(ms > 0 for shape in record["timings_ms"].values() for ms in shape.values())
    assert record["reason"] and json.loads(json.dumps(record)) == record


def _run(tmp_path, model, data, name, kernels_mode, **extra):
    overrides = tiny_overrides(model, data, **{"train.cpu_kernels": kernels_mode, **extra})
    return train(load_config(None, overrides), tmp_path / name)


def test_training_with_fast_kernels_matches_stock_layers(tmp_path, tiny_models, tiny_data, monkeypatch, fresh_decisions):
    # The timing is made to favour oneDNN, so the test covers the fast path on every CPU.
    monkeypatch.setattr(kernels, "_time_linears", _timings(2.0, 1.0))
    no_dropout = {"method.dropout": 0.0, "model.head_dropout": 0.0}
    model = build_tiny_encoder(tmp_path / "nodrop", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    fast = _run(tmp_path, model, tiny_data, "fast", "auto", **no_dropout)
    stock = _run(tmp_path, model, tiny_data, "stock", "stock", **no_dropout)
    losses = lambda run: [r["loss"] for r in RunDir(run.path).metrics() if r["type"] == "step"]  # noqa: E731
    np.testing.assert_allclose(losses(fast), losses(stock), rtol=1e-4)
    pa, pb = (json.loads((r.path / "predictions.json").read_text()) for r in (fast, stock))
    assert pa["predicted"] == pb["predicted"]
    np.testing.assert_allclose(pa["probability"], pb["probability"], atol=1e-4)


def test_stock_kernels_stay_stock_through_training_and_evaluation(tmp_path, tiny_bert, tiny_data, monkeypatch,
                                                                 fresh_decisions):
    monkeypatch.setattr(kernels, "_time_linears", _timings(2.0, 1.0))  # oneDNN would win the timing

    def refuse(*args):
        raise AssertionError("train.cpu_kernels=stock ran a oneDNN linear")

    monkeypatch.setattr(kernels, "_mm", refuse)
    result = _run(tmp_path, tiny_bert, tiny_data, "stock", "stock", **{"train.epochs": 3})
    assert result.summary["cpu_fast_paths"] == {}


def test_loaded_runs_are_merged_and_predict_like_the_training_time_model(tmp_path, tiny_bert, tiny_data, monkeypatch,
                                                                         fresh_decisions):
    monkeypatch.setattr(kernels, "_time_linears", _timings(2.0, 1.0))
    result = _run(tmp_path, tiny_bert, tiny_data, "run", "auto")
    run = RunDir(result.path)
    cfg, labels = run.config(), run.labels()
    reference = load_model(run, cfg, labels).eval()  # peft modules, stock layers
    kernels.use_onednn_linear(reference, enable=False)
    fast = lorafit.load(result.path, device="cpu")
    assert not any("lora" in name for name, _ in fast.model.named_modules())  # merged
    assert any(type(m) is kernels.OneDnnLinear for m in fast.model.modules())
    texts = ["pizza please", "a golf trip when", "my card hotel", "soccer"]
    input_ids, attention_mask = collate(fast.tokenize(texts), fast.pad_id)
    with torch.no_grad():
        expected = reference(input_ids, attention_mask).numpy()
    np.testing.assert_allclose(fast.logits(texts), expected, rtol=1e-4, atol=1e-5)
    assert fast.evaluate(*_test_split(run))["accuracy"] == result.eval["accuracy"]


def _test_split(run: RunDir) -> tuple[list[str], list[str]]:
    from lorafit.inference import run_split

    split = run_split(run, run.config(), "test")
    return split.texts, split.labels
