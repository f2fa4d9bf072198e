"""The contract every registered method keeps, on tiny random BERT, DistilBERT and RoBERTa.

Each case is a method plus settings that make the contract meaningful on a 2-layer, 32-wide model;
LoRA's initialisations are cases of their own. Every registered method must have at least one case.
"""

from __future__ import annotations

import pkgutil
import re

import pytest
import torch
from peft import PeftModel

import lorafit.methods
from lorafit.config import validate
from lorafit.errors import UserError
from lorafit.methods import registry
from lorafit.methods.base import AdapterConfig
from lorafit.models import build_classifier, find_targets
from lorafit.train import count_parameters

from conftest import ARCHS

NUM_LABELS = 3
LORA = {"rank": 4, "alpha": 8, "dropout": 0.0, "targets": ["attention", "ffn"]}
# case id -> (method, settings, exact): `exact` means the adapted model equals the base bitwise at
# initialisation; otherwise (DoRA's renormalised W, PiSSA/OLoRA's residual W) within INIT_TOL.
CASES = {
    "full": ("full", {}, True),
    "lora": ("lora", LORA, True),
    "lora-gaussian": ("lora", {**LORA, "init": "gaussian"}, True),
    "lora-pissa": ("lora", {**LORA, "init": "pissa"}, False),
    "lora-olora": ("lora", {**LORA, "init": "olora"}, False),
    "lora-rank-pattern": ("lora", {**LORA, "rank_pattern": {r"layer\.0\..*(query|q_lin)": 6}}, True),
    "dora": ("dora", LORA, False),
    "rslora": ("rslora", LORA, True),
    "loraplus": ("loraplus", LORA, True),
    "native-lora": ("native-lora", LORA, True),
    "adalora": ("adalora", {"rank": 2, "init_rank": 4, "alpha": 8, "dropout": 0.0, "targets": ["attention", "ffn"]}, True),
    "vera": ("vera", {"rank": 4, "targets": ["attention", "ffn"]}, True),
    # the ffn up-projection only: (IA)^3 scales its 32 inputs, not its 64 outputs
    "ia3": ("ia3", {"targets": ["attention", r"re:.*(intermediate\.dense|ffn\.lin1)"]}, True),
    "loha": ("loha", {"rank": 4, "alpha": 8, "targets": ["attention", "ffn"]}, True),
    "lokr": ("lokr", {"rank": 2, "alpha": 4, "targets": ["attention", "ffn"]}, True),
}
INIT_TOL = 1e-5
# Names of the parameters a method may train, besides the head.
ADAPTER_MARKS = ("lora_", "hada_", "lokr_", "ia3_", "vera_lambda")


def test_every_method_file_registers():
    files = {m.name.replace("_", "-") for m in pkgutil.iter_modules(lorafit.methods.__path__) if m.name not in registry.NOT_METHODS}
    assert files == set(registry.names()), "each file in methods/ must register exactly one method of its name"


def test_every_method_has_a_contract_case():
    assert {method for method, _, _ in CASES.values()} == set(registry.names()), "add a CASES entry for the new method"


def _setup(model_dir, case, seed=0):
    method_name, settings, _ = CASES[case]
    cfg = validate({"model": {"name": str(model_dir)}, "method": {"name": method_name, **settings}, "seed": seed})
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


def _steps(model, method, n=3, lr=1e-2):
    """n optimiser steps the way the loop takes them: extra loss, step, on_step_end, zero_grad."""
    groups = method.param_groups(model, lr, lr)
    opt = torch.optim.AdamW([{"params": g["params"], "lr": g["lr"]} for g in groups if g["params"]])
    model.train()
    for i in range(n):
        ids, mask = _batch(i)
        loss = torch.nn.functional.cross_entropy(model(ids, mask), torch.tensor([0, 1, 2, 1]))
        extra = method.extra_loss(model)
        (loss if extra is None else loss + extra).backward()
        opt.step()
        method.on_step_end(model, i + 1)
        opt.zero_grad()


ARCH = pytest.mark.parametrize("arch", ARCHS)
CASE = pytest.mark.parametrize("case", sorted(CASES))


@ARCH
@CASE
def test_adapted_model_equals_base_at_init(tiny_models, arch, case):
    _, base, method, targets = _setup(tiny_models[arch], case)
    base.eval()
    ids, mask = _batch()
    with torch.no_grad():
        before = base(ids, mask).clone()
    model = method.apply(base, targets, total_steps=10).eval()
    with torch.no_grad():
        after = model(ids, mask)
    if CASES[case][2]:
        assert torch.equal(before, after)
    else:
        torch.testing.assert_close(after, before, atol=INIT_TOL, rtol=INIT_TOL)


@ARCH
@CASE
def test_only_intended_parameters_train(tiny_models, arch, case):
    _, base, method, targets = _setup(tiny_models[arch], case)
    model = method.apply(base, targets, total_steps=10)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    _steps(model, method)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"frozen weight {n} changed"
            assert p.grad is None
    changed = [n for n, p in model.named_parameters() if n in trainable and not torch.equal(p, trainable[n])]
    assert any("classifier" in n for n in changed), "the head must train"
    if case != "full":
        assert all(any(m in n for m in ADAPTER_MARKS) or "classifier" in n for n in trainable), sorted(trainable)
        assert any(any(m in n for m in ADAPTER_MARKS) for n in changed), "the adapter must train"


@ARCH
@CASE
def test_save_load_gives_identical_logits(tiny_models, arch, case, tmp_path):
    _, base, method, targets = _setup(tiny_models[arch], case)
    model = method.apply(base, targets, total_steps=10)
    _steps(model, method)
    model.eval()
    ids, mask = _batch(7)
    with torch.no_grad():
        expected = model(ids, mask)
    method.save(model, tmp_path)
    _, fresh, method2, _ = _setup(tiny_models[arch], case, seed=99)  # another head init
    loaded = method2.load(fresh, tmp_path).eval()
    with torch.no_grad():
        got = loaded(ids, mask)
    if CASES[case][2]:
        assert torch.equal(got, expected)
    else:  # PiSSA/OLoRA save as a rank-2r LoRA of the original W: equal up to float rounding
        torch.testing.assert_close(got, expected, atol=INIT_TOL, rtol=INIT_TOL)
    if method.artifact == "adapter":  # every adapter also loads in plain peft, unchanged
        _, other, _, _ = _setup(tiny_models[arch], case, seed=5)
        plain = PeftModel.from_pretrained(other, str(tmp_path)).eval()
        with torch.no_grad():
            torch.testing.assert_close(plain(ids, mask), expected, atol=INIT_TOL, rtol=INIT_TOL)


@ARCH
@CASE
def test_merge_matches_and_removes_adapters(tiny_models, arch, case):
    _, base, method, targets = _setup(tiny_models[arch], case)
    model = method.apply(base, targets, total_steps=10)
    _steps(model, method)
    model.eval()
    ids, mask = _batch(3)
    with torch.no_grad():
        expected = model(ids, mask)
        merged = method.merge(model).eval()
        got = merged(ids, mask)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    names = [n for n, _ in merged.named_modules()] + [n for n, _ in merged.named_parameters()]
    assert not [n for n in names if any(m in n for m in ADAPTER_MARKS + ("base_layer",))]


def _factor(d: int) -> tuple[int, int]:
    """The most balanced split d = m * n with m <= n."""
    m = max(k for k in range(1, int(d**0.5) + 1) if d % k == 0)
    return m, d // m


def _closed_form(cfg, shapes: list[tuple[str, int, int, bool]]) -> int:
    """Adapter weights of the config, from the papers' formulas. shapes: (name, in, out, is_ffn) per target."""
    c = cfg.method
    total = 0
    for name, fan_in, fan_out, is_ffn in shapes:
        if c.name in ("lora", "rslora", "loraplus", "native-lora", "dora"):
            r = next((r for p, r in getattr(c, "rank_pattern", {}).items() if re.search(p, name)), c.rank)
            total += r * (fan_in + fan_out) + (fan_out if c.name == "dora" else 0)  # DoRA: + magnitude per row
        elif c.name == "adalora":
            total += c.init_rank * (fan_in + fan_out + 1)  # P, Q and the diagonal E
        elif c.name == "vera":
            total += c.rank + fan_out  # d and b; the shared random A, B are frozen
        elif c.name == "ia3":
            total += fan_in if is_ffn else fan_out  # (IA)^3 scales ffn inputs, attention outputs
        elif c.name == "loha":
            total += 2 * c.rank * (fan_in + fan_out)
        elif c.name == "lokr":
            (a, b), (cc, d) = _factor(fan_out), _factor(fan_in)
            w1 = a * cc
            w2 = b * d if c.rank >= max(b, d) / 2 else c.rank * (b + d)
            total += w1 + w2
    return total


def _shapes(base, targets):
    modules, ffn = dict(base.named_modules()), set(find_targets(base, ["ffn"], None))
    return [(t, modules[t].in_features, modules[t].out_features, t in ffn) for t in targets]


@ARCH
@pytest.mark.parametrize("case", sorted(set(CASES) - {"full"}))
def test_trainable_count_matches_closed_form(tiny_models, arch, case):
    cfg, base, method, targets = _setup(tiny_models[arch], case)
    shapes = _shapes(base, targets)
    hidden = base.classifier.in_features
    head = hidden * NUM_LABELS + NUM_LABELS
    model = method.apply(base, targets, total_steps=10)
    trainable, _ = count_parameters(model)
    assert trainable == _closed_form(cfg, shapes) + head
    assert len(targets) == (10 if case == "ia3" else 12)  # attention (4 linears) + ffn (2) in each of 2 layers


def test_closed_forms_tell_variants_apart(tiny_models):
    """The formulas must differ where the methods differ, or the count test could not catch a method
    that silently behaves like another (IA3 ignoring feed-forward inputs, LoKr never decomposing)."""
    cfg, base, _, targets = _setup(tiny_models["bert"], "ia3")
    shapes = _shapes(base, targets)
    assert _closed_form(cfg, shapes) != sum(o for _, _, o, _ in shapes)
    lokr = _setup(tiny_models["bert"], "lokr")[0]
    assert _closed_form(lokr, shapes) != _closed_form(lokr.model_copy(update={"method": lokr.method.model_copy(update={"rank": 8})}), shapes)


@ARCH
def test_layer_subset_and_names(tiny_models, arch):
    _, base, _, _ = _setup(tiny_models[arch], "lora")
    only_first = find_targets(base, ["attention"], [0])
    assert only_first and all(".0." in n for n in only_first)
    assert len(only_first) == 4
    ffn = find_targets(base, ["ffn"], None)
    assert len(ffn) == 4 and not set(ffn) & set(find_targets(base, ["attention"], None))


# -- bad configs fail before training, naming the fix ----------------------------------------------

@pytest.mark.parametrize("method_name", ["lora", "dora", "rslora", "loraplus", "native-lora", "adalora", "vera", "loha", "lokr"])
@pytest.mark.parametrize("key,value", [("rank", 0), ("alpha", -1.0)])
def test_bad_rank_or_alpha_is_refused(method_name, key, value):
    if key == "alpha" and method_name == "vera":
        pytest.skip("vera has no alpha")
    with pytest.raises(UserError, match=f"method.{key}: Input should be greater than 0"):
        validate({"method": {"name": method_name, key: value}})


@pytest.mark.parametrize("case", sorted(set(CASES) - {"full"}))
def test_target_matching_nothing_is_refused(tiny_models, case):
    _, base, _, _ = _setup(tiny_models["bert"], case)
    with pytest.raises(UserError, match="matches no linear module.*valid"):
        find_targets(base, ["q_proj"], None)


def test_adalora_without_step_budget_is_refused(tiny_models):
    _, base, method, targets = _setup(tiny_models["bert"], "adalora")
    method = registry.get("adalora")(method.cfg.model_copy(update={"tinit": 5, "tfinal": 5}))
    with pytest.raises(UserError, match="no step budget.*raise train.epochs or lower method.tinit"):
        method.apply(base, targets, total_steps=8)


def test_adalora_rank_above_init_rank_is_refused():
    with pytest.raises(UserError, match="must not exceed method.init_rank"):
        validate({"method": {"name": "adalora", "rank": 16, "init_rank": 12}})


# -- apply resolves its own targets ----------------------------------------------------------------

@CASE
def test_apply_resolves_the_targets_the_settings_select(tiny_models, case):
    cfg, base, _, targets = _setup(tiny_models["bert"], case)
    method = lorafit.methods.build(cfg.method)
    assert type(method) is registry.get(cfg.method.name) and method.cfg is cfg.method
    assert method.adapted == []
    model = method.apply(base, total_steps=10)
    assert method.adapted == targets  # find_targets of the settings; none for full fine-tuning
    _, given, explicit, _ = _setup(tiny_models["bert"], case)
    given = explicit.apply(given, targets, total_steps=10)
    assert explicit.adapted == targets
    assert [(n, p.requires_grad) for n, p in model.named_parameters()] == \
        [(n, p.requires_grad) for n, p in given.named_parameters()]


def test_apply_reports_bad_targets_of_the_settings(tiny_models):
    cfg, base, _, _ = _setup(tiny_models["bert"], "lora")
    method = lorafit.methods.build(cfg.method.model_copy(update={"targets": ["q_proj"]}))
    with pytest.raises(UserError, match="method.targets: 'q_proj' matches no linear module"):
        method.apply(base, total_steps=10)
