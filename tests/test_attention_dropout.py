"""lorafit/attention_dropout.py: attention-probability dropout from lorafit's masks, the math path otherwise."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers import AttentionInterface, AutoModel

from conftest import build_tiny_encoder
from lorafit import attention_dropout, kernels


class _Attention(nn.Module):
    """What `attention` reads of transformers' attention modules: training, dropout, is_causal."""

    def __init__(self, p: float, cls: type = kernels.FastDropout):
        super().__init__()
        self.dropout = nn.Dropout(p)
        self.dropout.__class__ = cls
        self.is_causal = False


def _qkv(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return [torch.randn(3, 2, 7, 8, dtype=dtype, requires_grad=True) for _ in range(3)]


def _as_sdpa_passes_it(mask):
    """F.scaled_dot_product_attention turns a boolean mask into an additive one before its math path
    (which, called directly, reads a boolean mask otherwise)."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))


def _masks():
    keys = torch.tensor([[1] * 7, [1] * 5 + [0] * 2, [1] * 2 + [0] * 5], dtype=torch.bool)
    boolean = keys[:, None, None, :].expand(3, 1, 7, 7)
    additive = torch.zeros(3, 1, 7, 7).masked_fill(~boolean, torch.finfo(torch.float32).min)
    return [None, boolean, additive]


@pytest.mark.parametrize("mask", _masks(), ids=["none", "bool", "additive"])
def test_training_attention_is_the_math_path_with_lorafits_mask(mask):
    # The same function as SDPA's math path given the mask dropout_mask draws (p 0.25: exactly 16384 of
    # every 65536 dropped, so the survivors' factor is SDPA's 1 / (1 - p)), forward and backward.
    module, p, scale = _Attention(0.25).train(), 0.25, 0.3
    q, k, v = _qkv()
    torch.manual_seed(5)
    out, weights = attention_dropout.attention(module, q, k, v, mask, dropout=p, scaling=scale)
    assert weights is None and out.shape == (3, 7, 2, 8)  # (batch, tokens, heads, head size), as sdpa's
    out.mul(torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
    ours = [out.detach(), q.grad, k.grad, v.grad]
    torch.manual_seed(5)
    keep, _ = kernels.dropout_mask(torch.empty(3, 2, 7, 7), p)
    q2, k2, v2 = _qkv()
    ref = torch.ops.aten._scaled_dot_product_attention_math(q2, k2, v2, attn_mask=_as_sdpa_passes_it(mask), dropout_p=p, scale=scale,
                                                             dropout_mask=keep.bool())[0].transpose(1, 2)
    ref.mul(torch.linspace(-1, 1, ref.numel()).view(ref.shape)).sum().backward()
    for a, b in zip(ours, [ref.detach(), q2.grad, k2.grad, v2.grad]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert 0.15 < 1 - keep.float().mean() < 0.35


def test_bf16_inputs_are_computed_in_float32_and_returned_in_bf16():
    module, mask = _Attention(0.25).train(), _masks()[1]
    q, k, v = (t.detach().bfloat16() for t in _qkv())
    torch.manual_seed(6)
    out, _ = attention_dropout.attention(module, q, k, v, mask, dropout=0.25, scaling=0.3)
    torch.manual_seed(6)
    keep, _ = kernels.dropout_mask(torch.empty(3, 2, 7, 7), 0.25)
    ref = torch.ops.aten._scaled_dot_product_attention_math(q.float(), k.float(), v.float(), attn_mask=_as_sdpa_passes_it(mask), dropout_p=0.25,
                                                             scale=0.3, dropout_mask=keep.bool())[0].transpose(1, 2)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref.bfloat16(), rtol=2**-8, atol=1e-3)  # within a bf16 rounding step


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_a_row_with_no_key_gives_zeros_as_sdpas_safe_softmax(kind):
    module = _Attention(0.25).train()
    q, k, v = _qkv()
    mask = torch.ones(3, 1, 7, 7, dtype=torch.bool)
    mask[1, :, 2] = False  # query 2 of example 1 may attend to nothing
    if kind == "additive":
        mask = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    out, _ = attention_dropout.attention(module, q, k, v, mask, dropout=0.25, scaling=0.3)
    assert torch.isfinite(out).all() and torch.equal(out[1, 2], torch.zeros(2, 8))
    assert torch.equal(out.isnan().any(-1).any(-1), torch.zeros(3, 7, dtype=torch.bool))


@pytest.mark.parametrize("case", ["eval", "no dropout", "old draw", "stock dropout", "causal", "weights asked",
                                  "no is_causal"])
def test_every_other_call_is_sdpas_own(case, monkeypatch):
    module = _Attention(0.25, {"old draw": kernels.FastDropoutInt64, "stock dropout": nn.Dropout}.get(case, kernels.FastDropout))
    module.train(case != "eval")
    if case == "no is_causal":  # sdpa_attention_forward reads a missing is_causal as True
        del module.is_causal
    kwargs = {"causal": {"is_causal": True}, "weights asked": {"output_attentions": True}}.get(case, {})
    calls = []
    monkeypatch.setattr(attention_dropout, "sdpa_attention_forward", lambda *a, **kw: calls.append(kw) or ("sdpa", None))
    q, k, v = _qkv()
    dropout = 0.0 if case in ("eval", "no dropout") else 0.25
    assert attention_dropout.attention(module, q, k, v, None, dropout=dropout, scaling=0.3, **kwargs)[0] == "sdpa"
    assert calls and calls[0]["dropout"] == dropout


@pytest.mark.parametrize("arch", ["bert", "distilbert", "roberta"])
def test_a_switched_model_calls_it_keeps_its_padding_masks_and_switches_back(arch, tmp_path, monkeypatch):
    model = AutoModel.from_pretrained(build_tiny_encoder(tmp_path / "enc", arch, **(
        {"attention_dropout": 0.25} if arch == "distilbert" else {"attention_probs_dropout_prob": 0.25})))
    assert model.config._attn_implementation == "sdpa"
    ids = torch.randint(5, 20, (3, 9))
    am = torch.ones(3, 9, dtype=torch.long)
    am[1, 6:] = 0
    am[2, 3:] = 0
    model.eval()
    stock = model(input_ids=ids, attention_mask=am).last_hidden_state
    fast = kernels.use_fast_paths(model, torch.device("cpu"), onednn=False)
    assert attention_dropout.use_attention_dropout(model, fast) == 1 and fast.counts["attention_dropout"] == 1
    assert model.config._attn_implementation == attention_dropout.NAME
    # Evaluation runs sdpa itself, with the padding mask transformers builds for "sdpa" (it builds none for a
    # name its mask registry lacks: padded positions would then change the real tokens' states).
    torch.testing.assert_close(model(input_ids=ids, attention_mask=am).last_hidden_state, stock, rtol=0, atol=0)
    calls = []
    original = attention_dropout.attention

    def spy(module, query, key, value, mask, **kwargs):
        calls.append(mask)
        return original(module, query, key, value, mask, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, attention_dropout.NAME, spy)
    model.train()
    torch.manual_seed(3)
    a = model(input_ids=ids, attention_mask=am).last_hidden_state
    torch.manual_seed(3)
    assert torch.equal(a, model(input_ids=ids, attention_mask=am).last_hidden_state)  # reproducible from the seed
    assert len(calls) == 4 and all(m is not None and m.dtype == torch.bool and not m[2, 0, 0, 3:].any() for m in calls)
    fast.undo()
    assert model.config._attn_implementation == "sdpa"
    model.save_pretrained(tmp_path / "saved")
    assert attention_dropout.NAME not in json.dumps(json.loads((tmp_path / "saved" / "config.json").read_text()))


@pytest.mark.parametrize("recorded, switched", [(None, True), ({"onednn_linear": False, "dropout_draw": "pcg64"}, True),
                                                ({"onednn_linear": False, "dropout_draw": "int64"}, False),
                                                ({"onednn_linear": False}, False)])
def test_training_switches_it_on_for_todays_draw_only(recorded, switched, tmp_path):
    # job.cpu_kernels: a new run (or one begun with PCG64 draws) drops attention probabilities by lorafit's
    # masks; a run resumed from an older compute.json keeps SDPA's, the masks it began with.
    import types

    from lorafit import job
    from lorafit.distributed import World

    model = AutoModel.from_pretrained(build_tiny_encoder(tmp_path / "enc", attention_probs_dropout_prob=0.1))
    cfg = types.SimpleNamespace(train=types.SimpleNamespace(cpu_kernels="auto"))
    counts, choice = job.cpu_kernels(cfg, model, torch.device("cpu"), World.from_env(), recorded)
    assert (model.config._attn_implementation == attention_dropout.NAME) is switched
    assert choice["attention_dropout"] is switched
    assert counts.get("attention_dropout", 0) == int(switched)
