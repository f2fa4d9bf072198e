"""`lorafit inspect`: counts on the real adapted model, printed per module type, without training."""

from __future__ import annotations

from lorafit.cli import main
from lorafit.config import validate
from lorafit.inspection import inspect_config


def test_inspect_counts_lora_on_query_value(tiny_bert):
    cfg = validate({"model": {"name": str(tiny_bert)},
                    "method": {"name": "lora", "rank": 4, "targets": ["query", "value"], "layers": [1]}})
    r = inspect_config(cfg, num_labels=3)
    assert [(m.name, m.count, m.shape, m.base_weights, m.adapter_weights) for m in r.modules] == [
        ("attention.self.query", 1, (32, 32), 1024, 4 * (32 + 32)),
        ("attention.self.value", 1, (32, 32), 1024, 4 * (32 + 32)),
    ]
    assert r.head_weights == 32 * 3 + 3
    assert r.trainable == 2 * 256 + 99
    assert abs(r.percent - 100 * r.trainable / r.total) < 1e-12


def test_inspect_cli_prints_the_table(tiny_bert, capsys):
    assert main(["inspect", str(tiny_bert), "method.name=dora", "method.rank=2", "--num-labels", "5"]) == 0
    out = capsys.readouterr().out
    # DoRA: r * (in + out) plus one magnitude per output row
    assert "intermediate.dense" in out and f"{2 * (32 + 64) + 64:,}" in out
    assert "a 32x32 attention.self.query gets 160 adapter weights instead of 1,024" in out
    assert "trainable:" in out and "fewer than full fine-tuning" in out


def test_inspect_bad_target_is_one_line_error(tiny_bert, capsys):
    assert main(["inspect", str(tiny_bert), "method.targets=[q_proj]"]) == 2
    err = capsys.readouterr().err.strip()
    assert "matches no linear module" in err and "\n" not in err
