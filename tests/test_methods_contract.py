"""The contract every registered method keeps, on tiny random BERT, DistilBERT and RoBERTa."""

from __future__ import annotations

import pkgutil

import pytest
import torch

import lorafit.methods
from lorafit.config import validate
from lorafit.methods import registry
from lorafit.methods.base import AdapterConfig
from lorafit.models import build_classifier, find_targets
from lorafit.train import count_parameters

from conftest import ARCHS

NUM_LABELS = 3
# Per-method settings that make the contract meaningful on a tiny model.
SETTINGS = {"lora": {"rank": 4, "alpha": 8, "dropout": 0.0, "targets": ["attention", "ffn"]}, "full": {}}


def test_every_method_file_registers():
    files = {m.name for m in pkgutil.iter_modules(lorafit.methods.__path__)} - registry.NOT_METHODS
    assert files == set(registry.names()), "each file in methods/ must register exactly one method of its name"


def test_every_method_has_contract_settings():
    assert set(SETTINGS) == set(registry.names()), "add the new method to SETTINGS so the contract runs on it"


def _setup(model_dir, method_name, seed=0):
    cfg = validate({"model": {"name": str(model_dir)}, "method": {"name": method_name, **SETTINGS[method_name]}, "seed": seed})
    base = build_classifier(cfg.model, NUM_LABELS, seed)
    method = registry.get(method_name)(cfg.method)
    targets = find_targets(base, cfg.method.targets, cfg.method.layers) if isinstance(cfg.method, AdapterConfig) else []
    return cfg, base, method, targets


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 20, (4, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    mask[3, 3:] = 0
    return ids, mask


def _steps(model, n=3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for i in range(n):
        ids, mask = _batch(i)
        loss = torch.nn.functional.cross_entropy(model(ids, mask), torch.tensor([0, 1, 2, 1]))
        loss.backward()
        opt.step()
        opt.zero_grad()


ARCH = pytest.mark.parametrize("arch", ARCHS)


@ARCH
@pytest.mark.parametrize("method_name", sorted(SETTINGS))
def test_adapted_model_equals_base_at_init(tiny_models, arch, method_name):
    _, base, method, targets = _setup(tiny_models[arch], method_name)
    base.eval()
    ids, mask = _batch()
    with torch.no_grad():
        before = base(ids, mask).clone()
    model = method.apply(base, targets, total_steps=10).eval()
    with torch.no_grad():
        after = model(ids, mask)
    assert torch.equal(before, after)


@ARCH
@pytest.mark.parametrize("method_name", sorted(SETTINGS))
def test_only_intended_parameters_train(tiny_models, arch, method_name):
    _, base, method, targets = _setup(tiny_models[arch], method_name)
    model = method.apply(base, targets, total_steps=10)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    _steps(model)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"frozen weight {n} changed"
            assert p.grad is None
    changed = [n for n, p in model.named_parameters() if n in trainable and not torch.equal(p, trainable[n])]
    assert any("classifier" in n for n in changed), "the head must train"
    if method_name == "lora":
        assert all(("lora_" in n) or ("classifier" in n) for n in trainable), sorted(trainable)
        assert any("lora_B" in n for n in changed)


@ARCH
@pytest.mark.parametrize("method_name", sorted(SETTINGS))
def test_save_load_gives_identical_logits(tiny_models, arch, method_name, tmp_path):
    _, base, method, targets = _setup(tiny_models[arch], method_name)
    model = method.apply(base, targets, total_steps=10)
    _steps(model)
    model.eval()
    ids, mask = _batch(7)
    with torch.no_grad():
        expected = model(ids, mask)
    method.save(model, tmp_path)
    _, fresh, method2, _ = _setup(tiny_models[arch], method_name, seed=99)  # another head init
    loaded = method2.load(fresh, tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids, mask), expected)


@ARCH
@pytest.mark.parametrize("method_name", sorted(SETTINGS))
def test_merge_matches_and_removes_adapters(tiny_models, arch, method_name):
    _, base, method, targets = _setup(tiny_models[arch], method_name)
    model = method.apply(base, targets, total_steps=10)
    _steps(model)
    model.eval()
    ids, mask = _batch(3)
    with torch.no_grad():
        expected = model(ids, mask)
        merged = method.merge(model).eval()
        got = merged(ids, mask)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not [n for n, _ in merged.named_modules() if "lora_" in n]


@ARCH
def test_lora_trainable_count_matches_formula(tiny_models, arch):
    cfg, base, method, targets = _setup(tiny_models[arch], "lora")
    modules = dict(base.named_modules())
    rank = cfg.method.rank
    adapter = sum(rank * (modules[t].in_features + modules[t].out_features) for t in targets)
    hidden = base.classifier.in_features
    head = hidden * NUM_LABELS + NUM_LABELS
    model = method.apply(base, targets, total_steps=10)
    trainable, total = count_parameters(model)
    assert trainable == adapter + head
    # attention (4 linears) + ffn (2) in each of the 2 layers
    assert len(targets) == 12


@ARCH
def test_layer_subset_and_names(tiny_models, arch):
    _, base, _, _ = _setup(tiny_models[arch], "lora")
    only_first = find_targets(base, ["attention"], [0])
    assert only_first and all(".0." in n for n in only_first)
    assert len(only_first) == 4
    ffn = find_targets(base, ["ffn"], None)
    assert len(ffn) == 4 and not set(ffn) & set(find_targets(base, ["attention"], None))
