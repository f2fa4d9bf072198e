"""The switch to the CPU fast paths (lorafit/kernels.py `use_fast_paths`) is an explicit, reversible
step: undo gives back the stock model bit for bit, and only the step, not an import, touches the
environment (oneDNN's primitive cache capacity), leaving a value the user exported alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import lorafit
from lorafit import kernels

CPU = torch.device("cpu")
CACHE_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "DNNL_PRIMITIVE_CACHE_CAPACITY")
needs_onednn = pytest.mark.skipif(not kernels.onednn_available(), reason="this PyTorch build has no oneDNN")


class _Block(nn.Module):
    """A linear, dropout, layer norm, linear stack: peft adapts both linears."""

    def __init__(self):
        super().__init__()
        self.query = nn.Linear(8, 16)
        self.dropout = nn.Dropout(0.1)
        self.norm = nn.LayerNorm(16)
        self.out = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(self.dropout(self.query(x))))


def _lora_model() -> nn.Module:
    torch.manual_seed(0)
    # init_lora_weights=False: a random lora_B, so the adapter path changes the output.
    config = LoraConfig(r=2, lora_alpha=4, lora_dropout=0.1, target_modules=["query", "out"], init_lora_weights=False)
    return get_peft_model(_Block(), config)


def _outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Eval logits, then seeded training-mode logits (dropout on) and the gradients of what trains."""
    model.eval()
    with torch.no_grad():
        evaluated = model(x)
    model.train()
    torch.manual_seed(1)
    trained = model(x)
    grads = torch.autograd.grad(trained.sum(), [p for p in model.parameters() if p.requires_grad])
    return [evaluated, trained.detach(), *grads]


@pytest.fixture
def fresh_checks():
    """The oneDNN check (which caps the primitive cache) runs afresh in this test and after it."""
    kernels._problem.cache_clear()
    kernels._decide.cache_clear()
    yield
    kernels._problem.cache_clear()
    kernels._decide.cache_clear()


@needs_onednn
def test_undo_gives_back_the_stock_model_bit_for_bit():
    model = _lora_model()
    x = torch.randn(5, 3, 8)  # (batch, tokens, features)
    classes = [(name, type(m)) for name, m in model.named_modules()]
    parameters = dict(model.named_parameters())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = _outputs(model, x)

    fast = kernels.use_fast_paths(model, CPU, onednn=True)
    # query and out: base_layer, lora_A and lora_B each; the block's dropout and peft's two lora_dropouts.
    assert fast.counts == {"onednn_linear": 6, "fast_dropout": 3}
    assert sum(type(m) is kernels.OneDnnLinear for m in model.modules()) == 6
    assert sum(type(m) is kernels.FastDropout for m in model.modules()) == 3
    assert model.state_dict().keys() == state.keys()
    _outputs(model, x)  # the fast paths run (and their different dropout draws are forgotten below)

    fast.undo()
    assert [(name, type(m)) for name, m in model.named_modules()] == classes
    assert dict(model.named_parameters()).keys() == parameters.keys()
    assert all(p is parameters[name] for name, p in model.named_parameters())
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    after = _outputs(model, x)
    assert len(after) == len(before) and all(torch.equal(a, b) for a, b in zip(after, before, strict=True))
    fast.undo()  # a second undo does nothing
    assert [(name, type(m)) for name, m in model.named_modules()] == classes


@needs_onednn
def test_leaving_a_with_block_undoes_the_switch():
    model = _lora_model()
    classes = [type(m) for m in model.modules()]
    with kernels.use_fast_paths(model, CPU, onednn=True, dropout=False) as fast:
        assert fast.counts == {"onednn_linear": 6}
        assert any(type(m) is kernels.OneDnnLinear for m in model.modules())
    assert [type(m) for m in model.modules()] == classes


def test_importing_leaves_the_environment_alone_and_the_step_caps_the_cache():
    """In a fresh process (oneDNN reads the capacity once per process) with no capacity exported."""
    code = ("import json, os, sys, torch; names = sys.argv[1:]\n"
            "from lorafit import kernels\n"
            "imported = {n: os.environ.get(n) for n in names}\n"
            "kernels.use_fast_paths(torch.nn.Linear(2, 2), torch.device('cpu'), onednn=True)\n"
            "print(json.dumps([imported, {n: os.environ.get(n) for n in names}]))")
    env = {k: v for k, v in os.environ.items() if k not in CACHE_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(lorafit.__file__).parents[1]), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", code, *CACHE_VARIABLES], env=env, capture_output=True, text=True,
                          timeout=300, check=True)
    imported, stepped = json.loads(done.stdout.strip().splitlines()[-1])
    assert imported == dict.fromkeys(CACHE_VARIABLES)
    assert stepped == {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": str(kernels.PRIMITIVE_CACHE_CAPACITY),
                       "DNNL_PRIMITIVE_CACHE_CAPACITY": None}


@pytest.mark.parametrize("exported", CACHE_VARIABLES)
def test_a_capacity_the_user_exported_wins(exported, monkeypatch, fresh_checks):
    for name in CACHE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(exported, "7")
    kernels.use_fast_paths(nn.Linear(2, 2), CPU, onednn=True)
    assert {name: os.environ.get(name) for name in CACHE_VARIABLES} == {
        name: "7" if name == exported else None for name in CACHE_VARIABLES}
