"""native-lora matches peft's LoRA: same A and B give the same logits and gradients (float64, 1e-6),
it merges into W exactly, and its saved adapter is peft's format."""

from __future__ import annotations

import pytest
import torch

from lorafit.config import validate
from lorafit.methods import registry
from lorafit.models import build_classifier, find_targets

from conftest import ARCHS


def _pair(model_dir, dropout=0.0):
    out = []
    for name in ("lora", "native-lora"):
        cfg = validate({"model": {"name": str(model_dir)},
                        "method": {"name": name, "rank": 4, "alpha": 8, "dropout": dropout, "targets": ["attention", "ffn"]}})
        base = build_classifier(cfg.model, 3, 0).double()
        method = registry.get(name)(cfg.method)
        out.append((method, method.apply(base, find_targets(base, cfg.method.targets, None), total_steps=10)))
    return out


def _inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 20, (4, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    return ids, mask, torch.tensor([0, 2, 1, 1])


@pytest.mark.parametrize("arch", ARCHS)
def test_same_a_b_give_same_logits_and_gradients(tiny_models, arch):
    (peft_method, peft_model), (native_method, native_model) = _pair(tiny_models[arch])
    # Give B non-zero values (B = 0 at init would make the check blind to the update path).
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    state = peft_method.state_dict(peft_model)
    native_method.load_state_dict(native_model, state)  # same key layout: peft's

    ids, mask, y = _inputs()
    losses = []
    for model in (peft_model, native_model):
        model.eval()  # no encoder/head dropout, so both see the same function; gradients still flow
        logits = model(ids, mask)
        loss = torch.nn.functional.cross_entropy(logits, y)
        loss.backward()
        losses.append((logits.detach(), loss.detach()))
    torch.testing.assert_close(losses[1][0], losses[0][0], atol=1e-6, rtol=0)
    assert abs(losses[0][0]).max() > 0.01 and not torch.equal(losses[0][0], torch.zeros_like(losses[0][0]))

    def grads(model):
        out = {}
        for n, p in model.named_parameters():
            if p.requires_grad:
                key = n.replace(".default", "").replace(".modules_to_save", "")
                key = key.removeprefix("base_model.model.").replace(".weight", "") if "lora_" in key else key.removeprefix("base_model.model.")
                out[key] = p.grad
        return out

    gp, gn = grads(peft_model), grads(native_model)
    assert gp.keys() == gn.keys() and len(gp) == 12 * 2 + 2
    for k in gp:
        torch.testing.assert_close(gn[k], gp[k], atol=1e-6, rtol=0, msg=k)
        assert gp[k].abs().sum() > 0, k


def test_merge_folds_the_update_into_w_exactly(tiny_bert):
    (_, _), (method, model) = _pair(tiny_bert)
    g = torch.Generator().manual_seed(3)
    modules = {n: m for n, m in model.named_modules() if hasattr(m, "lora_A")}
    expected_w = {}
    with torch.no_grad():
        for n, m in modules.items():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g, dtype=m.lora_B.dtype))
            expected_w[n] = m.base_layer.weight + (m.lora_B @ m.lora_A) * m.scaling
    ids, mask, _ = _inputs()
    model.eval()
    with torch.no_grad():
        before = model(ids, mask)
        merged = method.merge(model)
        after = merged(ids, mask)
    for n, w in expected_w.items():
        assert torch.equal(merged.get_submodule(n).weight, w)
        assert isinstance(merged.get_submodule(n), torch.nn.Linear)
    torch.testing.assert_close(after, before, atol=1e-12, rtol=0)
